"""Engine configuration: every knob has a default sized from the hardware it runs on."""
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["auto", "float32", "float16", "bfloat16"]


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    tokenizer: str | None = None           # defaults to the model directory
    dtype: DType = "auto"                  # auto: fp32 on CPU, the checkpoint's bf16/fp16 on GPU
    device: str = "auto"                   # auto: cuda if available, else cpu
    load_format: Literal["safetensors", "dummy"] = "safetensors"   # dummy: random weights (benchmarks)
    allow_pickle_weights: bool = False
    # fp8: quantize a float checkpoint's linear layers to fp8 while it loads (fp8 checkpoints need nothing)
    quantization: Literal["fp8"] | None = None
    # fp8: the KV cache in float8_e4m3fn (half the bytes of bf16: twice the tokens, half the attention reads), with
    # the checkpoint's per-layer K/V scales, else 1.0 (see kernels/store_kv.py); auto: the compute dtype
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    seed: int = 0
    # "model": the model's generation_config.json sampling values are the defaults of its requests; "none":
    # SamplingParams' own neutral defaults
    generation_config: Literal["model", "none"] = "model"

    # tokens a KV cache page holds; default 32 over an fp8 cache (its keys-contiguous V pages are read 32 bytes a
    # head dimension: 1.2x on the decode kernel against pages of 16, docs/benchmarks.md), else 16
    block_size: int | None = Field(None, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)           # overrides the sizing below
    # the cache's size (per GPU under tensor parallelism) instead of sizing it: on a GPU in place of
    # gpu_memory_utilization's share (engines sharing a card); on the CPU default <= 2 GiB, a quarter of free RAM
    kv_cache_bytes: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    max_model_len: int | None = Field(None, ge=1)           # default: the model's context, capped by the cache
    # default: 1024 on GPU (a decode step reads the weights once for more tokens: docs/benchmarks.md), 128 on CPU
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)  # default: 8192 on GPU, 1024 on CPU
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # "reserve": admit a request only while the KV cache also holds the growth expected of the running ones
    # (rare preemption); "greedy": admit while its prompt fits (more sequences at once, preempted and recomputed
    # when the cache runs out). batchgen/engine/scheduler.py says how the growth is estimated.
    kv_admission: Literal["reserve", "greedy"] = "reserve"
    enforce_eager: bool = False            # no CUDA graphs
    # ranks the model is split over (tensor parallelism): one process per rank, rank r on cuda:r (gloo on CPU)
    tensor_parallel_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _default_block_size(self) -> "EngineConfig":
        if self.block_size is None:
            self.block_size = 32 if self.kv_cache_dtype == "fp8" else 16
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            torch.device(value)  # raises a clear error for a bad device string
        return value

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_max_num_seqs(self, device: torch.device) -> int:
        return self.max_num_seqs or (1024 if device.type == "cuda" else 128)

    def resolved_kv_cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model computing in `dtype`."""
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else dtype

    def resolved_max_num_batched_tokens(self, device: torch.device) -> int:
        return self.max_num_batched_tokens or (8192 if device.type == "cuda" else 1024)
