"""Weight formats: how a linear layer's weight is stored, loaded from a checkpoint and multiplied.

A format creates its layer's parameters (on the meta device while the model is built; the loader gives them
storage of the dtype the format chose), loads checkpoint tensors into them one tensor and one fused part at a
time, and computes x W^T. Which format each layer gets is a `QuantConfig`'s choice: read from a checkpoint's
`quantization_config` (compressed-tensors, block-wise fp8 as Qwen publishes it, NVIDIA ModelOpt), or asked
for (`quantization="fp8"`: a float checkpoint quantized while it loads, one tensor at a time).
"""
import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.nn import functional as F

from batchgen.kernels import ops
from batchgen.kernels.fp8 import FP8, quantize_fp8_ref, quantize_fp8_static
from batchgen.models.checkpoint import CheckpointTensor, read

if TYPE_CHECKING:
    from batchgen.models.linear import Linear

QUANTIZATIONS = ("fp8",)
# Per-tensor fp8 KV-cache scales, under the names exports give them: compressed-tensors `self_attn.k_scale`
# (older ones `self_attn.k_proj.output_scale`), ModelOpt `self_attn.k_proj.k_scale`, fused-qkv checkpoints
# `self_attn.qkv_proj.k_scale`; likewise for v.
_KV_CACHE_SCALE = re.compile(
    r"(.+\.self_attn)\.(?:([kv])_scale|([kv])_proj\.(?:\3_scale|output_scale)|qkv_proj\.([kv])_scale)")
# other attention calibration an fp8-KV checkpoint may carry (queries, probabilities): batchgen keeps them in the
# compute dtype, where they do not apply
_UNUSED_ATTENTION_SCALES = ("q_scale", "prob_scale", "output_scale")


def kv_cache_scale(checkpoint_name: str) -> tuple[str, str] | None:
    """('model.layers.N.self_attn', 'k_scale' or 'v_scale') when the tensor is a layer's KV-cache scale."""
    found = _KV_CACHE_SCALE.fullmatch(checkpoint_name)
    return None if found is None else (found[1], f"{found[2] or found[3] or found[4]}_scale")


def _parameter(shape, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Unquantized:
    """The weight in the compute dtype (bf16, fp16 or fp32), as the checkpoint gives it."""
    fp8_token_input = False

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def create(self, layer: "Linear") -> None:
        layer.weight = _parameter(layer.weight_shape, self.dtype)

    def checkpoint_tensors(self, layer: "Linear") -> set[tuple[str, str | None]]:
        return {("weight", part) for part in layer.part_rows}

    def load(self, layer: "Linear", name: str, part: str | None, tensor: torch.Tensor | CheckpointTensor,
             expert: int | None) -> None:
        layer.copy_rows(layer.weight, part, expert, layer.shard(tensor, part))

    def dequantized_weight(self, layer: "Linear") -> torch.Tensor:
        return layer.weight

    def weight_scale(self, layer: "Linear") -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        """(the weight's scales, their [block_n, block_k] block or None when one per output row) for a kernel
        that multiplies the weight as stored (the fused MoE kernel); (None, None): no scales."""
        return None, None

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight)


class Fp8PerChannel:
    """float8_e4m3fn weight [out, in] with one fp32 scale per output channel (`weight_scale` [out]).

    checkpoint_scale None quantizes a float checkpoint's weight as it loads (online); "channel" loads a
    checkpoint's per-channel scales; "tensor" loads one scale per tensor and expands it to the channels of its
    part: exact, where requantizing fused parts to one shared scale would round every weight again.
    Activations are quantized per token at run time, or with the checkpoint's static per-tensor `input_scale`;
    fused parts calibrated separately share the largest of their input scales (the one that clips nothing).
    """

    def __init__(self, dtype: torch.dtype, checkpoint_scale: Literal["channel", "tensor"] | None,
                 static_input_scale: bool = False):
        self.dtype, self.checkpoint_scale, self.static_input_scale = dtype, checkpoint_scale, static_input_scale
        # the producer of this layer's input (RMSNorm, SiLU-and-mul) may hand it over quantized per token
        self.fp8_token_input = not static_input_scale

    def create(self, layer: "Linear") -> None:
        layer.weight = _parameter(layer.weight_shape, FP8)
        layer.weight_scale = _parameter(layer.weight_shape[:-1], torch.float32)
        if self.static_input_scale:
            layer.input_scale = _parameter(len(layer.part_rows), torch.float32)   # one per part, max applied

    def checkpoint_tensors(self, layer: "Linear") -> set[tuple[str, str | None]]:
        names = ["weight"] + (["weight_scale"] if self.checkpoint_scale else []) + \
            (["input_scale"] if self.static_input_scale else [])
        return {(name, part) for name in names for part in layer.part_rows}

    def load(self, layer: "Linear", name: str, part: str | None, tensor: torch.Tensor | CheckpointTensor,
             expert: int | None) -> None:
        if name == "input_scale":
            layer.input_scale[list(layer.part_rows).index(part)] = read(tensor).reshape(())
        elif name == "weight_scale" and tensor.numel() == 1:   # per-tensor scale, expanded to its part's rows
            layer.rows(layer.weight_scale, part, expert).fill_(read(tensor).reshape(()))
        elif name == "weight_scale":   # [out] or [out, 1]
            layer.copy_rows(layer.weight_scale, part, expert, layer.shard(tensor, part, in_dim=None).reshape(-1))
        elif self.checkpoint_scale:
            layer.copy_rows(layer.weight, part, expert, _check_fp8(name, layer.shard(tensor, part)))
        else:   # online: this part's rows quantized on the device, one tensor in memory at a time
            # whole rows: a row-parallel rank's columns share the scale of the full row, as on one GPU
            float_rows = layer.shard(tensor, part, in_dim=None).to(layer.weight.device, self.dtype)
            layer.check_rows(layer.weight, part, expert, layer.shard(float_rows, part, out_dim=None))
            quantized, scales = quantize_fp8_ref(float_rows)
            layer.copy_rows(layer.weight, part, expert, layer.shard(quantized, part, out_dim=None))
            layer.copy_rows(layer.weight_scale, part, expert, scales.squeeze(-1))

    def dequantized_weight(self, layer: "Linear") -> torch.Tensor:
        return (layer.weight.float() * layer.weight_scale[..., None]).to(self.dtype)

    def weight_scale(self, layer: "Linear") -> tuple[torch.Tensor, None]:
        return layer.weight_scale, None

    def apply(self, layer: "Linear", x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, tuple):   # (fp8 [T, K], per-token scales [T, 1]) from a fused producer
            x_q, x_scale = x
        elif self.static_input_scale:
            x_q, x_scale = quantize_fp8_static(x, layer.input_scale.max())
        else:
            x_q, x_scale = ops.quantize_fp8(x)
        return ops.fp8_gemm(x_q, x_scale, layer.weight, layer.weight_scale, self.dtype)


class Fp8Block:
    """float8_e4m3fn weight [out, in] with one fp32 scale per [block_n, block_k] block, stored under the
    checkpoint's name (`weight_scale_inv` in Qwen's and DeepSeek's checkpoints, which despite its name
    multiplies, `weight_scale` in compressed-tensors'). Activations are quantized per token per block_k
    columns. Fused parts must start on a block row."""
    fp8_token_input = False

    def __init__(self, dtype: torch.dtype, block: tuple[int, int], scale_name: str):
        self.dtype, self.block, self.scale_name = dtype, tuple(block), scale_name

    def create(self, layer: "Linear") -> None:
        block_n, block_k = self.block
        _check_block_aligned_shards(layer, self.block)
        misaligned = [f"{part} at row {start}" for part, (start, _) in layer.part_rows.items() if start % block_n]
        if misaligned or layer.in_features % block_k:
            raise ValueError(f"block-wise fp8 with blocks {list(self.block)} needs parts starting on a block row "
                             f"and input width a multiple of {block_k}: {', '.join(misaligned) or ''} "
                             f"(input width {layer.in_features})")
        layer.weight = _parameter(layer.weight_shape, FP8)
        *experts, out_features, in_features = layer.weight_shape
        setattr(layer, self.scale_name, _parameter((*experts, -(-out_features // block_n), in_features // block_k),
                                                   torch.float32))

    def checkpoint_tensors(self, layer: "Linear") -> set[tuple[str, str | None]]:
        return {(name, part) for name in ("weight", self.scale_name) for part in layer.part_rows}

    def load(self, layer: "Linear", name: str, part: str | None, tensor: torch.Tensor | CheckpointTensor,
             expert: int | None) -> None:
        if name == "weight":
            layer.copy_rows(layer.weight, part, expert, _check_fp8(name, layer.shard(tensor, part)))
        else:
            layer.copy_rows(getattr(layer, self.scale_name), part, expert, layer.shard(tensor, part),
                            unit=self.block[0])

    def dequantized_weight(self, layer: "Linear") -> torch.Tensor:
        block_n, block_k = self.block
        scales = getattr(layer, self.scale_name).repeat_interleave(block_n, -2).repeat_interleave(block_k, -1)
        return (layer.weight.float() * scales[..., :layer.weight.shape[-2], :]).to(self.dtype)

    def weight_scale(self, layer: "Linear") -> tuple[torch.Tensor, tuple[int, int]]:
        return getattr(layer, self.scale_name), self.block

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = ops.quantize_fp8(x, group_size=self.block[1])
        return ops.fp8_block_gemm(x_q, x_scale, layer.weight, getattr(layer, self.scale_name), self.block,
                                  self.dtype)


WeightFormat = Unquantized | Fp8PerChannel | Fp8Block


def _check_block_aligned_shards(layer: "Linear", block: tuple[int, int]) -> None:
    """Each rank's slice of a block-scaled weight must hold whole blocks, or its scales would straddle ranks."""
    block_n, block_k = block
    splits = [(f"{part or 'output'} rows", layer.checkpoint_parts[part], slices, block_n)
              for part, (slices, _) in layer.part_slices.items() if slices > 1]
    if layer.parallel == "row" and layer.tp_size > 1:
        splits.append(("input columns", layer.checkpoint_in_features, layer.tp_size, block_k))
    for what, size, slices, unit in splits:
        if size // slices % unit:
            raise ValueError(f"block-wise fp8 with blocks {list(block)} cannot shard {size} {what} over "
                             f"tensor_parallel_size {layer.tp_size}: each rank's {size // slices} is not a "
                             f"multiple of {unit}")


def _check_fp8(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype != FP8:
        raise ValueError(f"checkpoint tensor '{name}' is {tensor.dtype}; this fp8 checkpoint format stores "
                         "float8_e4m3fn weights")
    return tensor


@dataclass(frozen=True)
class QuantConfig:
    """Which weight format each linear layer gets. Layers named by `ignore` (checkpoint module names, exact,
    shell-style wildcards or 're:'-prefixed regular expressions) stay in the compute dtype, and so does lm_head
    always: published fp8 checkpoints store it unquantized, listed or not."""
    method: str                                      # where it came from, for messages and logs
    weight_scale: Literal["online", "channel", "tensor", "block"]
    block: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    static_input_scale: bool = False
    ignore: tuple[str, ...] = ()
    has_kv_cache_scales: bool = False

    def format_for(self, checkpoint_names: list[str], dtype: torch.dtype) -> WeightFormat:
        """The format of a layer holding these checkpoint modules (several for a fused layer)."""
        ignored = [name for name in checkpoint_names if self._ignores(name)]
        if ignored and len(ignored) != len(checkpoint_names):
            raise ValueError(f"{self.method} checkpoint quantizes only some of the fused projections "
                             f"{', '.join(checkpoint_names)} (unquantized: {', '.join(ignored)})")
        if ignored:
            return Unquantized(dtype)
        if self.weight_scale == "block":
            return Fp8Block(dtype, self.block, self.scale_name)
        return Fp8PerChannel(dtype, None if self.weight_scale == "online" else self.weight_scale,
                             self.static_input_scale)

    def _ignores(self, name: str) -> bool:
        return name == "lm_head" or any(re.match(pattern[3:], name) if pattern.startswith("re:") else fnmatchcase(name, pattern)
                   for pattern in self.ignore)

    def drops(self, checkpoint_name: str) -> bool:
        """Checkpoint tensors that load into nothing: an fp8-KV checkpoint's query and probability scales (the
        K/V scales load into the attention layers, see `kv_cache_scale`)."""
        return (self.has_kv_cache_scales and kv_cache_scale(checkpoint_name) is None
                and checkpoint_name.rpartition(".")[2] in _UNUSED_ATTENTION_SCALES)


def quant_config(model_dir: Path, config: dict, quantization: str | None) -> QuantConfig | None:
    """The checkpoint's own quantization (config.json `quantization_config`, or ModelOpt's
    hf_quant_config.json) when it has one; else online fp8 when `quantization="fp8"` was asked for; else None.
    An unsupported quantization_config is an error naming what was found, never a silent bf16 load."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization '{quantization}' is not supported; use one of {', '.join(QUANTIZATIONS)}")
    found = config.get("quantization_config")
    modelopt_file = model_dir / "hf_quant_config.json"
    if found is None and modelopt_file.is_file():
        found = {"quant_method": "modelopt", **json.loads(modelopt_file.read_text()).get("quantization", {})}
    if found is None:
        return QuantConfig("fp8 (online)", "online") if quantization else None
    method = found.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(found)
    if method == "fp8":
        return _fp8_method(found)
    if method == "modelopt":
        return _modelopt(found)
    raise ValueError(f"quantization_config with quant_method '{method}' is not supported: batchgen loads "
                     "fp8 checkpoints from compressed-tensors, 'fp8' (block-wise or per-tensor) and modelopt "
                     f"(found {json.dumps(found)[:300]})")


def _unsupported(method: str, what: str, found) -> ValueError:
    return ValueError(f"{method} checkpoint: {what} is not supported (found {json.dumps(found)[:300]})")


def _compressed_tensors(found: dict) -> QuantConfig:
    method = "compressed-tensors"
    groups = [group for group in found.get("config_groups", {}).values() if "Linear" in group.get("targets", [])]
    if len(groups) != 1:
        raise _unsupported(method, "anything but one config group targeting Linear", found.get("config_groups"))
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if (weights.get("type"), weights.get("num_bits")) != ("float", 8) or inputs is None or \
            (inputs.get("type"), inputs.get("num_bits")) != ("float", 8):
        raise _unsupported(method, "a scheme other than fp8 weights with fp8 activations", groups[0])
    strategy = weights.get("strategy")
    if strategy == "block":
        block = tuple(weights.get("block_structure") or ())
        if len(block) != 2 or not inputs.get("dynamic") or inputs.get("group_size") not in (None, block[1]):
            raise _unsupported(method, "block weights without dynamic per-group activations", groups[0])
        return QuantConfig(method, "block", block=block, ignore=tuple(found.get("ignore", [])),
                           has_kv_cache_scales=_compressed_tensors_kv_scheme(found))
    if strategy not in ("channel", "tensor"):
        raise _unsupported(method, f"weight strategy '{strategy}'", weights)
    # dynamic activations run per token whatever the checkpoint's granularity: finer than per tensor
    return QuantConfig(method, strategy, static_input_scale=not inputs.get("dynamic", False),
                       ignore=tuple(found.get("ignore", [])),
                       has_kv_cache_scales=_compressed_tensors_kv_scheme(found))


def _compressed_tensors_kv_scheme(found: dict) -> bool:
    """Whether the checkpoint carries KV-cache scales: per-tensor fp8 is the one kv_cache_scheme supported."""
    scheme = found.get("kv_cache_scheme")
    if scheme is None:
        return False
    if (scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy", "tensor")) != ("float", 8, "tensor") \
            or scheme.get("dynamic"):
        raise _unsupported("compressed-tensors", "a kv_cache_scheme other than static per-tensor fp8", scheme)
    return True


def _fp8_method(found: dict) -> QuantConfig:
    method = "fp8"
    if found.get("fmt", "e4m3") != "e4m3":
        raise _unsupported(method, f"fp8 format '{found.get('fmt')}'", found)
    ignore = tuple(found.get("modules_to_not_convert") or found.get("ignored_layers") or ())
    if found.get("weight_block_size"):
        if found.get("activation_scheme", "dynamic") != "dynamic":
            raise _unsupported(method, "block-wise weights with static activation scales", found)
        return QuantConfig(method, "block", block=tuple(found["weight_block_size"]), scale_name="weight_scale_inv",
                           ignore=ignore)
    return QuantConfig(method, "tensor", static_input_scale=found.get("activation_scheme") == "static",
                       ignore=ignore)


def _modelopt(found: dict) -> QuantConfig:
    if found.get("quant_algo") != "FP8":
        raise _unsupported("modelopt", f"quant_algo '{found.get('quant_algo')}'", found)
    kv_algo = found.get("kv_cache_quant_algo")
    if kv_algo not in (None, "FP8"):
        raise _unsupported("modelopt", f"kv_cache_quant_algo '{kv_algo}'", found)
    return QuantConfig("modelopt", "tensor", static_input_scale=True,
                       ignore=tuple(found.get("exclude_modules") or ()), has_kv_cache_scales=kv_algo is not None)
