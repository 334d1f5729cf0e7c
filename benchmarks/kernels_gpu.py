"""Check and time batchgen's Triton kernels at real shapes on one GPU (H100 ceilings), in one process, with
batchgen installed (`pip install .`).

For every kernel: relative L2 error against its torch reference run in fp32 on the same inputs, in bf16 and
fp16 (NaN never passes), then the median time (triton.testing.do_bench) with achieved GB/s or TFLOP/s next to
the H100 ceilings, and torch alternatives where there are some. One JSON line per result, a table at the end;
the exit status is 1 when a check failed.

    python benchmarks/kernels_gpu.py                 # GPU, Llama-3.1-8B shapes, well under 3 minutes
    python benchmarks/kernels_gpu.py --sweep         # also time other launch configs of the attention kernels
    python benchmarks/kernels_gpu.py --dry-run       # CPU under TRITON_INTERPRET=1, tiny shapes: finds bugs

Two versions of a kernel file on one machine (cards of one kind differ by several percent): put the other version
in a folder (`git show COMMIT:kernels/paged_attention.py > .ab/paged_attention.py`), run once as installed and once
with `--kernels-from .ab`, then `--compare` the two outputs (`gpu_run.sh kernels-ab` does all three).
"""
import argparse
import itertools
import json
import os
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
ARGS.add_argument("--sweep", action="store_true", help="time alternative attention launch configs too")
ARGS.add_argument("--dtypes", help="comma-separated (default: bfloat16,float16; float16,float32 on --dry-run, "
                  "the interpreter gets bf16 arithmetic wrong)")
ARGS.add_argument("--only", help="comma-separated kernels to run (store_kv, rms_norm, rotary, silu_and_mul, decode, "
                  "prefill, top_p, pick_tokens); default all")
ARGS.add_argument("--kernels-from", metavar="DIR", help="DIR/NAME.py replaces batchgen.kernels.NAME for this run")
ARGS.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two runs' outputs: their times side by side")
OPTS = ARGS.parse_args()


def compare(path_a: str, path_b: str) -> None:
    """Each kernel, case and dtype both runs timed (the default launch, graph replays): ms in A and B, and B / A."""
    def times(path):
        records = (json.loads(line) for line in open(path) if line.startswith("{"))
        return {(r["kernel"], r["case"], r["dtype"]): r["ms"] for r in records
                if r.get("type") == "time" and r.get("impl") == "triton"}
    a, b = times(path_a), times(path_b)
    print(f"{'kernel':<18}{'case':<34}{'dtype':<10}{'A ms':>9}{'B ms':>9}{'B / A':>7}")
    for key in sorted(a.keys() & b.keys()):
        print(f"{key[0]:<18}{key[1]:<34}{key[2]:<10}{a[key]:>9.4f}{b[key]:>9.4f}{b[key] / a[key]:>7.3f}")


if OPTS.compare:
    compare(*OPTS.compare)
    sys.exit(0)
if OPTS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
import triton  # noqa: E402


def load_kernels_from(directory: str) -> None:
    """Each DIR/NAME.py imported as batchgen.kernels.NAME, before anything here imports the installed one."""
    import importlib.util
    from pathlib import Path

    import batchgen.kernels

    for path in sorted(Path(directory).glob("*.py")):
        name = f"batchgen.kernels.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(batchgen.kernels, path.stem, module)
        print(f"kernels_gpu.py: {name} from {path}", file=sys.stderr)


if OPTS.kernels_from:
    load_kernels_from(OPTS.kernels_from)

from batchgen.kernels import activation, fp8, paged_attention as pa, rms_norm, rotary, store_kv  # noqa: E402
from batchgen.kernels import top_p_threshold as top_p_kernel  # noqa: E402
from batchgen.kernels.pick_tokens import pick_tokens, pick_tokens_ref  # noqa: E402
from batchgen.kernels.testing import TOLERANCE, bench_ms, fp8_caches, random_paged_batch, relative_l2  # noqa: E402

DRY = OPTS.dry_run
DEVICE = torch.device("cpu" if DRY else "cuda")
PEAK_GBPS = 3000.0     # H100 SXM device-to-device copy, bytes read + written
PEAK_TFLOPS = 790.0    # H100 SXM dense bf16/fp16 matmul, measured
RESULTS: list[dict] = []
FAILED: list[str] = []
STARTED = time.perf_counter()

# Llama-3.1-8B: 32 query heads over 8 KV heads, head_dim 128, hidden 4096, intermediate 14336; block 16.
if DRY:
    HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, BLOCK, TOKENS = 8, 2, 32, 96, 80, 16, 40
else:
    HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, BLOCK, TOKENS = 32, 8, 128, 4096, 14336, 16, 8192


def emit(record: dict) -> None:
    record["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def check(kernel: str, case: str, dtype: torch.dtype, out: torch.Tensor, ref: torch.Tensor) -> None:
    error = relative_l2(out, ref)
    ok = error < TOLERANCE[dtype]
    if not ok:
        FAILED.append(f"{kernel}/{case}/{dtype}")
    emit(dict(type="check", kernel=kernel, case=case, dtype=str(dtype).removeprefix("torch."), rel_l2=error,
              tolerance=TOLERANCE[dtype], ok=ok))


def timing(kernel: str, case: str, dtype: torch.dtype, impl: str, fn, nbytes: float = 0.0, flops: float = 0.0,
           **extra) -> float:
    ms = bench_ms(fn, DRY)
    record = dict(type="time", kernel=kernel, case=case, dtype=str(dtype).removeprefix("torch."), impl=impl,
                  ms=round(ms, 4))
    if nbytes:
        record.update(gbps=round(nbytes / ms / 1e6, 1), pct_peak=round(100 * nbytes / ms / 1e6 / PEAK_GBPS, 1))
    if flops:
        record.update(tflops=round(flops / ms / 1e9, 1), pct_peak=round(100 * flops / ms / 1e9 / PEAK_TFLOPS, 1))
    emit(record | extra)
    return ms


def captured(fn):
    """fn recorded in a CUDA graph, and what it returned during the capture (its output, on replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def time_triton(kernel: str, case: str, dtype: torch.dtype, fn, impl: str = "triton", **metrics) -> None:
    """Device time from CUDA-graph replays (how the runner runs decode), and eager time, which adds Python
    launch overhead (how prefill runs); the interpreter only runs it eagerly."""
    if DRY:
        timing(kernel, case, dtype, impl, fn, **metrics)
        return
    graph, _ = captured(fn)
    timing(kernel, case, dtype, impl, graph.replay, **metrics)
    if impl == "triton":
        timing(kernel, case, dtype, "triton_eager", fn, **metrics)


def warm_up_gpu() -> None:
    """Bring the clocks up before the first timing."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- attention
# (query heads, kv heads, head_dim, block size): the main model, then other head dims and block sizes
LLAMA_8B = (HEADS, KV_HEADS, HEAD_DIM, BLOCK)
OTHER_ATTENTION_SHAPES = [(8, 2, 64, 32), (4, 2, 128, 64)] if DRY else [(32, 8, 64, 32), (16, 8, 256, 64)]


FP8_KV_SCALES = (0.05, 0.02)   # away from 1, so a scale applied twice or never fails the check


def _attention_flops(chunks, heads: int, head_dim: int) -> float:
    """QK^T and PV: 4 * D flops per (query, visible key) pair and query head."""
    pairs = sum(new * cached + new * (new + 1) // 2 for cached, new in chunks)
    return 4.0 * head_dim * heads * pairs


# an fp8 cache's pages hold 32 tokens in the engine (batchgen/config.py), its V pages keys-contiguous
FP8_KV_BLOCK = 32


def prefill_cases():
    g = torch.Generator().manual_seed(0)
    if DRY:
        return {"mix_cached": [(0, 24), (17, 9), (40, 7)], "pure_2x32": [(0, 32)] * 2,
                "decodes+chunk": [(int(n), 1) for n in torch.randint(10, 60, (6,), generator=g)] + [(20, 16)]}
    mix = [(0, 2048), (0, 1024), (2048, 1024), (4096, 1024), (0, 512), (512, 512), (1536, 512),
           (0, 256), (256, 256), (3000, 256), (7000, 256), (8000, 512)]
    assert sum(new for _, new in mix) == TOKENS
    decodes = [(int(n), 1) for n in torch.randint(511, 2048, (256,), generator=g)]
    # W1's mixed steps: 16 whole prompts of 512 (their decode rows run the decode kernel)
    return {"mix8192_cached": mix, "pure_4x2048": [(0, 2048)] * 4, "pure_16x512": [(0, 512)] * 16,
            "256dec+2048chunk": decodes + [(1024, 2048)]}


PREFILL_SWEEP = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (64, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
                 (128, 64, 8, 3), (32, 64, 4, 3)]  # BLOCK_M, BLOCK_N, num_warps, num_stages


def bench_prefill(dtype: torch.dtype, shape=LLAMA_8B, first_case_only: bool = False, fp8_kv: bool = False) -> None:
    """Prefill attention over a cache of the model's dtype, or (fp8_kv) over an fp8 cache with K/V scales."""
    heads, kv_heads, head_dim, block = shape
    block = FP8_KV_BLOCK if fp8_kv else block
    suffix = ("" if shape == LLAMA_8B else f"/d{head_dim}b{block}") + ("/fp8kv" if fp8_kv else "")
    scales = FP8_KV_SCALES if fp8_kv else (1.0, 1.0)
    for case, chunks in list(prefill_cases().items())[:1 if first_case_only else None]:
        batch = random_paged_batch(chunks, heads, kv_heads, head_dim, block, dtype, DEVICE, seed=len(chunks))
        k_cache, v_cache = batch.k_cache, batch.v_cache
        clean_k, clean_v = batch.clean_caches()
        if fp8_kv:
            k_cache, v_cache = fp8_caches(k_cache, v_cache, *FP8_KV_SCALES)
            clean_k, clean_v = fp8_caches(clean_k, clean_v, *FP8_KV_SCALES)
        args = (batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, batch.scale,
                batch.max_query_len)
        # the reference for the plain query, and over an fp8 cache for the query rounded to fp8 too (fp8 x fp8
        # scores: FP8_QUERY); the fp8 query's cost in accuracy against the plain one is emitted
        refs = {fp8_query: pa.paged_prefill_attention_ref(pa.fp8_query_ref(batch.q) if fp8_query else batch.q.float(),
                                                          clean_k, clean_v, *args[3:], None, *scales)
                for fp8_query in ((False, True) if fp8_kv else (False,))}
        del clean_k, clean_v
        if fp8_kv:
            emit(dict(type="accuracy", kernel="prefill", case=case + suffix, dtype=str(dtype).removeprefix("torch."),
                      fp8_query_vs_query_rel_l2=relative_l2(refs[True], refs[False])))
        config = pa.prefill_launch_config(head_dim, heads // kv_heads, batch.max_query_len, dtype, k_cache.dtype)
        check("prefill", case + suffix, dtype, pa.paged_prefill_attention(*args, None, *scales),
              refs[config["FP8_QUERY"]])
        flops = _attention_flops(chunks, heads, head_dim)
        time_triton("prefill", case + suffix, dtype, lambda: pa.paged_prefill_attention(*args, None, *scales),
                    flops=flops, **config)
        if case.startswith("pure") and shape == LLAMA_8B and dtype != torch.float32 and not fp8_kv:
            _bench_sdpa_yardstick(case, chunks, dtype, flops)   # flash: 16-bit only
        if OPTS.sweep and shape == LLAMA_8B:
            out = torch.empty_like(batch.q)
            for (block_m, block_n, warps, stages), fp8_query in itertools.product(PREFILL_SWEEP, refs):
                sweep = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                             FP8_QUERY=fp8_query)
                name = f"{case + suffix}/{block_m}x{block_n}/w{warps}s{stages}" + ("/fp8q" if fp8_query else "")
                check("prefill_sweep", name, dtype,
                      pa._paged_prefill(*args, out.fill_(float("nan")), sweep, None, *scales), refs[fp8_query])
                time_triton("prefill", case + suffix, dtype,
                            lambda: pa._paged_prefill(*args, out, sweep, None, *scales), "triton_sweep", flops=flops,
                            **sweep)
        del batch, args, refs, k_cache, v_cache


def _bench_sdpa_yardstick(case, chunks, dtype, flops) -> None:
    """torch's fused causal attention on contiguous, padded-free K/V of equal-length sequences."""
    seqs, length = len(chunks), chunks[0][1]
    q = torch.randn(seqs, HEADS, length, HEAD_DIM, device=DEVICE, dtype=dtype)
    k = torch.randn(seqs, HEADS, length, HEAD_DIM, device=DEVICE, dtype=dtype)  # GQA heads already expanded
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.MATH if DRY else SDPBackend.FLASH_ATTENTION):
        timing("prefill", case, dtype, "torch_sdpa_flash",
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), flops=flops)


def decode_cases():
    g = torch.Generator().manual_seed(1)
    if DRY:
        return {"6x20-60": [int(n) for n in torch.randint(20, 60, (6,), generator=g)], "2x300": [300, 287]}
    return {"256x512-2048": [int(n) for n in torch.randint(512, 2049, (256,), generator=g)],
            "64x4096": [4096] * 64, "8x8192": [8192] * 8, "1x32768": [32768],
            # the 8B 1000/1000 run's mean decode step (docs/benchmarks.md: fp8 KV, 856 rows)
            "856x1500-1700": [int(n) for n in torch.randint(1500, 1701, (856,), generator=g)],
            # 2048/2048's middle decode step: every context as long, so the programs run in whole waves (3,200 of
            # them: 3.03 waves at 8 one-warp programs an SM, 2.69 at 9)
            "400x3072": [3072] * 400}


# BLOCK_N, num_warps, num_stages. 16-key tiles (more one-warp programs an SM) lost by 3-80% and 7 stages tied
# (docs/benchmarks.md, sixteenth session: the loop was bound by shared memory, not latency); they are out, as is
# a cap of 224 registers on the one-warp launch (9 programs an SM, not 8: no faster, eighteenth session)
DECODE_SWEEP = [(32, 1, 3), (32, 1, 5), (32, 1, 7), (64, 2, 4), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3),
                (256, 4, 3)]


def bench_decode(dtype: torch.dtype, shape=LLAMA_8B, first_case_only: bool = False, fp8_kv: bool = False) -> None:
    """Decode attention over a cache of the model's dtype, or (fp8_kv) over an fp8 cache with K/V scales."""
    heads, kv_heads, head_dim, block = shape
    block = FP8_KV_BLOCK if fp8_kv else block
    suffix = ("" if shape == LLAMA_8B else f"/d{head_dim}b{block}") + ("/fp8kv" if fp8_kv else "")
    scales = FP8_KV_SCALES if fp8_kv else (1.0, 1.0)
    cache_dtype = store_kv.KV_FP8 if fp8_kv else dtype
    for case, lengths in list(decode_cases().items())[:1 if first_case_only else None]:
        case += suffix
        batch = random_paged_batch([(n - 1, 1) for n in lengths], heads, kv_heads, head_dim, block, dtype, DEVICE,
                                   seed=len(lengths))
        k_cache, v_cache = batch.k_cache, batch.v_cache
        clean_k, clean_v = batch.clean_caches()
        if fp8_kv:
            k_cache, v_cache = fp8_caches(k_cache, v_cache, *FP8_KV_SCALES)
            clean_k, clean_v = fp8_caches(clean_k, clean_v, *FP8_KV_SCALES)
        args = (batch.q, k_cache, v_cache, batch.seq_lens, batch.block_tables, batch.scale)
        out = pa.paged_decode_attention(*args, None, *scales)
        ref = pa.paged_decode_attention_ref(batch.q.float(), clean_k, clean_v, batch.seq_lens, batch.block_tables,
                                            batch.scale, None, *scales)
        check("decode", case, dtype, out, ref)
        nbytes = 2.0 * sum(lengths) * kv_heads * head_dim * cache_dtype.itemsize + 2 * batch.q.numel() * dtype.itemsize
        max_keys = batch.block_tables.shape[1] * block
        config = pa.decode_launch_config(len(lengths), kv_heads, head_dim, max_keys, DEVICE, dtype)
        if not DRY:  # the runner replays decode in CUDA graphs: capture must work (no host sync), replay be right
            graph, graph_out = captured(lambda: pa.paged_decode_attention(*args, None, *scales))
            graph_out.fill_(float("nan"))
            graph.replay()
            check("decode_cuda_graph", case, dtype, graph_out, ref)
        time_triton("decode", case, dtype, lambda: pa.paged_decode_attention(*args, None, *scales), nbytes=nbytes,
                    **config)
        timing("decode", case, dtype, "torch_ref",
               lambda: pa.paged_decode_attention_ref(batch.q, clean_k, clean_v, *args[3:], None, *scales),
               nbytes=nbytes)
        del clean_k, clean_v
        if OPTS.sweep and shape == LLAMA_8B:
            out = torch.empty_like(batch.q)
            for splits in sorted({1, config["num_splits"] // 2, config["num_splits"], config["num_splits"] * 2,
                                  config["num_splits"] * 4} - {0}):
                for block_n, warps, stages in DECODE_SWEEP:
                    sweep = pa.decode_launch_config(len(lengths), kv_heads, head_dim, max_keys, DEVICE, dtype, splits)
                    sweep.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    sweep["keys_per_split"] = triton.cdiv(sweep["keys_per_split"], block_n) * block_n
                    sweep["num_splits"] = triton.cdiv(max_keys, sweep["keys_per_split"])
                    check("decode_sweep", f"{case}/s{sweep['num_splits']}n{block_n}w{warps}s{stages}", dtype,
                          pa._paged_decode(*args, out.fill_(float("nan")), sweep, None, *scales), ref)
                    time_triton("decode", case, dtype, lambda: pa._paged_decode(*args, out, sweep, None, *scales),
                                "triton_sweep", nbytes=nbytes, **sweep)
        del batch, args, out, ref, k_cache, v_cache


# --------------------------------------------------------------------------------------------- small ops
def bench_store_kv(dtype: torch.dtype, fp8_kv: bool = False) -> None:
    """New K/V into scattered slots of a cache of the model's dtype, or (fp8_kv) of an fp8 cache as the engine lays
    it out (V keys-contiguous: each value a byte on its own)."""
    block = FP8_KV_BLOCK if fp8_kv else BLOCK
    num_slots = 2 * TOKENS  # a cache twice the batch: scattered slots
    qkv = torch.randn(TOKENS, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEVICE, dtype=dtype)
    key = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(TOKENS, KV_HEADS, HEAD_DIM)
    value = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(TOKENS, KV_HEADS, HEAD_DIM)
    slot_mapping = torch.randperm(num_slots, device=DEVICE)[:TOKENS]
    slot_mapping[-TOKENS // 64:] = -1  # padding tail
    buffer = torch.randn(2, -(-num_slots // block), block, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    buffer = buffer.to(store_kv.KV_FP8) if fp8_kv else buffer
    ref_buffer = buffer.clone()
    (k_cache, v_cache), (k_ref, v_ref) = store_kv.cache_views(buffer), store_kv.cache_views(ref_buffer)
    scales = FP8_KV_SCALES if fp8_kv else (1.0, 1.0)
    store_kv.store_kv_ref(key, value, k_ref, v_ref, slot_mapping, *scales)
    store_kv.store_kv(key, value, k_cache, v_cache, slot_mapping, *scales)
    ok = torch.equal(buffer.view(torch.uint8), ref_buffer.view(torch.uint8))
    case = f"{TOKENS}tok" + ("/fp8kv" if fp8_kv else "")
    if not ok:
        FAILED.append(f"store_kv/{case}/{dtype}")
    emit(dict(type="check", kernel="store_kv", case=case, dtype=str(dtype).removeprefix("torch."), exact=ok, ok=ok))
    nbytes = 2 * key.numel() * (dtype.itemsize + buffer.dtype.itemsize)
    time_triton("store_kv", case, dtype,
                lambda: store_kv.store_kv(key, value, k_cache, v_cache, slot_mapping, *scales), nbytes=nbytes)
    timing("store_kv", case, dtype, "torch_ref",
           lambda: store_kv.store_kv_ref(key, value, k_cache, v_cache, slot_mapping, *scales), nbytes=nbytes)


def bench_rms_norm(dtype: torch.dtype) -> None:
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=dtype)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE)).to(dtype)
    for case, res in (("plain", None), ("fused_residual", residual)):
        out = rms_norm.rms_norm(x, weight, 1e-5, res)
        ref = rms_norm.rms_norm_ref(x.float(), weight.float(), 1e-5, None if res is None else res.float())
        if res is None:
            check("rms_norm", case, dtype, out, ref)
        else:
            check("rms_norm", case, dtype, torch.cat(out), torch.cat(ref))
        nbytes = (2 if res is None else 4) * x.numel() * dtype.itemsize
        time_triton("rms_norm", case, dtype, lambda: rms_norm.rms_norm(x, weight, 1e-5, res), nbytes=nbytes)
        timing("rms_norm", case, dtype, "torch_ref", lambda: rms_norm.rms_norm_ref(x, weight, 1e-5, res),
               nbytes=nbytes)


def bench_rotary(dtype: torch.dtype) -> None:
    qkv = torch.randn(TOKENS, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEVICE, dtype=dtype)
    q = qkv[:, :HEADS * HEAD_DIM].view(TOKENS, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(TOKENS, KV_HEADS, HEAD_DIM)
    max_positions = 8 * TOKENS
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    angles = torch.arange(max_positions, device=DEVICE).float()[:, None] * inv_freq[None, :]
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, max_positions, (TOKENS,), device=DEVICE)
    out = rotary.rotary_embedding(positions, q, k, cos_sin_cache)
    ref = rotary.rotary_embedding_ref(positions, q.float(), k.float(), cos_sin_cache)
    check("rotary", f"{TOKENS}tok", dtype, torch.cat([t.flatten() for t in out]), torch.cat([t.flatten() for t in ref]))
    nbytes = 2 * (q.numel() + k.numel()) * dtype.itemsize + TOKENS * HEAD_DIM * 4
    time_triton("rotary", f"{TOKENS}tok", dtype, lambda: rotary.rotary_embedding(positions, q, k, cos_sin_cache),
                nbytes=nbytes)
    timing("rotary", f"{TOKENS}tok", dtype, "torch_ref",
           lambda: rotary.rotary_embedding_ref(positions, q, k, cos_sin_cache), nbytes=nbytes)


def bench_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(TOKENS, 2 * INTERMEDIATE, device=DEVICE, dtype=dtype)
    check("silu_and_mul", f"{TOKENS}tok", dtype, activation.silu_and_mul(x), activation.silu_and_mul_ref(x.float()))
    nbytes = 1.5 * x.numel() * dtype.itemsize
    time_triton("silu_and_mul", f"{TOKENS}tok", dtype, lambda: activation.silu_and_mul(x), nbytes=nbytes)
    timing("silu_and_mul", f"{TOKENS}tok", dtype, "torch_ref", lambda: activation.silu_and_mul_ref(x),
           nbytes=nbytes)
    # quantized per token for the fp8 down projection: a decode step's 856 rows (8B 1000/1000) and a chunk's
    out_dtype = torch.float32 if DRY else fp8.FP8   # the interpreter's own fp8 rounding is wrong
    for rows in (min(856, TOKENS), TOKENS):
        x_rows = x[:rows]
        scaled, scales = activation.silu_and_mul_fp8(x_rows, out_dtype)
        want, want_scales = activation.silu_and_mul_fp8_ref(x_rows)
        check("silu_and_mul_fp8", f"{rows}tok", dtype, scaled.to(fp8.FP8).float() * scales,
              want.float() * want_scales)
        time_triton("silu_and_mul_fp8", f"{rows}tok", dtype, lambda: activation.silu_and_mul_fp8(x_rows),
                    nbytes=1.25 * x_rows.numel() * dtype.itemsize)
        if OPTS.sweep:   # the one pass at other warp counts
            for warps in (4, 8, 16, 32):
                time_triton("silu_and_mul_fp8", f"{rows}tok", dtype,
                            lambda: activation._act_and_mul_fp8(x_rows, False, fp8.FP8, warps), "triton_sweep",
                            nbytes=1.25 * x_rows.numel() * dtype.itemsize, num_warps=warps)
        # the two passes that rows wider than one program takes (the product, then the quantization)
        time_triton("silu_and_mul_fp8", f"{rows}tok", dtype,
                    lambda: activation._act_and_mul_fp8_two_pass(x_rows, False, fp8.FP8), "triton_two_pass",
                    nbytes=1.25 * x_rows.numel() * dtype.itemsize)


def bench_top_p() -> None:
    """The sampler's logits are float32 whatever the model's dtype; rounded through bf16 (as an lm_head's
    output is) they hold many ties. Thresholds must equal the sort-based reference exactly."""
    rows, vocab = (6, 3000) if DRY else (512, 128256)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for case, scale in (("bf16-rounded x3", 3.0), ("flat x0.5", 0.5)):
        logits = (torch.randn(rows, vocab, device=DEVICE, generator=generator) * scale).bfloat16().float()
        nucleus = torch.rand(rows, device=DEVICE, generator=generator) * 0.9 + 0.05
        thresholds = top_p_kernel.top_p_threshold(logits, nucleus)
        mismatched = int((thresholds != top_p_kernel.top_p_threshold_ref(logits, nucleus)).sum())
        if mismatched:
            FAILED.append(f"top_p/{case}")
        emit(dict(type="check", kernel="top_p", case=case, dtype="float32", mismatched_rows=mismatched,
                  ok=not mismatched))
        time_triton("top_p", f"{rows}x{vocab} {case}", torch.float32,
                    lambda: top_p_kernel.top_p_threshold(logits, nucleus), nbytes=logits.numel() * 4)
        time_triton("top_p", f"{rows}x{vocab} {case}", torch.float32,
                    lambda: top_p_kernel.top_p_threshold_ref(logits, nucleus), impl="torch_ref (sort)")


def bench_pick_tokens() -> None:
    """A decode step's token choice at the 8B 1000/1000 batch (856 rows of the 128,256-token vocabulary): the
    race through one kernel pass against the torch passes it replaced, both on the same noise; the tokens must
    be the same, the log-normalizers within 1e-5."""
    rows, vocab = (6, 3000) if DRY else (856, 128256)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=DEVICE, generator=generator) * 3.0).bfloat16().float()
    noise = torch.empty_like(logits).exponential_(generator=generator)
    (tokens, lse), (ref_tokens, ref_lse) = pick_tokens(logits, logits, noise), pick_tokens_ref(logits, logits, noise)
    ok = torch.equal(tokens, ref_tokens) and torch.allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if not ok:
        FAILED.append("pick_tokens")
    emit(dict(type="check", kernel="pick_tokens", case=f"{rows}x{vocab}", dtype="float32",
              mismatched_rows=int((tokens != ref_tokens).sum()), ok=ok))
    time_triton("pick_tokens", f"{rows}x{vocab}", torch.float32, lambda: pick_tokens(logits, logits, noise),
                nbytes=2 * logits.numel() * 4)
    time_triton("pick_tokens", f"{rows}x{vocab}", torch.float32, lambda: pick_tokens_ref(logits, logits, noise),
                impl="torch_ref")


def print_table() -> None:
    print(f"\n{'kernel':<14}{'case':<24}{'dtype':<10}{'impl':<19}{'ms':>9}{'GB/s':>8}{'TFLOP/s':>9}{'%peak':>7}")
    for r in RESULTS:
        if r["type"] == "time" and r["impl"] != "triton_sweep":
            print(f"{r['kernel']:<14}{r['case']:<24}{r['dtype']:<10}{r['impl']:<19}{r['ms']:>9.4f}"
                  f"{r.get('gbps', ''):>8}{r.get('tflops', ''):>9}{r.get('pct_peak', ''):>7}")
    sweeps = [r for r in RESULTS if r.get("impl") == "triton_sweep"]
    for kernel, case, dtype in dict.fromkeys((r["kernel"], r["case"], r["dtype"]) for r in sweeps):
        best = min((r for r in sweeps if (r["kernel"], r["case"], r["dtype"]) == (kernel, case, dtype)),
                   key=lambda r: r["ms"])
        config = {k: v for k, v in best.items() if k[0].isupper() or k.startswith("num_") or k == "keys_per_split"}
        print(f"best sweep {kernel}/{case}/{dtype}: {best['ms']:.4f} ms {config}")
    checks = [r for r in RESULTS if r["type"] == "check"]
    print(f"\n{len(checks) - len(FAILED)}/{len(checks)} checks passed"
          + (f"; FAILED: {', '.join(FAILED)}" if FAILED else "")
          + f"; {time.perf_counter() - STARTED:.0f} s")


def main() -> int:
    device_name = "cpu (TRITON_INTERPRET=1)" if DRY else torch.cuda.get_device_name()
    sms = pa._num_sms(DEVICE)
    emit(dict(type="env", device=device_name, sms=sms, torch=torch.__version__, triton=triton.__version__,
              shapes=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block=BLOCK, tokens=TOKENS)))
    if not DRY:
        warm_up_gpu()
    dtypes = OPTS.dtypes or ("float16,float32" if DRY else "bfloat16,float16")
    dtypes = [getattr(torch, name) for name in dtypes.split(",")]
    only = set(OPTS.only.split(",")) if OPTS.only else None

    def run(bench, *args, **kwargs) -> None:
        if only is None or bench.__name__.removeprefix("bench_") in only:
            bench(*args, **kwargs)
            if not DRY:
                torch.cuda.empty_cache()

    for dtype in dtypes:
        for bench in (bench_store_kv, bench_rms_norm, bench_rotary, bench_silu_and_mul, bench_decode, bench_prefill):
            run(bench, dtype)
    run(bench_store_kv, dtypes[0], fp8_kv=True)   # into an fp8 cache (the fp8 KV runs), the model's first dtype
    run(bench_decode, dtypes[0], fp8_kv=True)
    run(bench_prefill, dtypes[0], fp8_kv=True)
    run(bench_top_p)
    run(bench_pick_tokens)
    for shape in OTHER_ATTENTION_SHAPES:  # other head dims and block sizes: one case each, first dtype only
        run(bench_decode, dtypes[0], shape, first_case_only=True)
        run(bench_prefill, dtypes[0], shape, first_case_only=True)
    print_table()
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
