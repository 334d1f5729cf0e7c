"""Does decode attention (memory-bound) overlap with the GEMMs (tensor-core-bound) of another half batch?

The decode step runs its kernels one after another, so per token their costs add (docs/benchmarks.md, the cost
model). Splitting a step's rows in two halves and running one half's attention beside the other half's GEMMs on a
second stream could hide part of the GEMMs, if the two kernels share the SMs well. This times, for the Llama-3.1-8B
shape on one GPU, per layer: half A's decode attention alone, half B's layer GEMMs (with their fp8 activation
quantization) alone, the two one after another, and the two on two streams, joined after every pair as a two-half
pipeline must (A's GEMMs need A's attention), and unjoined (the bound); and the step as the engine runs it, the whole
batch one kernel after another. GEMMs run at the rows their decode graph pads to. All in CUDA graphs of 32 layers.

Side by side, the attention programs took every SM and the GEMMs waited for them (docs/benchmarks.md, 2026-12-01).
`--carveout N ...` also runs the pipeline with the GEMMs held to all SMs but N (cuBLASLt's SM count target, which
torch sets from `torch._C._set_sm_carveout_experimental` when the GEMM is captured) on a high-priority stream: a
memory-bound kernel can draw the card's bandwidth from part of its SMs, so attention on N SMs beside GEMMs on the
rest could run the two at once.

    python benchmarks/overlap_gpu.py                  # fp8 weights + fp8 KV, 856 rows at 1,500-1,700 keys
    python benchmarks/overlap_gpu.py --bf16 --rows 480 --keys 512 768
    python benchmarks/overlap_gpu.py --rows 400 --keys 2500 3500 --carveout 32 48 66   # 2048/2048's decode steps
"""
import argparse
import json

import torch
import triton

from batchgen.engine.model_runner import decode_graph_batch_sizes
from batchgen.kernels import ops
from batchgen.kernels.testing import fp8_caches, random_paged_batch

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--rows", type=int, default=856, help="decode rows of the whole step (two halves)")
ARGS.add_argument("--keys", type=int, nargs=2, default=(1500, 1700), help="context lengths drawn in [lo, hi]")
ARGS.add_argument("--bf16", action="store_true", help="bf16 weights and a bf16 cache instead of fp8")
ARGS.add_argument("--layers", type=int, default=32)
ARGS.add_argument("--carveout", type=int, nargs="*", default=[],
                  help="also pipeline with the GEMMs kept off this many SMs (each value a run)")
OPTS = ARGS.parse_args()

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 32, 8, 128, 4096, 14336
BLOCK = 16 if OPTS.bf16 else 32   # the engine's page size over each cache (EngineConfig.block_size)
MAX_NUM_SEQS = 1024   # the engine's default on a GPU (EngineConfig.resolved_max_num_seqs)
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")


def attention_half(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(OPTS.keys[0], OPTS.keys[1] + 1, (rows,), generator=gen).tolist()
    batch = random_paged_batch([(n - 1, 1) for n in lengths], HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, DEVICE, seed)
    k_cache, v_cache = batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0)
    if not OPTS.bf16:
        k_cache, v_cache = fp8_caches(k_cache, v_cache, 0.05, 0.05)
    nbytes = 2.0 * sum(lengths) * KV_HEADS * HEAD_DIM * k_cache.dtype.itemsize
    return (lambda: ops.paged_decode_attention(batch.q, k_cache, v_cache, batch.seq_lens, batch.block_tables,
                                               batch.scale, None, 0.05, 0.05)), nbytes


def weight(n: int, k: int):
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5
    if OPTS.bf16:
        return w, None
    w_q, w_scale = ops.quantize_fp8(w)
    return w_q, w_scale.view(-1)


def gemms_half(rows: int):
    """One decoder layer's projections for `rows` tokens, as the fp8 (or bf16) linear layers run them."""
    x = torch.randn(rows, HIDDEN, device=DEVICE, dtype=DTYPE)
    qkv, o, gate_up, down = (weight(n, k) for n, k in (((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                                                       (HIDDEN, HEADS * HEAD_DIM), (2 * INTERMEDIATE, HIDDEN),
                                                       (HIDDEN, INTERMEDIATE)))

    def linear(inp, w):
        if OPTS.bf16:
            return inp @ w[0].T
        return ops.fp8_gemm(*ops.quantize_fp8(inp), *w, DTYPE)

    def run():
        h = linear(x, qkv)
        h = linear(h[:, :HIDDEN], o)
        h = linear(h, gate_up)
        if OPTS.bf16:
            return h[:, :INTERMEDIATE] @ down[0][:, :INTERMEDIATE].T
        return ops.fp8_gemm(*ops.silu_and_mul_fp8(h), *down, DTYPE)

    flops = 2.0 * rows * HIDDEN * ((HEADS + 2 * KV_HEADS) * HEAD_DIM + HIDDEN + 3 * INTERMEDIATE)
    return run, flops


def graph_ms(body) -> float:
    """Median replay time of body() captured in one CUDA graph."""
    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=200, return_mode="median")


def padded(rows: int) -> int:
    """The rows the decode graph for `rows` sequences runs its GEMMs at, under the GPU's default max_num_seqs."""
    return min(size for size in decode_graph_batch_sizes(MAX_NUM_SEQS) if size >= rows)


def main() -> None:
    half = OPTS.rows // 2
    attend_a, kv_bytes = attention_half(half, 1)
    attend_b, _ = attention_half(OPTS.rows - half, 2)
    attend_whole, _ = attention_half(OPTS.rows, 3)
    gemm_a, flops = gemms_half(padded(half))
    gemm_b, _ = gemms_half(padded(OPTS.rows - half))
    gemm_whole, _ = gemms_half(padded(OPTS.rows))
    layers = OPTS.layers
    results = {}

    def streams(priority_gemm: int):
        return torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=priority_gemm)

    def serial():
        for _ in range(layers):
            attend_a(), gemm_b(), attend_b(), gemm_a()

    def pipelined(first, second, joined: bool):
        def body():
            main_stream = torch.cuda.current_stream()
            for s in (first, second):
                s.wait_stream(main_stream)
            for _ in range(layers):
                for attend, gemm in ((attend_a, gemm_b), (attend_b, gemm_a)):
                    with torch.cuda.stream(second):
                        gemm()
                    with torch.cuda.stream(first):
                        attend()
                    if joined:
                        first.wait_stream(second)
                        second.wait_stream(first)
            for s in (first, second):
                main_stream.wait_stream(s)
        return body

    # the step as the engine runs it: the whole batch, GEMMs at its graph's padded rows, one kernel after another
    results["whole_batch_serial"] = graph_ms(lambda: [(attend_whole(), gemm_whole()) for _ in range(layers)])
    results["attention_only"] = graph_ms(lambda: [(attend_a(), attend_b()) for _ in range(layers)])
    results["gemms_only"] = graph_ms(lambda: [(gemm_a(), gemm_b()) for _ in range(layers)])
    results["serial"] = graph_ms(serial)
    for name, priority in (("same_priority", 0), ("gemm_high_priority", -1)):
        first, second = streams(priority)
        results[f"overlap_joined_{name}"] = graph_ms(pipelined(first, second, True))
        results[f"overlap_free_{name}"] = graph_ms(pipelined(first, second, False))
    for carveout in OPTS.carveout:
        torch._C._set_sm_carveout_experimental(carveout)   # read by cuBLASLt calls as they are captured
        results[f"gemms_only_carveout_{carveout}"] = graph_ms(lambda: [(gemm_a(), gemm_b()) for _ in range(layers)])
        first, second = streams(-1)
        results[f"overlap_joined_carveout_{carveout}"] = graph_ms(pipelined(first, second, True))
        torch._C._set_sm_carveout_experimental(None)
    card = torch.cuda.get_device_name()
    attention, gemm = results["attention_only"], results["gemms_only"]
    best = min(v for k, v in results.items() if k.startswith("overlap_joined"))
    record = dict(card=card, rows=OPTS.rows, keys=OPTS.keys, weights="bf16" if OPTS.bf16 else "fp8",
                  layers=layers, gemm_rows=[padded(half), padded(OPTS.rows - half), padded(OPTS.rows)],
                  kv_tb_s=round(2 * kv_bytes * layers / attention / 1e9, 2),
                  gemm_tflops=round(2 * flops * layers / gemm / 1e9, 1),
                  **{k: round(v, 3) for k, v in results.items()},
                  best_overlap_vs_serial=round(results["serial"] / best, 3),
                  best_overlap_vs_whole_batch=round(results["whole_batch_serial"] / best, 3))
    print(json.dumps(record), flush=True)
    print(f"\n{card}, {OPTS.rows} rows, {'bf16' if OPTS.bf16 else 'fp8'}, {layers} layers (ms per step)")
    for name, ms in results.items():
        print(f"  {name:36s} {ms:8.3f}")


if __name__ == "__main__":
    main()
