"""Does SiLU-and-mul in the gate_up GEMM's epilogue pay, for bf16 weights on an H200?

In W1's mixed steps (8,192 tokens) the elementwise kernels between the GEMMs take ~10% of the step, SiLU-and-mul
the most of them (0.17-0.25 ms a layer: it reads the [T, 2I] projection and writes [T, I]). A GEMM that computes
a tile's gate and up columns as two accumulators over the same input tiles and applies act(gate) * up before it
stores would never write or read the projection. That only pays if its GEMM runs as fast as cuBLAS's; this times
the Triton kernel below (TMA loads, 128 x 128 x 64 tiles, the best of a sweep of nine tile shapes at 256-8,192
rows, twentieth session) against `F.linear` then batchgen's `silu_and_mul`, by turns, on Llama-3.1-8B's gate_up
(4,096 -> 2 x 14,336), and checks the two give the same bits. It did not pay (docs/benchmarks.md, twentieth
session), so the kernel lives here, not in `kernels/`.

    python benchmarks/gate_up_epilogue_gpu.py
"""
import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from batchgen.kernels.activation import silu_and_mul


@triton.jit
def _gate_up_silu_kernel(x_desc, w_desc, out_ptr, num_rows, depth, intermediate, stride_o, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One program per output tile: gate and up accumulated over the same input tiles, silu(gate) * up stored,
    each rounded to bf16 where the reference rounds it."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(intermediate, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    group_rows = min(tl.cdiv(num_rows, BLOCK_M) - first_m, GROUP_M)
    m0 = (first_m + pid % (GROUP_M * tiles_n) % group_rows) * BLOCK_M
    n0 = pid % (GROUP_M * tiles_n) // group_rows * BLOCK_N
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, depth, BLOCK_K):
        a = x_desc.load([m0, k])
        acc_gate = tl.dot(a, w_desc.load([n0, k]).T, acc_gate)
        acc_up = tl.dot(a, w_desc.load([intermediate + n0, k]).T, acc_up)
    gate = acc_gate.to(tl.bfloat16).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)
    out = (activated * acc_up.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], out,
             mask=(rows[:, None] < num_rows) & (cols[None, :] < intermediate))


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) for weight [2I, K] (gate rows then up rows), bf16."""
    (num_rows, depth), intermediate = x.shape, weight.shape[0] // 2
    out = torch.empty(num_rows, intermediate, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = 128, 128, 64
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(intermediate, block_n),)
    _gate_up_silu_kernel[grid](TensorDescriptor.from_tensor(x, [block_m, block_k]),
                               TensorDescriptor.from_tensor(weight, [block_n, block_k]), out, num_rows, depth,
                               intermediate, out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               GROUP_M=8, num_warps=8, num_stages=4)
    return out


def time_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 12288])
    parser.add_argument("--turns", type=int, default=6, help="timings of each, alternating; the median is reported")
    args = parser.parse_args()
    hidden, intermediate = 4096, 14336
    torch.manual_seed(0)
    weight = (torch.randn(2 * intermediate, hidden, device="cuda") * 0.02).bfloat16()
    results = []
    for rows in args.rows:
        x = torch.randn(rows, hidden, device="cuda").bfloat16()
        fused = lambda: gate_up_silu(x, weight)   # noqa: E731
        split = lambda: silu_and_mul(F.linear(x, weight))   # noqa: E731
        different = (fused() != split()).float().mean().item()
        iters = max(20, 60_000 // rows)   # ~0.2 s a timing
        fused_ms, split_ms = [], []
        for _ in range(args.turns):
            fused_ms.append(time_ms(fused, iters))
            split_ms.append(time_ms(split, iters))
        fused_ms.sort()
        split_ms.sort()
        row = {"rows": rows, "fused_ms": round(fused_ms[len(fused_ms) // 2], 4),
               "linear_then_silu_ms": round(split_ms[len(split_ms) // 2], 4),
               "speedup": round(split_ms[len(split_ms) // 2] / fused_ms[len(fused_ms) // 2], 3),
               "values_differing": different, "card": torch.cuda.get_device_name()}
        print(json.dumps(row), flush=True)
        results.append(row)
    print(f"{'rows':>6} {'fused ms':>9} {'linear+silu ms':>15} {'speedup':>8}")
    for row in results:
        print(f"{row['rows']:>6} {row['fused_ms']:>9.4f} {row['linear_then_silu_ms']:>15.4f} {row['speedup']:>8.3f}")


if __name__ == "__main__":
    main()
