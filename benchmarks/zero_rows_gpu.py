"""Do zero rows in a bf16 GEMM draw less power, and so run faster at the card's power cap? A Llama-8B decode
step's four projections x 32 layers at 1,024 rows (one CUDA graph), the last Z rows zero (Z = 0, 64, 128), each
held for 6 s, by turns, twice; ms a step over the last 4 s of each hold. A decode graph's padding rows (up to 127
of a bucket) hold stale tokens' states today, not zeros.

    python3 benchmarks/zero_rows_gpu.py
"""
import json
import time

import torch
import torch.nn.functional as F

DEVICE = "cuda"
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]   # qkv, o, gate-up, down: (out, in)
ROWS = 1024


def inputs(zero_rows: int) -> list[torch.Tensor]:
    xs = []
    for _, k in SHAPES:
        x = torch.randn(ROWS, k, device=DEVICE, dtype=torch.bfloat16)
        if zero_rows:
            x[ROWS - zero_rows:] = 0
        xs.append(x)
    return xs


def step(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    for _ in range(32):
        for x, w in zip(xs, weights):
            F.linear(x, w)


def hold(weights: list[torch.Tensor], zero_rows: int, seconds: float = 6.0, measure_from: float = 2.0) -> float:
    xs = inputs(zero_rows)
    graph = torch.cuda.CUDAGraph()
    step(xs, weights)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        step(xs, weights)
    start = time.perf_counter()
    steps, t0 = 0, None
    while time.perf_counter() - start < seconds:
        graph.replay()
        torch.cuda.synchronize()
        now = time.perf_counter()
        if now - start >= measure_from:
            if t0 is None:
                t0, steps = now, 0
            else:
                steps += 1
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for n, k in SHAPES]
    hold(weights, 0, seconds=4.0)   # warm the card to its power cap
    results: dict[int, list[float]] = {}
    for turn in range(2):
        for zero_rows in (0, 64, 128):
            results.setdefault(zero_rows, []).append(round(hold(weights, zero_rows), 3))
            print(json.dumps({"turn": turn, "zero_rows": zero_rows, "ms_a_step": results[zero_rows][-1]}), flush=True)
    print(json.dumps({"figure": "zero_rows_gemm", "card": torch.cuda.get_device_name(), "ms_a_step": results}))


if __name__ == "__main__":
    main()
