"""fp8 on the GPU: kernel checks against their references, fp8-vs-bf16 logits of a Llama-8B-shaped model, and
fp8 vs bf16 GEMM timings at Llama-8B shapes. One JSON line per figure; exits 1 if a check fails.

    python benchmarks/fp8_gpu.py            # H200, bf16 (a few minutes)
    python benchmarks/fp8_gpu.py --smoke    # CPU, tiny shapes, Triton interpreter: proves the script runs
    python benchmarks/fp8_gpu.py --decode-gemms  # only the projections at decode row counts (~1 min)
    python benchmarks/fp8_gpu.py --prefill-gemms  # only a layer's projections at token budgets (~1 min)
"""
import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
ARGS.add_argument("--decode-gemms", action="store_true",
                  help="only the projections at decode row counts, Llama-8B and -70B shapes, fp8 two ways and bf16")
ARGS.add_argument("--prefill-gemms", action="store_true",
                  help="only a Llama-8B layer's projections at token budgets near 8,192 and 16,384: bf16 through "
                       "cuBLAS and through cuBLASLt, fp8; microseconds a token")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchgen import LLM  # noqa: E402
from batchgen.kernels import fp8, ops  # noqa: E402
from batchgen.kernels.testing import relative_l2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu_correctness import engine_logits  # noqa: E402

LLAMA_8B = Path(__file__).parent / "configs" / "llama-3.1-8b"
# (name, N, K) of Llama-3.1-8B's projections
GEMMS = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096), ("down_proj", 4096, 14336)]
GEMMS_70B = [("qkv_proj", 10240, 8192), ("o_proj", 8192, 8192), ("gate_up_proj", 57344, 8192),
             ("down_proj", 8192, 28672)]
# row counts of decode steps: multiples of 128 and the sizes between them that decode graphs had before
DECODE_GEMM_ROWS = [16, 64, 128, 160, 192, 224, 256, 320, 384, 416, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024]
# prefill token budgets around 8,192 and 16,384: at 8,448 rows, 128 x 256 output tiles would fill whole waves of every
# 8B projection on 132 SMs; it ran no faster a token than 8,192 (docs/benchmarks.md, nineteenth session)
PREFILL_GEMM_ROWS = [7936, 8064, 8192, 8320, 8448, 8576, 8704, 8960, 12672, 16384, 16896]
FAILED = []


def emit(record: dict) -> None:
    if record.get("passed") is False:
        FAILED.append(record)
    print(json.dumps(record), flush=True)


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def check_kernels(device: torch.device, dtype: torch.dtype, rows: list[int], scale: int) -> None:
    """Each fp8 kernel against its torch reference on the same fp8 inputs."""
    generator = torch.Generator(device=device).manual_seed(0)
    for num_rows in rows:
        for name, num_cols, depth in GEMMS[:2]:
            num_cols, depth = num_cols // scale, depth // scale
            x = torch.randn(num_rows, depth, generator=generator, device=device).to(dtype)
            for group in (None, 128 // min(scale, 8)):
                carrier = fp8.FP8 if device.type == "cuda" else torch.float32   # interpreter: see the kernel
                out, scales = fp8.quantize_fp8(x, group, out_dtype=carrier)
                want, want_scales = fp8.quantize_fp8_ref(x, group)
                same = (out.to(fp8.FP8).float() == want.float()).float().mean().item()
                emit({"check": "quantize_fp8", "shape": [num_rows, depth], "group": group, "dtype": str(dtype),
                      "fp8_values_identical": same, "scales_rel_l2": relative_l2(scales, want_scales),
                      "passed": same > 0.999 and relative_l2(scales, want_scales) < 1e-6})
            x_q, x_scale = fp8.quantize_fp8_ref(x)
            w_q, w_scale = fp8.quantize_fp8_ref(torch.randn(num_cols, depth, generator=generator, device=device))
            w_scale = w_scale.squeeze(1)
            error = relative_l2(fp8.fp8_gemm(x_q, x_scale, w_q, w_scale, dtype),
                                fp8.fp8_gemm_ref(x_q, x_scale, w_q, w_scale, torch.float32))
            emit({"check": "fp8_gemm (_scaled_mm, row-wise)", "gemm": name, "shape": [num_rows, num_cols, depth],
                  "rel_l2": error, "passed": error < 1e-2})
            block = (128 // min(scale, 8), 128 // min(scale, 8))
            xb_q, xb_scale = fp8.quantize_fp8_ref(x, block[1])
            wb_scale = torch.rand(-(-num_cols // block[0]), depth // block[1], generator=generator, device=device)
            error = relative_l2(fp8.fp8_block_gemm(xb_q, xb_scale, w_q, wb_scale, block, dtype),
                                fp8.fp8_block_gemm_ref(xb_q, xb_scale, w_q, wb_scale, block, torch.float32))
            emit({"check": "fp8_block_gemm (Triton)", "gemm": name, "shape": [num_rows, num_cols, depth],
                  "block": list(block), "rel_l2": error, "passed": error < 1e-2})
            if device.type == "cuda":   # the GEMM the layers call: cuBLASLt where it takes the shape, else Triton
                for rows_used in (num_rows, num_rows - 1):
                    x_used, x_scale_used = xb_q[:rows_used], xb_scale[:rows_used]
                    error = relative_l2(ops.fp8_block_gemm(x_used, x_scale_used, w_q, wb_scale, block, dtype),
                                        fp8.fp8_block_gemm_ref(x_used, x_scale_used, w_q, wb_scale, block,
                                                               torch.float32))
                    emit({"check": "fp8_block_gemm (ops: the layers' call)", "gemm": name,
                          "shape": [rows_used, num_cols, depth], "block": list(block),
                          "cublas": fp8.cublas_takes_block_gemm(x_used, w_q, block), "rel_l2": error,
                          "passed": error < 1e-2})


def time_gemms(device: torch.device, dtype: torch.dtype, rows: list[int], scale: int) -> None:
    """bf16 F.linear against fp8 at the same shapes: the GEMM alone and with the activation's quantization."""
    for num_rows in rows:
        for name, num_cols, depth in GEMMS:
            num_cols, depth = num_cols // scale, depth // scale
            x = torch.randn(num_rows, depth, device=device, dtype=dtype)
            weight = torch.randn(num_cols, depth, device=device, dtype=dtype) * 0.02
            w_q, w_scale = fp8.quantize_fp8_ref(weight)
            w_scale = w_scale.squeeze(1)
            x_q, x_scale = fp8.quantize_fp8_ref(x)
            block = (128 // min(scale, 8),) * 2
            wb_scale = torch.ones(-(-num_cols // block[0]), depth // block[1], device=device)
            xb_q, xb_scale = fp8.quantize_fp8_ref(x, block[1])
            runs = {
                f"{str(dtype).removeprefix('torch.')} F.linear": lambda: F.linear(x, weight),
                "fp8 _scaled_mm": lambda: fp8.fp8_gemm(x_q, x_scale, w_q, w_scale, dtype),
                "fp8 quantize + _scaled_mm": lambda: fp8.fp8_gemm(*fp8.quantize_fp8(x), w_q, w_scale, dtype),
                "fp8 block (Triton)": lambda: fp8.fp8_block_gemm(xb_q, xb_scale, w_q, wb_scale, block, dtype),
            }
            if fp8.cublas_takes_block_gemm(xb_q, w_q, block):
                runs["fp8 block (F.scaled_mm, cuBLASLt)"] = lambda: fp8.fp8_block_gemm_cublas(xb_q, xb_scale, w_q,
                                                                                             wb_scale, dtype)
            flops = 2 * num_rows * num_cols * depth
            for impl, fn in runs.items():
                ms = time_ms(fn, device)
                emit({"timing": "gemm", "gemm": name, "M": num_rows, "N": num_cols, "K": depth, "impl": impl,
                      "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})


def check_logits(config_dir: Path, device: torch.device, dtype: str, num_seqs: int, max_len: int) -> None:
    """The same dummy weights (bf16 draws; fp8 quantizes them as it loads) through the engine's data path: bf16,
    fp8 on its GPU kernels, and fp8 on the torch references (BATCHGEN_KERNELS=ref: the same quantized numerics,
    emulated). Per-token fp8 rounding is discrete, so the two fp8 paths part wherever a last-bit difference
    upstream tips a value to the next fp8 step, and a random-weight model amplifies that layer after layer (on
    the H200, 4 layers of the 8B shape: 0.125 between them, each 0.253 from bf16; 1 layer: 0.054 and 0.142). A
    kernel error would move the kernels' path away from bf16 and not the references': that is the check."""
    rng = random.Random(0)
    sequences, prompt_lens = [], []
    for _ in range(num_seqs):
        length = rng.randint(max_len // 2, max_len)
        sequences.append([rng.randrange(1000) for _ in range(length)])
        prompt_lens.append(length - rng.randint(1, 8))
    logits = {}
    for name, quantization, kernels in (("bf16", None, "triton"), ("fp8", "fp8", "triton"), ("fp8-ref", "fp8", "ref")):
        os.environ["BATCHGEN_KERNELS"] = kernels
        llm = LLM(str(config_dir), load_format="dummy", dtype=dtype, device=str(device), quantization=quantization,
                  max_num_seqs=64, max_model_len=max_len + 16, max_num_batched_tokens=2048, num_kv_blocks=2048,
                  enforce_eager=kernels == "ref")
        logits[name] = engine_logits(llm, sequences, prompt_lens)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    os.environ.pop("BATCHGEN_KERNELS")

    def max_error(a: str, b: str) -> float:
        return max(relative_l2(x, y) for x, y in zip(logits[a], logits[b]))

    kernels_vs_bf16, references_vs_bf16 = max_error("fp8", "bf16"), max_error("fp8-ref", "bf16")
    emit({"check": "fp8 engine logits: GPU kernels no farther from bf16 than the fp8 references (dummy weights)",
          "model": config_dir.name, "dtype": dtype, "sequences": num_seqs,
          "kernels_vs_bf16_max_rel_l2": kernels_vs_bf16, "references_vs_bf16_max_rel_l2": references_vs_bf16,
          "kernels_vs_references_max_rel_l2": max_error("fp8", "fp8-ref"),
          "passed": kernels_vs_bf16 <= 1.05 * references_vs_bf16})


def shallow_copy(config_dir: Path, directory: Path, num_layers: int) -> Path:
    config = json.loads((config_dir / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def tiny_llama_config(directory: Path) -> Path:
    config = json.loads((LLAMA_8B / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048)
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def time_decode_gemms(device: torch.device) -> None:
    """The projections at the row counts decode steps run, three ways: the row-wise fp8 GEMM as the layers call it
    (`_scaled_mm`, the tokens as its rows), the same with the operands swapped (the tokens as its columns), and bf16
    `F.linear`. The decode graphs' batch sizes follow from it (model_runner.decode_graph_batch_sizes)."""
    table = []
    for model, gemms in (("llama-3.1-8b", GEMMS), ("llama-3.1-70b", GEMMS_70B)):
        for name, num_cols, depth in gemms:
            weight = torch.randn(num_cols, depth, device=device, dtype=torch.bfloat16) * depth ** -0.5
            w_q, w_scale = fp8.quantize_fp8(weight)
            w_scale = w_scale.view(-1)
            for num_rows in DECODE_GEMM_ROWS:
                x = torch.randn(num_rows, depth, device=device, dtype=torch.bfloat16)
                x_q, x_scale = fp8.quantize_fp8(x)
                runs = {"fp8": lambda: fp8.fp8_gemm(x_q, x_scale, w_q, w_scale, torch.bfloat16),
                        "fp8_tokens_as_columns": lambda: torch._scaled_mm(w_q, x_q.T, scale_a=w_scale.view(-1, 1),
                                                                          scale_b=x_scale.view(1, -1),
                                                                          out_dtype=torch.bfloat16).T,
                        "bf16": lambda: F.linear(x, weight)}
                error = relative_l2(runs["fp8_tokens_as_columns"](), runs["fp8"]())
                ms = {impl: time_ms(fn, device) for impl, fn in runs.items()}
                flops = 2 * num_rows * num_cols * depth
                emit({"timing": "decode_gemm", "model": model, "gemm": name, "M": num_rows, "N": num_cols,
                      "K": depth, "swapped_rel_l2": error, "passed": error < 1e-2,
                      **{impl: round(v, 4) for impl, v in ms.items()},
                      **{f"tflops_{impl}": round(flops / v / 1e9, 1) for impl, v in ms.items()}})
                table.append((model, name, num_rows, *ms.values()))
    print(f"\n{torch.cuda.get_device_name()}: ms by rows (fp8 / fp8 tokens as columns / bf16)")
    for model, name in dict.fromkeys((m, n) for m, n, *_ in table):
        cells = [f"{m}:{a:.3f}/{b:.3f}/{c:.3f}" for mm, nn, m, a, b, c in table if (mm, nn) == (model, name)]
        print(f"{model} {name}: " + " ".join(cells))


def time_prefill_gemms(device: torch.device) -> None:
    """One Llama-8B layer's four projections at prefill token budgets, microseconds a token: bf16 `F.linear`
    through cuBLAS (torch's default) and through cuBLASLt, and the row-wise fp8 GEMM: a budget cheaper a token
    than its neighbours would fill the output tiles' waves better."""
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5 for _, n, k in GEMMS]
    fp8_weights = [(w_q, w_scale.view(-1)) for w_q, w_scale in map(fp8.quantize_fp8, weights)]
    table = []
    for num_rows in PREFILL_GEMM_ROWS:
        xs = [torch.randn(num_rows, k, device=device, dtype=torch.bfloat16) for _, _, k in GEMMS]
        xs_q = [fp8.quantize_fp8(x) for x in xs]

        def bf16_layer():
            for x, w in zip(xs, weights):
                F.linear(x, w)

        def fp8_layer():
            for (x_q, x_scale), (w_q, w_scale) in zip(xs_q, fp8_weights):
                fp8.fp8_gemm(x_q, x_scale, w_q, w_scale, torch.bfloat16)
        us = {}
        for library in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(library)
            us[f"bf16_{library}"] = time_ms(bf16_layer, device) * 1e3 / num_rows
        torch.backends.cuda.preferred_blas_library("cublas")
        us["fp8"] = time_ms(fp8_layer, device) * 1e3 / num_rows
        emit({"timing": "prefill_gemms", "model": "llama-3.1-8b", "M": num_rows,
              **{f"us_per_token_{impl}": round(v, 4) for impl, v in us.items()}})
        table.append((num_rows, *us.values()))
    print(f"\n{torch.cuda.get_device_name()}: one 8B layer's projections, us a token (bf16 cuBLAS / cuBLASLt / fp8)")
    for num_rows, *cells in table:
        print(f"{num_rows:>6}: " + " / ".join(f"{c:.4f}" for c in cells))


def main() -> int:
    if OPTS.decode_gemms or OPTS.prefill_gemms:
        (time_decode_gemms if OPTS.decode_gemms else time_prefill_gemms)(torch.device("cuda"))
        return 1 if FAILED else 0
    if OPTS.smoke:
        device, dtype, rows, scale = torch.device("cpu"), torch.float32, [16], 32
        scratch = Path(tempfile.mkdtemp())
        config_dir, num_seqs, max_len = tiny_llama_config(scratch / "tiny-llama"), 4, 48
    else:
        device, dtype, rows, scale = torch.device("cuda"), torch.bfloat16, [256, 8192], 1
        # 4 layers of the 8B shape: a random-weight model amplifies any rounding difference layer after layer
        # (32 layers: fp8 kernels vs references 0.38, fp8 vs bf16 0.65), which would hide a real kernel error
        scratch = Path(tempfile.mkdtemp())
        config_dir, num_seqs, max_len = shallow_copy(LLAMA_8B, scratch / "llama-3.1-8b-4-layers", 4), 16, 512
        emit({"card": torch.cuda.get_device_name(), "torch": torch.__version__})
    check_kernels(device, dtype, rows, scale)
    time_gemms(device, dtype, rows, scale)
    check_logits(config_dir, device, str(dtype).removeprefix("torch."), num_seqs, max_len)
    if scratch is not None:
        shutil.rmtree(scratch)
    emit({"summary": "fp8_gpu", "failed": len(FAILED)})
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
