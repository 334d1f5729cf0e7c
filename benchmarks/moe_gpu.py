"""Check and time the mixture-of-experts path on one GPU (H200), in one process, well under 3 minutes.

1. The fused MoE kernel against its torch reference (run in fp32 on the same inputs), bf16, at the Qwen3-30B-A3B
   (128 experts, top-8, hidden 2048, expert intermediate 768) and Mixtral-8x7B (8 experts, top-2, hidden 4096,
   intermediate 14336) expert shapes, from 1 to 8192 tokens.
2. Prefill token counts (8192): the kernel's TFLOP/s beside a dense bf16 GEMM (torch) doing the same work
   (the gate-up and down products of all T*K rows, without grouping).
3. Decode token counts (256): bytes of the expert weights the step touches (the distinct experts chosen) per
   second, beside the card's spec bandwidth and a measured device copy.
4. bf16 logits of the engine (scheduler, chunked prefill, decode CUDA graphs, the fused kernel) against
   transformers on the same random weights for a few Qwen3-30B-A3B layers: relative L2 per sequence < 2e-2.

One JSON line per figure; exit status 1 when a check fails.

    python benchmarks/moe_gpu.py            # GPU
    python benchmarks/moe_gpu.py --smoke    # CPU, tiny shapes, Triton under the interpreter (fp16/fp32)
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from batchgen.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from batchgen.kernels.testing import TOLERANCE, bench_ms, relative_l2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu_correctness import CONFIGS, engine_with_weights, hf_random_model, logits_errors_vs_hf  # noqa: E402

SMOKE = OPTS.smoke
DEVICE = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float16 if SMOKE else torch.bfloat16   # the interpreter computes bf16 wrongly
SPEC_GBPS = 4800.0     # H200 HBM3e
PEAK_TFLOPS = 790.0    # H200 dense bf16 matmul, measured
# name: (experts, top-k, hidden, expert intermediate)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
CHECK_TOKENS, PREFILL_TOKENS, DECODE_TOKENS = [1, 7, 256, 8192], 8192, 256
if SMOKE:
    SHAPES = {"tiny-qwen3-moe": (8, 2, 64, 32), "tiny-mixtral": (4, 2, 64, 48)}
    CHECK_TOKENS, PREFILL_TOKENS, DECODE_TOKENS = [1, 7, 40], 40, 4
STARTED = time.perf_counter()
FAILED: list[str] = []


def emit(record: dict) -> None:
    record["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
    print(json.dumps(record), flush=True)


def moe_inputs(shape, num_tokens: int, seed: int):
    """Random activations, weights at the scale of a trained layer, and softmax-top-k routing."""
    num_experts, top_k, hidden, intermediate = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=DEVICE) * scale).to(DTYPE)

    x = randn(num_tokens, hidden)
    w_gate_up = randn(num_experts, 2 * intermediate, hidden, scale=hidden ** -0.5)
    w_down = randn(num_experts, hidden, intermediate, scale=intermediate ** -0.5)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=DEVICE)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return x, w_gate_up, w_down, weights, ids


def check_kernel(name: str, shape) -> None:
    for num_tokens in CHECK_TOKENS:
        inputs = moe_inputs(shape, num_tokens, seed=num_tokens)
        out = fused_moe(*inputs)
        ref = fused_moe_ref(*(x.float() if x.is_floating_point() else x for x in inputs))
        error = relative_l2(out, ref)
        ok = error < TOLERANCE[DTYPE]
        if not ok:
            FAILED.append(f"fused_moe/{name}/{num_tokens}")
        emit(dict(type="check", kernel="fused_moe", shape=name, tokens=num_tokens, dtype=str(DTYPE)[6:],
                  rel_l2=error, tolerance=TOLERANCE[DTYPE], ok=ok))


def time_prefill(name: str, shape) -> None:
    num_experts, top_k, hidden, intermediate = shape
    x, w_gate_up, w_down, weights, ids = moe_inputs(shape, PREFILL_TOKENS, seed=1)
    rows = PREFILL_TOKENS * top_k
    flops = 2 * rows * hidden * 3 * intermediate
    fused_ms = bench_ms(lambda: fused_moe(x, w_gate_up, w_down, weights, ids), SMOKE)
    a1, b1 = torch.randn(rows, hidden, device=DEVICE).to(DTYPE), w_gate_up[0].T.contiguous()
    a2, b2 = torch.randn(rows, intermediate, device=DEVICE).to(DTYPE), w_down[0].T.contiguous()
    dense_ms = bench_ms(lambda: (a1 @ b1, a2 @ b2), SMOKE)
    emit(dict(type="time", kernel="fused_moe", case="prefill", shape=name, tokens=PREFILL_TOKENS,
              fused_ms=round(fused_ms, 3), fused_tflops=round(flops / fused_ms / 1e9, 1),
              dense_gemm_ms=round(dense_ms, 3), dense_gemm_tflops=round(flops / dense_ms / 1e9, 1),
              fused_vs_dense=round(dense_ms / fused_ms, 3), pct_peak=round(100 * flops / fused_ms / 1e9 / PEAK_TFLOPS, 1)))


def copy_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written)."""
    src = torch.empty(1 << 28 if not SMOKE else 1 << 12, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src), SMOKE) / 1e6


def time_decode(name: str, shape, measured_copy_gbps: float) -> None:
    num_experts, top_k, hidden, intermediate = shape
    x, w_gate_up, w_down, weights, ids = moe_inputs(shape, DECODE_TOKENS, seed=2)
    touched = int(ids.unique().numel())
    nbytes = touched * 3 * hidden * intermediate * w_down.element_size()
    ms = bench_ms(lambda: fused_moe(x, w_gate_up, w_down, weights, ids), SMOKE)
    gbps = nbytes / ms / 1e6
    emit(dict(type="time", kernel="fused_moe", case="decode", shape=name, tokens=DECODE_TOKENS,
              experts_touched=touched, weight_bytes=nbytes, ms=round(ms, 4), gbps=round(gbps, 1),
              pct_spec=round(100 * gbps / SPEC_GBPS, 1), pct_measured_copy=round(100 * gbps / measured_copy_gbps, 1)))


def check_logits() -> None:
    """gpu_correctness's logits check on a few layers of the Qwen3-30B-A3B shape (or a tiny one on --smoke)."""
    overrides = {"num_hidden_layers": 4}
    if SMOKE:
        overrides = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 16, "vocab_size": 512, "num_experts": 8, "num_experts_per_tok": 2,
                     "moe_intermediate_size": 32, "intermediate_size": 96}
    config_dir = Path(tempfile.mkdtemp()) / "qwen3-30b-a3b"
    AutoConfig.from_pretrained(CONFIGS / "qwen3-30b-a3b", **overrides).save_pretrained(config_dir)
    hf = hf_random_model(config_dir, torch.bfloat16, DEVICE, seed=1, overrides={})
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 40 if SMOKE else 600, (16,), generator=gen).tolist()
    sequences = [torch.randint(hf.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    prompt_lens = [max(1, n - 8) for n in lengths]
    engine_args = {} if SMOKE else {"gpu_memory_utilization": 0.5, "max_num_seqs": 32}
    llm = engine_with_weights(config_dir, hf, "bfloat16", max_num_batched_tokens=64 if SMOKE else 512,
                              max_model_len=max(lengths) + 16, device=str(DEVICE), **engine_args)
    errors = logits_errors_vs_hf(llm, hf, sequences, prompt_lens, DEVICE)
    ok = max(errors) < 2e-2
    if not ok:
        FAILED.append("logits")
    emit(dict(type="check", check="bf16 logits vs HF", model="qwen3-30b-a3b", layers=overrides["num_hidden_layers"],
              sequences=len(sequences), max_rel_l2=max(errors), mean_rel_l2=sum(errors) / len(errors),
              cuda_graphs=llm.engine.runner.decode_graphs is not None, ok=ok))


def main() -> int:
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            check_kernel(name, shape)
        measured = copy_gbps()
        emit(dict(type="time", kernel="device_copy", gbps=round(measured, 1)))
        for name, shape in SHAPES.items():
            time_prefill(name, shape)
            time_decode(name, shape, measured)
    check_logits()
    emit(dict(type="summary", failed=FAILED, ok=not FAILED))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
