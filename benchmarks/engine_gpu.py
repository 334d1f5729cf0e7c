"""KV cache sizing from measured memory, checked on the GPU; and throughput on TensorRT-LLM's shapes against the
cost model, with HF transformers in the same run.

The engine sizes its cache at start from a profiling run of its own step at the token budget (and the sampler
on max_num_seqs rows) plus the decode CUDA graphs' pool. This script builds the engine on a real-shaped
model with dummy weights, prints the capacity and the measured figures, then runs the heaviest work the
engine can schedule (full-budget prefill steps, max_num_seqs decode rows with top-p, top-k, penalties and
20 logprobs) and checks that the process's peak on the card (torch's reserved memory at its peak, plus what the CUDA
context and libraries hold) stays within gpu_memory_utilization and that the cache holds
what the log says. One JSON line per figure; exit 1 if a check fails.

    python benchmarks/engine_gpu.py                      # Llama-3.1-8B shape on the GPU (~2 min on an H200)
    python benchmarks/engine_gpu.py --smoke              # tiny model on CPU: the script's path only

Throughput (`--shape`): Llama-3.1-8B shape, dummy weights, random prompts, outputs forced to full length,
temperature 1; one JSON line per batchgen run (one per `--quantization`, `--kv-cache-dtype` and `--kv-admission`
given; `--paired` runs fp8 weights with fp8 KV and bf16 with bf16 KV, as below, not all four) with its
figures, the cost model's prediction (benchmarks/cost_model.py) and predicted / measured, then HF transformers'
static `generate` (bf16) on the first `--hf-sample` prompts. Request counts default to the issue's (TensorRT-LLM's:
3,000, 1,500 for 2048/2048; W1: 1,000).

    python benchmarks/engine_gpu.py --shape 1000/1000 --quantization fp8 --kv-cache-dtype auto fp8
    python benchmarks/engine_gpu.py --shape 128/2048 --quantization fp8 none --kv-cache-dtype fp8 auto --paired
    python benchmarks/engine_gpu.py --smoke --shape w1 --kv-cache-dtype auto fp8 --hf-sample 4

Where a step's time goes (`--profile-decode ROWS CONTEXT`, `--profile-prefill PROMPTS CONTEXT`): ROWS requests
with CONTEXT-token prompts generate long enough that all of them are still running once the last prompt has run,
and torch.profiler records the decode steps of all ROWS sequences together (until the first one ends); or PROMPTS
prompts of CONTEXT tokens are prefilled (one output token each) and it records the steps that fill the token
budget (with `--profile-output-len N` > 1 the earlier prompts decode meanwhile: mixed steps, as in W1's first
steps). The GPU kernels' time per step is printed by kernel (one JSON line, top kernels first) beside the step's
wall time. ROWS 856 / CONTEXT 1500 is the 1000/1000 fp8 + fp8 KV run's mean decode step; 2048-token prompts are
TensorRT-LLM's 2048/128 shape, whose time is nearly all prefill:

    python benchmarks/engine_gpu.py --profile-decode 856 1500 --quantization fp8 --kv-cache-dtype fp8
    python benchmarks/engine_gpu.py --profile-prefill 96 2048 --quantization fp8 --kv-cache-dtype fp8
    python benchmarks/engine_gpu.py --config llama-3.1-70b --profile-decode 152 1500 --quantization fp8 \
        --kv-cache-dtype fp8 --gpu-memory-utilization 0.97     # the 70B 1000/1000 run's mean decode step
    python benchmarks/engine_gpu.py --profile-prefill 1000 512 --profile-output-len 256   # W1's mixed steps
"""
import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchgen import LLM, SamplingParams
from batchgen.config import EngineConfig
from batchgen.bench import _release_memory, load_hf_model, make_workload, run_batchgen, run_hf_static
from cost_model import predict

CONFIGS = Path(__file__).parent / "configs"
# name -> (input tokens, output tokens, requests): TensorRT-LLM's published H200 shapes and batchgen's W1
SHAPES = {"w1": (512, 256, 1000), "1000/1000": (1000, 1000, 3000), "2048/128": (2048, 128, 3000),
          "128/2048": (128, 2048, 3000), "500/2000": (500, 2000, 3000), "2048/2048": (2048, 2048, 1500)}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32"}


def emit(figure: str, **fields) -> None:
    print(json.dumps({"figure": figure, **fields}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(p.name for p in CONFIGS.iterdir()),
                        help="the architecture (a directory of benchmarks/configs)")
    parser.add_argument("--kv-cache-dtype", nargs="+", choices=["auto", "fp8"], default=["auto"],
                        help="one run per value (throughput); the sizing check takes the first")
    parser.add_argument("--quantization", nargs="+", choices=["none", "fp8"], default=["none"],
                        help="weights (fp8: quantized while they load): one throughput run per value, in the order "
                             "given; the other modes take the first")
    parser.add_argument("--paired", action="store_true",
                        help="throughput: pair the i-th --quantization with the i-th --kv-cache-dtype instead of "
                             "running every combination")
    parser.add_argument("--kv-admission", nargs="+", choices=["reserve", "greedy"], default=["reserve"],
                        help="throughput: one run per value and weight / KV format (the scheduler's admission policy)")
    parser.add_argument("--shape", choices=SHAPES, help="throughput on this shape instead of the sizing check")
    parser.add_argument("--num-requests", type=int, help="default: the shape's (the issue's request counts)")
    parser.add_argument("--profile-decode", nargs=2, type=int, metavar=("ROWS", "CONTEXT"),
                        help="kernel time of decode steps at ROWS sequences of CONTEXT tokens")
    parser.add_argument("--profile-prefill", nargs=2, type=int, metavar=("PROMPTS", "CONTEXT"),
                        help="kernel time of the full-budget steps that prefill PROMPTS prompts of CONTEXT tokens")
    parser.add_argument("--profile-output-len", type=int, default=1,
                        help="with --profile-prefill: tokens each prompt generates; above 1 the full-budget steps "
                             "are mixed (the earlier prompts decode beside the later ones' prefill, as in W1's first "
                             "steps)")
    parser.add_argument("--hf-sample", type=int, default=64,
                        help="HF static generate on this many of the prompts, one batch (0: no HF run)")
    args = parser.parse_args()
    if args.smoke:
        model_dir = Path(tempfile.mkdtemp()) / "tiny"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(TINY))
        engine_args = dict(device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=64)
    else:
        model_dir = CONFIGS / args.config
        engine_args = dict(device="cuda", gpu_memory_utilization=args.gpu_memory_utilization)
    engine_args["quantization"] = _quantization(args.quantization[0])
    if args.profile_decode or args.profile_prefill:
        return profile_steps(args, model_dir, engine_args | dict(kv_cache_dtype=args.kv_cache_dtype[0]))
    if args.shape:
        return throughput(args, model_dir, engine_args)
    return kv_sizing_check(args, model_dir, engine_args | dict(kv_cache_dtype=args.kv_cache_dtype[0]))


def kv_sizing_check(args, model_dir: Path, engine_args: dict) -> int:
    if args.smoke:
        num_requests, prompt_len, output_len = 24, 40, 8
    else:
        engine_args["max_model_len"] = 2048
        num_requests, prompt_len, output_len = 1024, 512, 64
    start = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", **engine_args)
    engine = llm.engine
    profile = engine.memory_profile
    emit("kv_capacity", model=model_dir.name, kv_cache_dtype=str(engine.runner.kv_cache_dtype),
         kv_capacity_tokens=engine.kv_capacity_tokens,
         kv_blocks=engine.kv_cache.num_blocks, block_size=engine.kv_cache.block_size,
         step_peak_gib=None if profile is None else round(profile.step_peak_bytes / 2**30, 3),
         graph_pool_gib=None if profile is None else round(profile.graph_pool_bytes / 2**30, 3),
         max_num_seqs=engine.scheduler.max_num_seqs, max_num_batched_tokens=engine.scheduler.max_num_batched_tokens,
         cuda_graphs=engine.runner.decode_graphs is not None, startup_s=round(time.perf_counter() - start, 1))

    failed = []
    cache_bytes = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    capacity_ok = cache_bytes == engine.kv_cache.num_blocks * engine.runner.kv_bytes_per_block
    emit("kv_cache_bytes", gib=round(cache_bytes / 2**30, 3), matches_capacity=capacity_ok)
    if not capacity_ok:
        failed.append("kv_cache_bytes")

    vocab = engine.model_config.vocab_size
    prompts = [[(i * 131 + j) % vocab for j in range(prompt_len)] for i in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0, top_p=0.9, top_k=50,
                            min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5, logprobs=20)
    outside_torch = 0
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
        free, total = torch.cuda.mem_get_info(engine.device)
        outside_torch = total - free - torch.cuda.memory_reserved(engine.device)   # CUDA context, libraries
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    errors = [o.error for o in outputs if o.error]
    if errors:
        failed.append("heavy_run")
    fields = dict(requests=num_requests, prompt_len=prompt_len, output_len=output_len, seconds=round(elapsed, 1),
                  errors=len(errors), preemptions=sum(o.num_preemptions for o in outputs))
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(engine.device) + outside_torch
        within = peak <= total * args.gpu_memory_utilization
        fields.update(peak_gib=round(peak / 2**30, 3), outside_torch_gib=round(outside_torch / 2**30, 3),
                      peak_allocated_gib=round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 3),
                      card_gib=round(total / 2**30, 3),
                      utilization_share_gib=round(total * args.gpu_memory_utilization / 2**30, 3),
                      peak_within_share=within)
        if not within:
            failed.append("peak_within_share")
    emit("heavy_run", **fields)
    llm.close()
    emit("summary", failed=failed)
    return 1 if failed else 0


def _quantization(value: str) -> str | None:
    return None if value == "none" else value


def throughput(args, model_dir: Path, engine_args: dict) -> int:
    """batchgen on the shape's prompts, once per weight format, KV dtype and admission, each figure against the
    cost model; then HF."""
    input_len, output_len, num_requests = SHAPES[args.shape]
    if args.smoke:
        input_len, output_len = min(input_len, 48), min(output_len, 16)
    num_requests = args.num_requests or (16 if args.smoke else num_requests)
    engine_args = engine_args | dict(max_model_len=input_len + output_len, seed=0, generation_config="none")
    workload = None
    if args.paired and len(args.quantization) != len(args.kv_cache_dtype):
        print("engine_gpu.py: --paired needs as many --quantization values as --kv-cache-dtype values",
              file=sys.stderr)
        return 2
    formats = (list(zip(args.quantization, args.kv_cache_dtype)) if args.paired
               else list(itertools.product(args.quantization, args.kv_cache_dtype)))
    for (quantization, kv_cache_dtype), kv_admission in itertools.product(formats, args.kv_admission):
        weights = "fp8" if quantization == "fp8" else "bf16"
        llm = LLM(str(model_dir), load_format="dummy", kv_cache_dtype=kv_cache_dtype, kv_admission=kv_admission,
                  **engine_args | dict(quantization=_quantization(quantization)))
        engine = llm.engine
        if workload is None:
            workload = make_workload(args.shape, num_requests, input_len, output_len, engine.model_config.vocab_size)
        figures, _ = run_batchgen(llm, workload)
        emit("throughput", model=model_dir.name, weights=weights, kv_admission=kv_admission, **figures,
             **against_cost_model(figures, engine.model_config, weights, engine.runner.kv_cache_dtype.itemsize,
                                  input_len, output_len))
        model_path, model_config, dtype, device = engine.model_path, engine.model_config, engine.dtype, engine.device
        llm.close()
        del llm, engine
        _release_memory()
    if args.hf_sample:
        dtype = torch.bfloat16 if device.type == "cuda" else dtype
        hf_model = load_hf_model(model_path, dtype, device, dummy=True)
        sample = workload.sample(args.hf_sample)
        figures = run_hf_static(hf_model, sample, batch_size=len(sample.prompts))
        emit("throughput", model=model_dir.name, weights="bf16", **figures,
             **against_cost_model(figures, model_config, "bf16", dtype.itemsize, input_len, output_len))
    return 0


def profile_steps(args, model_dir: Path, engine_args: dict) -> int:
    """GPU kernel time per step, by kernel: decode steps with all ROWS sequences running at about CONTEXT tokens,
    or (--profile-prefill) the steps that fill the token budget with PROMPTS prompts of CONTEXT tokens."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    prefill = args.profile_prefill is not None
    rows, context = args.profile_prefill or args.profile_decode
    window = 8 if args.smoke else 32 if prefill else 48   # steps profiled
    budget = EngineConfig(model=str(model_dir), **engine_args).resolved_max_num_batched_tokens(
        torch.device(engine_args["device"]))
    # decode: each prompt's first token comes with its last prefill chunk, so the first rows generate while later
    # ones fill; outputs outlast the prefill of the last prompt by the window
    output_len = args.profile_output_len if prefill else -(-rows * context // budget) + window + 2
    engine_args = engine_args | dict(max_model_len=context + output_len, max_num_seqs=max(rows, 8))
    llm = LLM(str(model_dir), load_format="dummy", seed=0, generation_config="none", **engine_args)
    engine = llm.engine
    workload = make_workload("profile", rows, context, output_len, engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.generate(workload.prompts[:4], params)   # compile and capture outside the profile
    cuda = engine.device.type == "cuda"
    profiler = profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU])
    profiled_steps = []
    end = None

    def full(launched) -> bool:   # a step of the kind profiled, at its full size
        if prefill:
            return launched.num_tokens == budget
        return launched.num_tokens == len(launched) == rows

    def on_step(launched, taken) -> None:
        # from the first full step, up to and including the first step after it that is not full (or the window)
        nonlocal end
        if end is not None or not launched or (not profiled_steps and not full(launched)):
            return
        if not profiled_steps:
            profiler.start()
        profiled_steps.append((time.perf_counter(), len(launched), launched.num_tokens))
        if not full(launched) or len(profiled_steps) == window:
            if cuda:
                torch.cuda.synchronize(engine.device)
            end = time.perf_counter()
            profiler.stop()

    engine.on_step = on_step
    llm.generate(workload.prompts, params)
    llm.close()
    if end is None:
        print(f"profile: no step ran {'a full token budget' if prefill else f'all {rows} rows together'} "
              "(KV cache too small?)", file=sys.stderr)
        return 1
    steps = len(profiled_steps)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    by_kernel: dict[str, float] = {}
    for event in profiler.events():
        if event.device_type == kind and (cuda or event.cpu_parent is None):
            by_kernel[event.name] = by_kernel.get(event.name, 0.0) + event.time_range.elapsed_us()
    busy_ms = sum(by_kernel.values()) / 1e3
    top = sorted(by_kernel.items(), key=lambda item: -item[1])[:20]
    emit("prefill_profile" if prefill else "decode_profile", model=model_dir.name,
         quantization=engine_args["quantization"],
         kv_cache_dtype=str(engine.runner.kv_cache_dtype).removeprefix("torch."), rows=rows, context=context,
         steps=steps, mean_rows=round(sum(n for _, n, _ in profiled_steps) / steps, 1),
         mean_tokens=round(sum(n for _, _, n in profiled_steps) / steps, 1),
         wall_ms_per_step=round((end - profiled_steps[0][0]) * 1e3 / steps, 3),
         kernel_ms_per_step=round(busy_ms / steps, 3),
         kernels=[{"name": name[:120], "ms_per_step": round(us / 1e3 / steps, 4),
                   "share": round(us / 1e3 / busy_ms, 4)} for name, us in top])
    return 0


def against_cost_model(figures: dict, config, weights: str, kv_element_bytes: int, input_len: int,
                       output_len: int) -> dict:
    """The cost model's prediction for the run these figures measured, and predicted / measured."""
    model = predict(config, weights, kv_element_bytes, figures["requests"], input_len, output_len)
    return dict(predicted_s=_significant(model.total_s), of_model=_significant(model.total_s / figures["elapsed_s"]),
                predicted_output_tok_per_s=_significant(figures["requests"] * output_len / model.total_s),
                predicted_prefill_s=_significant(model.prefill_s), predicted_decode_s=_significant(model.decode_s),
                predicted_decode_kv_s=_significant(model.decode_kv_s))


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


if __name__ == "__main__":
    sys.exit(main())
