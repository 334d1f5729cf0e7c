"""Check and time the mixture-of-experts path on one GPU (H200), one mode per call.

--mode kernels (~1 min): the fused MoE kernel against its torch reference (fp32, same inputs) at the
   Qwen3-30B-A3B (128 experts, top-8, hidden 2048, expert intermediate 768) and Mixtral-8x7B (8 experts, top-2,
   hidden 4096, intermediate 14336) expert shapes, 1 to 8192 tokens, with bf16 experts and fp8 experts (scales
   per row, and per [128, 128] block); at 8192 tokens (prefill) TFLOP/s beside a dense bf16 GEMM of the same
   work; at 256 tokens (decode) bytes of touched expert weights per second beside the card's bandwidth.
--mode logits (~1 min): bf16 logits of the engine (scheduler, chunked prefill, decode CUDA graphs, the fused
   kernel) against transformers bf16 on the same random weights, a few Qwen3-30B-A3B layers; and each of the two
   against transformers in fp32 on the same weights, with the share of (token, layer) routings where HF's bf16
   picks other experts than its fp32 (and where its bf16 router logits tie at the top-k boundary), and HF bf16
   made to pick fp32's experts: how much of the bf16 error is near-tied routing; and HF bf16 against itself run
   through its eager attention and eager experts loop (the distance two bf16 implementations of the same model
   keep). Gate: batchgen vs HF relative L2 < 2e-2 per sequence (the issue's bound).
--mode throughput --model qwen3-30b-a3b|mixtral-8x7b --workload W1|1000-1000: batchgen output tok/s on the
   full shape (dummy bf16 weights, outputs forced to full length), beside HF transformers' static `generate`
   (bf16, sdpa, its default grouped_mm experts) on the first --hf-sample of the same prompts, in the same run.
   HF runs first (built on the meta device, materialized and initialized on the GPU) and is freed before the
   engine sizes its KV cache from the free memory.

One JSON line per figure (card, commit), a short table on stderr; exit status 1 when a check fails.

    python benchmarks/moe_gpu.py --mode kernels
    python benchmarks/moe_gpu.py --mode throughput --model mixtral-8x7b --workload W1 --num-requests 1000
    python benchmarks/moe_gpu.py --mode throughput --model qwen3-30b-a3b --workload W1 --quantization fp8
    python benchmarks/moe_gpu.py --mode logits --smoke   # CPU: a reduced Qwen3-MoE shape, torch references
    python benchmarks/moe_gpu.py --mode kernels --smoke  # CPU: tiny shapes, Triton under the interpreter (fp16/fp32)
"""
import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {"W1": (512, 256), "1000-1000": (1000, 1000)}   # name: (prompt tokens, output tokens)
ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--mode", choices=["kernels", "logits", "throughput"], required=True)
ARGS.add_argument("--smoke", action="store_true", help="CPU, reduced or tiny shapes, Triton interpreter")
ARGS.add_argument("--model", choices=["qwen3-30b-a3b", "mixtral-8x7b"], default="qwen3-30b-a3b")
ARGS.add_argument("--workload", choices=list(WORKLOADS), default="W1")
ARGS.add_argument("--num-requests", type=int, default=1000)
ARGS.add_argument("--hf-sample", type=int, default=64, help="HF runs the first N of the same prompts (0: no HF run)")
ARGS.add_argument("--hf-batch", type=int, default=64, help="HF static batch size")
ARGS.add_argument("--hf-only", action="store_true", help="throughput mode: HF alone (its generate is slow here)")
ARGS.add_argument("--quantization", choices=["fp8"], help="throughput mode: batchgen with online fp8 weights "
                  "(the experts' too; HF stays bf16)")
ARGS.add_argument("--layers", type=int, default=4, help="logits mode: decoder layers of the Qwen3-30B-A3B shape")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from batchgen import LLM  # noqa: E402
from batchgen.bench import card_name, code_commit, make_workload, run_batchgen, run_hf_static  # noqa: E402
from batchgen.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, quantize_fp8_ref  # noqa: E402
from batchgen.kernels import fused_moe as fused_moe_module  # noqa: E402
from batchgen.kernels.activation import silu_and_mul_fp8_ref  # noqa: E402
from batchgen.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from batchgen.kernels.testing import TOLERANCE, bench_ms, relative_l2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu_correctness import CONFIGS, engine_logits, engine_with_weights, hf_random_model  # noqa: E402

SMOKE = OPTS.smoke
DEVICE = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float16 if SMOKE else torch.bfloat16   # the interpreter computes bf16 wrongly
SPEC_GBPS = 4800.0     # H200 HBM3e
PEAK_TFLOPS = 790.0    # H200 dense bf16 matmul, measured
FP8_BLOCK = (128, 128)
# name: (experts, top-k, hidden, expert intermediate)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
CHECK_TOKENS, PREFILL_TOKENS, DECODE_TOKENS = [1, 7, 256, 8192], 8192, 256
if SMOKE:
    # the interpreter rounds some values to fp8 wrongly (tests/kernels/test_fp8.py): the kernel's activations are
    # quantized by torch here, as the kernel tests do
    fused_moe_module.quantize_fp8 = quantize_fp8_ref
    fused_moe_module.silu_and_mul_fp8 = silu_and_mul_fp8_ref
    FP8_BLOCK = (16, 32)   # an fp8 dot's K is at least 32
    SHAPES = {"tiny-qwen3-moe": (8, 2, 64, 32), "tiny-mixtral": (4, 2, 64, 64)}
    CHECK_TOKENS, PREFILL_TOKENS, DECODE_TOKENS = [1, 7, 40], 40, 4
# the logits check's model: layers of the real shape on the GPU; on CPU the same experts, top-k, head_dim and
# proportions at a quarter of the width (and a smaller vocabulary), which a CPU runs in about a minute
REDUCED_QWEN3_MOE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                         moe_intermediate_size=192, intermediate_size=1536, vocab_size=16384)
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512, num_experts_per_tok=2)
TINY_EXPERTS = {"qwen3-30b-a3b": dict(num_experts=8, moe_intermediate_size=32),
                "mixtral-8x7b": dict(num_local_experts=4, intermediate_size=96)}
STARTED = time.perf_counter()
FAILED: list[str] = []
TABLE: list[str] = []


COMMIT = code_commit()


def emit(record: dict) -> None:
    record.update(card=card_name(DEVICE), commit=COMMIT, since_start_s=round(time.perf_counter() - STARTED, 1))
    print(json.dumps(record), flush=True)


def release_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# -- kernels ----------------------------------------------------------------------------------------------------
def quantize_experts(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (fp8 weights, fp32 scales [E, N] per row, or [E, N / block_n, K / block_k] per block), each
    scale the amax of its rows or block over 448, as checkpoints store them."""
    num_experts, rows, cols = weight.shape
    if block is None:
        quantized, scales = quantize_fp8_ref(weight.reshape(-1, cols))
        return quantized.view(weight.shape), scales.view(num_experts, rows)
    blocks = weight.float().view(num_experts, rows // block[0], block[0], cols // block[1], block[1])
    scales = (blocks.abs().amax(dim=(2, 4), keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    quantized = (blocks / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(weight.shape)
    return quantized, scales.view(num_experts, rows // block[0], cols // block[1])


def moe_inputs(shape, num_tokens: int, seed: int, weight_format: str = "bf16"):
    """Random activations, weights at the scale of a trained layer, softmax-top-k routing; fp8 formats add
    (gate_up_scale, down_scale, block)."""
    num_experts, top_k, hidden, intermediate = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=DEVICE) * scale).to(DTYPE)

    x = randn(num_tokens, hidden)
    w_gate_up = randn(num_experts, 2 * intermediate, hidden, scale=hidden ** -0.5)
    w_down = randn(num_experts, hidden, intermediate, scale=intermediate ** -0.5)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=DEVICE)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    if weight_format == "bf16":
        return x, w_gate_up, w_down, weights, ids
    block = FP8_BLOCK if weight_format == "fp8-block" else None
    (w_gate_up, gate_up_scale), (w_down, down_scale) = (quantize_experts(w, block) for w in (w_gate_up, w_down))
    return x, w_gate_up, w_down, weights, ids, gate_up_scale, down_scale, block


def check_kernel(name: str, shape, weight_format: str) -> None:
    for num_tokens in CHECK_TOKENS:
        x, *rest = moe_inputs(shape, num_tokens, seed=num_tokens, weight_format=weight_format)
        out = fused_moe(x, *rest)
        # bf16 experts: the reference in fp32 (activations and weights). fp8 experts: the kernel quantizes each
        # GEMM's input to fp8, so the reference takes the same bf16 input, rounds the gate-up product to bf16 as
        # the kernel does and quantizes it the same way (from fp32 sums, a bf16 rounding moves ~1 in 30 of those
        # values to the next fp8 step: ~0.018 rel. L2 on the H200, eleventh session)
        if weight_format == "bf16":
            ref = fused_moe_ref(x.float(), *(t.float() for t in rest[:2]), *rest[2:])
        else:
            ref = fused_moe_ref(x, *rest)
        error = relative_l2(out, ref)
        ok = error < TOLERANCE[DTYPE]
        if not ok:
            FAILED.append(f"fused_moe/{name}/{weight_format}/{num_tokens}")
        emit(dict(type="check", kernel="fused_moe", shape=name, experts=weight_format, tokens=num_tokens,
                  dtype=str(DTYPE)[6:], rel_l2=error, tolerance=TOLERANCE[DTYPE], ok=ok))


def time_prefill(name: str, shape, weight_format: str) -> None:
    num_experts, top_k, hidden, intermediate = shape
    x, *rest = moe_inputs(shape, PREFILL_TOKENS, seed=1, weight_format=weight_format)
    rows = PREFILL_TOKENS * top_k
    flops = 2 * rows * hidden * 3 * intermediate
    fused_ms = bench_ms(lambda: fused_moe(x, *rest), SMOKE)
    a1, b1 = (torch.randn(*size, device=DEVICE).to(DTYPE) for size in ((rows, hidden), (hidden, 2 * intermediate)))
    a2, b2 = (torch.randn(*size, device=DEVICE).to(DTYPE) for size in ((rows, intermediate), (intermediate, hidden)))
    dense_ms = bench_ms(lambda: (a1 @ b1, a2 @ b2), SMOKE)
    tflops = flops / fused_ms / 1e9
    emit(dict(type="time", kernel="fused_moe", case="prefill", shape=name, experts=weight_format,
              tokens=PREFILL_TOKENS, fused_ms=round(fused_ms, 3), fused_tflops=round(tflops, 1),
              dense_gemm_ms=round(dense_ms, 3), dense_gemm_tflops=round(flops / dense_ms / 1e9, 1),
              fused_vs_dense=round(dense_ms / fused_ms, 3), pct_peak=round(100 * tflops / PEAK_TFLOPS, 1)))
    TABLE.append(f"{name} {weight_format} prefill {PREFILL_TOKENS} tokens: {fused_ms:.3f} ms, {tflops:.0f} TFLOP/s "
                 f"(dense bf16 GEMM {dense_ms:.3f} ms)")


def copy_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written)."""
    src = torch.empty(1 << 28 if not SMOKE else 1 << 12, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src), SMOKE) / 1e6


def time_decode(name: str, shape, weight_format: str, measured_copy_gbps: float) -> None:
    num_experts, top_k, hidden, intermediate = shape
    x, *rest = moe_inputs(shape, DECODE_TOKENS, seed=2, weight_format=weight_format)
    w_gate_up, w_down, _, ids = rest[:4]
    touched = int(ids.unique().numel())
    nbytes = touched * 3 * hidden * intermediate * w_down.element_size()
    ms = bench_ms(lambda: fused_moe(x, *rest), SMOKE, cuda_graph=True)   # as decode steps run it
    gbps = nbytes / ms / 1e6
    emit(dict(type="time", kernel="fused_moe", case="decode", shape=name, experts=weight_format,
              tokens=DECODE_TOKENS, experts_touched=touched, weight_bytes=nbytes, ms=round(ms, 4),
              gbps=round(gbps, 1), pct_spec=round(100 * gbps / SPEC_GBPS, 1),
              pct_measured_copy=round(100 * gbps / measured_copy_gbps, 1)))
    TABLE.append(f"{name} {weight_format} decode {DECODE_TOKENS} tokens: {ms:.4f} ms, {gbps:.0f} GB/s of "
                 f"{nbytes / 1e9:.2f} GB ({100 * gbps / SPEC_GBPS:.0f}% of spec)")


def run_kernels() -> None:
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            for weight_format in ("bf16", "fp8-channel", "fp8-block"):
                check_kernel(name, shape, weight_format)
        measured = copy_gbps()
        emit(dict(type="time", kernel="device_copy", gbps=round(measured, 1)))
        for name, shape in SHAPES.items():
            for weight_format in ("bf16", "fp8-channel"):
                time_prefill(name, shape, weight_format)
                time_decode(name, shape, weight_format, measured)


# -- logits -----------------------------------------------------------------------------------------------------
def router_hooks(model, record: list, replay: list | None = None) -> list:
    """Forward hooks on HF's Qwen3-MoE routers: each call's (expert ids, whether each token's k-th and k+1-th
    router logits are equal: a tie that the index order decides) appended to `record`; with `replay`, the router
    instead picks the experts `replay` holds (recorded from another run of the same tokens), weighted as HF
    weights its own choice (fp32 softmax over all experts, renormalized over the chosen, model dtype)."""
    def hook(module, args, output):
        logits, weights, ids = output
        boundary = logits.float().topk(ids.shape[-1] + 1, dim=-1).values[:, -2:]
        record.append((ids, boundary[:, 0] == boundary[:, 1]))
        if replay is None:
            return None
        ids = replay[len(record) - 1][0]
        chosen = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, ids)
        return logits, (chosen / chosen.sum(-1, keepdim=True)).to(weights.dtype), ids

    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    return [router.register_forward_hook(hook) for router in routers]


def hf_logits(model, sequences: list[list[int]], replay: list | None = None) -> tuple[list[torch.Tensor], list]:
    """HF's logits of each whole sequence (fp32, CPU) and its routers' `router_hooks` records, call by call."""
    record: list = []
    hooks = router_hooks(model, record, replay)
    with torch.inference_mode():
        logits = [model(torch.tensor([seq], device=DEVICE)).logits[0].float().cpu() for seq in sequences]
    for hook in hooks:
        hook.remove()
    return logits, record


def run_logits() -> None:
    overrides = {"num_hidden_layers": OPTS.layers, **(REDUCED_QWEN3_MOE if SMOKE else {})}
    config_dir = Path(tempfile.mkdtemp()) / "qwen3-30b-a3b"
    AutoConfig.from_pretrained(CONFIGS / "qwen3-30b-a3b", **overrides).save_pretrained(config_dir)
    hf = hf_random_model(config_dir, torch.bfloat16, DEVICE, seed=1, overrides={})
    gen = torch.Generator().manual_seed(0)   # the sequences of the figure at 6f10cc8 (docs/benchmarks.md)
    count, max_len = (8, 200) if SMOKE else (16, 600)
    lengths = torch.randint(8, max_len, (count,), generator=gen).tolist()
    sequences = [torch.randint(hf.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    prompt_lens = [max(1, n - 8) for n in lengths]
    engine_args = {} if SMOKE else {"gpu_memory_utilization": 0.5, "max_num_seqs": 32}
    llm = engine_with_weights(config_dir, hf, "bfloat16", max_num_batched_tokens=128 if SMOKE else 512,
                              max_model_len=max_len + 16, device=str(DEVICE), **engine_args)
    graphs = llm.engine.runner.decode_graphs is not None
    ours = engine_logits(llm, sequences, prompt_lens)
    llm.close()
    del llm
    release_memory()
    hf_bf16, bf16_routing = hf_logits(hf, sequences)
    fp32_model = copy.deepcopy(hf).float()
    fp32_model.set_experts_implementation("eager")   # torch's grouped GEMM may take bf16 only on CUDA
    fp32, fp32_routing = hf_logits(fp32_model, sequences)
    del fp32_model
    hf_bf16_fp32_routing, _ = hf_logits(hf, sequences, replay=fp32_routing)
    # HF against itself: the same bf16 model through its eager attention and its eager experts loop
    default_implementations = hf.config._attn_implementation, hf.config._experts_implementation
    hf.set_attn_implementation("eager")
    hf.set_experts_implementation("eager")
    hf_bf16_eager, _ = hf_logits(hf, sequences)
    other_experts = sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())
                        for (a, _), (b, _) in zip(bf16_routing, fp32_routing))
    tied = sum(int(ties.sum()) for _, ties in bf16_routing)
    routings = sum(ids.shape[0] for ids, _ in fp32_routing)

    def errors(outs, refs):
        values = [relative_l2(out, ref) for out, ref in zip(outs, refs)]
        return {"max": round(max(values), 5), "mean": round(sum(values) / len(values), 5)}

    figures = {"batchgen_vs_hf_bf16": errors(ours, hf_bf16), "batchgen_vs_fp32": errors(ours, fp32),
               "hf_bf16_vs_fp32": errors(hf_bf16, fp32),
               "hf_bf16_with_fp32_routing_vs_fp32": errors(hf_bf16_fp32_routing, fp32),
               "hf_bf16_eager_vs_hf_bf16": errors(hf_bf16_eager, hf_bf16)}
    ok = figures["batchgen_vs_hf_bf16"]["max"] < 2e-2
    if not ok:
        FAILED.append("logits")
    shape = {k: getattr(hf.config, k) for k in ("num_hidden_layers", "hidden_size", "num_experts",
                                                 "num_experts_per_tok", "moe_intermediate_size", "vocab_size")}
    emit(dict(type="check", check="bf16 logits vs HF bf16 and HF fp32", model="qwen3-30b-a3b", shape=shape,
              sequences=len(sequences), max_len=max(lengths), cuda_graphs=graphs, **figures,
              hf_bf16_routings_with_other_experts_than_fp32=f"{other_experts}/{routings}",
              hf_bf16_routings_tied_at_top_k=f"{tied}/{routings}",
              hf_bf16_implementations=default_implementations, ok=ok))
    for name, value in figures.items():
        TABLE.append(f"{name:36s} max {value['max']:.4f}  mean {value['mean']:.4f}")
    TABLE.append(f"HF bf16 routings (token, layer) with other experts than fp32: {other_experts}/{routings}; "
                 f"with the k-th and k+1-th bf16 router logits equal: {tied}/{routings}")


# -- throughput -------------------------------------------------------------------------------------------------
def hf_model_on_device(config_dir: Path, dtype: torch.dtype):
    """HF's model built on the meta device, then given storage on DEVICE and initialized there by HF's own
    init (normal std initializer_range, norms 1, rotary tables recomputed): nothing allocated on the CPU."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=dtype,
                                                 attn_implementation="sdpa")
    model.to_empty(device=DEVICE)
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def run_throughput() -> None:
    input_len, output_len = WORKLOADS[OPTS.workload]
    config_dir = CONFIGS / OPTS.model
    engine_args = dict(max_model_len=-(-(input_len + output_len) // 1024) * 1024)   # as `batchgen bench` runs them
    if SMOKE:   # a tiny model of the same architecture, short prompts
        config_dir = Path(tempfile.mkdtemp()) / OPTS.model
        AutoConfig.from_pretrained(CONFIGS / OPTS.model, **TINY, **TINY_EXPERTS[OPTS.model]).save_pretrained(config_dir)
        input_len, output_len = input_len // 32, output_len // 32
        engine_args = dict(max_model_len=input_len + output_len, max_num_batched_tokens=64)
    name = f"{OPTS.model}-{OPTS.workload}"
    vocab_size = AutoConfig.from_pretrained(config_dir).vocab_size
    workload = make_workload(name, OPTS.num_requests, input_len, output_len, vocab_size)
    # HF first: a plain module frees all its memory when deleted, so the engine then sizes its cache from a
    # card holding nothing else
    hf_figures = None
    if OPTS.hf_sample:
        hf = hf_model_on_device(config_dir, torch.bfloat16)
        hf_figures = run_hf_static(hf, workload.sample(OPTS.hf_sample), OPTS.hf_batch)
        del hf
        release_memory()
        emit({"type": "throughput", "model": OPTS.model, **hf_figures})
    if OPTS.hf_only:
        return
    llm = LLM(str(config_dir), load_format="dummy", dtype="bfloat16", device=str(DEVICE), seed=0,
              quantization=OPTS.quantization, generation_config="none", **engine_args)
    figures, _ = run_batchgen(llm, workload)
    llm.close()
    emit({"type": "throughput", "model": OPTS.model, **figures})
    TABLE.append(f"batchgen   {name}: {figures['requests']} requests, {figures['output_tok_per_s']:,.0f} output "
                 f"tok/s, {figures['elapsed_s']} s")
    if hf_figures is None:
        return
    ratio = figures["output_tok_per_s"] / hf_figures["output_tok_per_s"]
    emit({"type": "throughput_ratio", "model": OPTS.model, "workload": name,
          "batchgen_vs_hf_static_output_tok_per_s": round(ratio, 2)})
    TABLE.append(f"hf-static  {name}: {hf_figures['requests']} requests, {hf_figures['output_tok_per_s']:,.0f} output "
                 f"tok/s, {hf_figures['elapsed_s']} s")
    TABLE.append(f"batchgen / HF static: {ratio:.2f}x")


def main() -> int:
    {"kernels": run_kernels, "logits": run_logits, "throughput": run_throughput}[OPTS.mode]()
    print("\n".join([f"moe_gpu.py --mode {OPTS.mode} ({card_name(DEVICE)}, {COMMIT})", *TABLE]), file=sys.stderr)
    emit(dict(type="summary", mode=OPTS.mode, failed=FAILED, ok=not FAILED))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
