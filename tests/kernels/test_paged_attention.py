"""Paged prefill and decode attention (Triton) against the torch references, in fp32 and fp16 (and bf16 on a GPU).

Batches come from `random_paged_batch`: blocks scattered at random, NaN in every cache slot no sequence owns.
The reference runs in fp32 on the same inputs.
"""
import zlib

import pytest
import torch

from batchgen.kernels import paged_attention as pa
from batchgen.kernels.store_kv import KV_FP8, store_kv
from batchgen.kernels.testing import (TEST_DEVICE as DEVICE, TEST_DTYPES as DTYPES, TOLERANCE, fp8_caches,
                                      random_paged_batch, relative_l2)

# (cached_len, query_len) per sequence, block size
PREFILL_MIXES = {
    "pure_prefill": ([(0, 17), (0, 32), (0, 5)], 16),
    "chunks_on_cached_context": ([(14, 16), (40, 9), (3, 30)], 32),
    "prefill_with_decodes": ([(0, 24), (31, 1), (63, 1), (7, 12)], 64),
}
GROUPS = [1, 3, 4]


def _prefill_ref(batch):
    k_cache, v_cache = batch.clean_caches()
    return pa.paged_prefill_attention_ref(batch.q.float(), k_cache.float(), v_cache.float(), batch.query_start_loc,
                                          batch.seq_lens, batch.block_tables, batch.scale, batch.max_query_len)


def _decode_ref(batch):
    k_cache, v_cache = batch.clean_caches()
    return pa.paged_decode_attention_ref(batch.q.float(), k_cache.float(), v_cache.float(), batch.seq_lens,
                                         batch.block_tables, batch.scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("mix", PREFILL_MIXES)
def test_prefill_matches_reference(mix, group, dtype):
    chunks, block_size = PREFILL_MIXES[mix]
    batch = random_paged_batch(chunks, num_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=block_size,
                               dtype=dtype, seed=zlib.crc32(mix.encode()) % 1000 + group, device=DEVICE)
    q = batch.q
    if mix == "chunks_on_cached_context":  # q as a strided view, as a fused qkv projection hands it over
        q = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :32]
    out = pa.paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.scale, batch.max_query_len)
    assert relative_l2(out, _prefill_ref(batch)) < TOLERANCE[dtype]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("mix", PREFILL_MIXES)
def test_prefill_small_tiles_match_reference(mix, group):
    # 16-key tiles put most keys in the unmasked loop and many chunks across several query tiles
    chunks, block_size = PREFILL_MIXES[mix]
    batch = random_paged_batch(chunks, num_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=block_size,
                               dtype=torch.float32, seed=group, device=DEVICE)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    out = pa._paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                            batch.block_tables, batch.scale, batch.max_query_len, torch.empty_like(batch.q), config)
    assert relative_l2(out, _prefill_ref(batch)) < TOLERANCE[torch.float32]


def test_prefill_head_dim_64_long_chunk():
    # a chunk longer than one query tile, on a context longer than one key tile
    batch = random_paged_batch([(70, 45), (0, 3)], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                               dtype=torch.float16, seed=7, device=DEVICE)
    config = pa.prefill_launch_config(64, 4, batch.max_query_len, torch.float16) | dict(BLOCK_M=32, BLOCK_N=16)
    out = pa._paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                            batch.block_tables, batch.scale, batch.max_query_len, torch.empty_like(batch.q), config)
    assert relative_l2(out, _prefill_ref(batch)) < TOLERANCE[torch.float16]


# length 1, exact multiples of the block size, and ragged lengths
DECODE_LENGTHS = [1, 16, 17, 32, 45, 100]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference(block_size, group, dtype):
    batch = random_paged_batch([(n - 1, 1) for n in DECODE_LENGTHS], num_heads=2 * group, num_kv_heads=2,
                               head_dim=32, block_size=block_size, dtype=dtype, seed=block_size + group, device=DEVICE)
    out = pa.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables,
                                    batch.scale)
    assert relative_l2(out, _decode_ref(batch)) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_decode_splits_reduce_to_reference(num_splits):
    # splits past a short sequence's length exit without writing; the reduction must skip them
    batch = random_paged_batch([(n - 1, 1) for n in DECODE_LENGTHS], num_heads=8, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=torch.float32, seed=num_splits, device=DEVICE)
    max_keys = batch.block_tables.shape[1] * 16
    config = pa.decode_launch_config(len(DECODE_LENGTHS), 2, 32, max_keys, batch.q.device, torch.float32, num_splits)
    assert config["num_splits"] == num_splits
    out = pa._paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                           torch.empty_like(batch.q), config)
    assert relative_l2(out, _decode_ref(batch)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_sequence_gives_zeros(num_splits):
    # CUDA-graph batches are padded with sequences of length 0
    batch = random_paged_batch([(n - 1, 1) for n in (50, 20, 33)], num_heads=4, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=torch.float32, seed=3, device=DEVICE)
    seq_lens = batch.seq_lens.clone()
    seq_lens[1] = 0
    config = pa.decode_launch_config(3, 2, 32, batch.block_tables.shape[1] * 16, batch.q.device, torch.float32,
                                     num_splits)
    out = pa._paged_decode(batch.q, batch.k_cache, batch.v_cache, seq_lens, batch.block_tables, batch.scale,
                           torch.empty_like(batch.q), config)
    ref = _decode_ref(batch)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    assert relative_l2(out[keep], ref[keep]) < TOLERANCE[torch.float32]


def test_offsets_widen_to_64_bit_only_for_caches_past_int32():
    # a KV cache of the Llama-8B layout (pages of 16, 8 KV heads of 128): 2^17 blocks (2M tokens) reach 2^31 elements
    assert not pa._wide_offsets(torch.empty((2**17 - 1, 16, 8, 128), device="meta"))
    assert pa._wide_offsets(torch.empty((2**17 + 1, 16, 8, 128), device="meta"))


def test_wide_offsets_match_reference(monkeypatch):
    # the 64-bit address path, taken by caches past int32's reach, on a small batch
    monkeypatch.setattr(pa, "_INT32_OFFSETS_BELOW", 1)
    chunks, block_size = PREFILL_MIXES["prefill_with_decodes"]
    batch = random_paged_batch(chunks, num_heads=8, num_kv_heads=2, head_dim=32, block_size=block_size,
                               dtype=torch.float32, seed=11, device=DEVICE)
    out = pa.paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.scale, batch.max_query_len)
    assert relative_l2(out, _prefill_ref(batch)) < TOLERANCE[torch.float32]
    batch = random_paged_batch([(n - 1, 1) for n in DECODE_LENGTHS], num_heads=8, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=torch.float32, seed=12, device=DEVICE)
    config = pa.decode_launch_config(len(DECODE_LENGTHS), 2, 32, batch.block_tables.shape[1] * 16, batch.q.device,
                                     torch.float32, num_splits=2)
    out = pa._paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                           torch.empty_like(batch.q), config)
    assert relative_l2(out, _decode_ref(batch)) < TOLERANCE[torch.float32]


# (dtype, query factor): scores spread over tens (fp16) or hundreds (fp32) of log2 units, so the running maximum
# jumps by that much from tile to tile; a jump the running sums missed would overflow the probabilities (fp16 past
# 2^16, fp32 past 2^128)
PEAKED = [(torch.float16, 16.0), (torch.float32, 200.0)]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype, factor", PEAKED, ids=["fp16", "fp32"])
def test_peaked_scores_rescale_the_running_sums(dtype, factor, num_splits):
    batch = random_paged_batch([(n - 1, 1) for n in (100, 77, 128)], num_heads=8, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=dtype, seed=5, device=DEVICE)
    batch.q.mul_(factor)
    config = pa.decode_launch_config(3, 2, 32, batch.block_tables.shape[1] * 16, batch.q.device, dtype,
                                     num_splits) | dict(BLOCK_N=16)
    out = pa._paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                           torch.empty_like(batch.q), config)
    assert relative_l2(out, _decode_ref(batch)) < TOLERANCE[dtype]
    batch = random_paged_batch([(70, 45), (0, 60)], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
                               dtype=dtype, seed=6, device=DEVICE)
    batch.q.mul_(factor)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    out = pa._paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                            batch.block_tables, batch.scale, batch.max_query_len, torch.empty_like(batch.q), config)
    assert relative_l2(out, _prefill_ref(batch)) < TOLERANCE[dtype]


def test_launch_configs_fit_the_h100_hot_shapes():
    # Llama-3.1-8B-like: 32 q heads over 8 kv heads, head_dim 128
    long_chunk = pa.prefill_launch_config(128, 4, 2048, torch.bfloat16)
    assert long_chunk["BLOCK_M"] >= 64 and long_chunk["BLOCK_M"] % 4 == 0
    assert pa.prefill_launch_config(128, 4, 1, torch.bfloat16)["BLOCK_M"] == 16
    assert pa.prefill_launch_config(128, 32, 1, torch.bfloat16)["BLOCK_M"] == 32  # MQA: one token's heads fit
    few_long = pa.decode_launch_config(2, 8, 128, 16 * 2048, torch.device("cpu"), torch.bfloat16)
    assert few_long["num_splits"] * 2 * 8 >= 132 and few_long["keys_per_split"] % few_long["BLOCK_N"] == 0
    many_short = pa.decode_launch_config(256, 8, 128, 16 * 128, torch.device("cpu"), torch.bfloat16)
    assert many_short["num_splits"] == 1
    # 16-bit models decode in one-warp programs (over either cache); head_dim 256 in 4-warp ones
    one_warp = pa.decode_launch_config(856, 8, 128, 16 * 128, torch.device("cpu"), torch.bfloat16)
    assert (one_warp["BLOCK_N"], one_warp["num_warps"], one_warp["num_stages"]) == (32, 1, 5)
    assert pa.decode_launch_config(856, 8, 256, 16 * 128, torch.device("cpu"), torch.bfloat16)["num_warps"] == 4
    # over an fp8 cache a long chunk takes 64-row tiles with the query in fp8; an fp32 model never rounds its query
    fp8_prefill = pa.prefill_launch_config(128, 4, 2048, torch.bfloat16, KV_FP8)
    assert (fp8_prefill["BLOCK_M"], fp8_prefill["BLOCK_N"], fp8_prefill["FP8_QUERY"]) == (64, 64, True)
    assert not pa.prefill_launch_config(128, 4, 2048, torch.float32, KV_FP8)["FP8_QUERY"]
    # head sizes the Triton kernels don't run (the reference does, on the GPU too) keep their query
    assert not pa.prefill_rounds_query_to_fp8(torch.bfloat16, KV_FP8, 96)
    assert not long_chunk["FP8_QUERY"]


def test_store_kv_then_prefill_sees_the_new_tokens():
    # the new tokens' K/V go in through store_kv (with padding rows) and come out through the attention kernel
    batch = random_paged_batch([(20, 12), (0, 9)], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                               dtype=torch.float16, seed=11, device=DEVICE)
    expected = _prefill_ref(batch)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    for cache in (k_cache, v_cache):
        cache.view(-1, 2, 32)[batch.slot_mapping] = float("nan")
    padding = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    store_kv(torch.cat([batch.key, torch.full_like(batch.key[:3], float("nan"))]),
             torch.cat([batch.value, torch.full_like(batch.value[:3], float("nan"))]), k_cache, v_cache,
             torch.cat([batch.slot_mapping, padding]))
    out = pa.paged_prefill_attention(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.scale, batch.max_query_len)
    assert relative_l2(out, expected) < TOLERANCE[torch.float16]


# sliding windows: smaller than a key tile, across several tiles, one token (only itself)
WINDOWS = [5, 40, 1]


def _dense_windowed_attention(batch, sliding_window):
    """Attention of each query over its sequence's whole context with an explicit (p - W, p] mask, no paging
    tricks: keys and values read position by position through the block table."""
    k_cache, v_cache = batch.clean_caches()
    block_size, group = k_cache.shape[1], batch.q.shape[1] // k_cache.shape[2]
    out = torch.empty(batch.q.shape, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        positions = torch.arange(seq_len)
        blocks = batch.block_tables[b, positions // block_size].long()
        keys = k_cache[blocks, positions % block_size].double().repeat_interleave(group, dim=1)
        values = v_cache[blocks, positions % block_size].double().repeat_interleave(group, dim=1)
        for row in range(starts[b], starts[b + 1]):
            query_pos = seq_len - (starts[b + 1] - row)
            visible = (positions <= query_pos) & (positions > query_pos - sliding_window)
            scores = torch.einsum("hd,khd->hk", batch.q[row].double(), keys) * batch.scale
            weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[row] = torch.einsum("hk,khd->hd", weights, values)
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mix", PREFILL_MIXES)
def test_sliding_window_references_match_dense_masked_attention(mix, window):
    chunks, block_size = PREFILL_MIXES[mix]
    batch = random_paged_batch(chunks, num_heads=4, num_kv_heads=2, head_dim=32, block_size=block_size,
                               dtype=torch.float32, seed=window)
    k_cache, v_cache = batch.clean_caches()
    prefill = pa.paged_prefill_attention_ref(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                             batch.block_tables, batch.scale, batch.max_query_len, window)
    dense = _dense_windowed_attention(batch, window)
    assert relative_l2(prefill, dense) < 1e-6
    last_rows = (batch.query_start_loc[1:] - 1).long()
    decode = pa.paged_decode_attention_ref(batch.q[last_rows], k_cache, v_cache, batch.seq_lens, batch.block_tables,
                                           batch.scale, window)
    assert relative_l2(decode, dense[last_rows]) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mix", PREFILL_MIXES)
def test_sliding_window_prefill_matches_reference(mix, window, dtype):
    chunks, block_size = PREFILL_MIXES[mix]
    batch = random_paged_batch(chunks, num_heads=4, num_kv_heads=2, head_dim=32, block_size=block_size,
                               dtype=dtype, device=DEVICE, seed=window + 1)
    # 16-key, 16-row tiles: windows of 5 and 40 give rows of one tile different window starts, and tiles wholly
    # before every row's window (skipped), partly inside (masked) and wholly inside (unmasked)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    out = pa._paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                            batch.block_tables, batch.scale, batch.max_query_len, torch.empty_like(batch.q), config,
                            window)
    k_cache, v_cache = batch.clean_caches()
    ref = pa.paged_prefill_attention_ref(batch.q.float(), k_cache.float(), v_cache.float(), batch.query_start_loc,
                                         batch.seq_lens, batch.block_tables, batch.scale, batch.max_query_len, window)
    assert relative_l2(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window_decode_matches_reference(num_splits, window):
    batch = random_paged_batch([(n - 1, 1) for n in DECODE_LENGTHS], num_heads=8, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=torch.float32, device=DEVICE, seed=window)
    max_keys = pa.decode_max_keys(batch.block_tables.shape[1] * 16, window)
    config = pa.decode_launch_config(len(DECODE_LENGTHS), 2, 32, max_keys, batch.q.device, torch.float32, num_splits)
    out = pa._paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                           torch.empty_like(batch.q), config, window)
    k_cache, v_cache = batch.clean_caches()
    ref = pa.paged_decode_attention_ref(batch.q, k_cache, v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                                        window)
    assert relative_l2(out, ref) < TOLERANCE[torch.float32]
    public = pa.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables,
                                       batch.scale, window)
    assert relative_l2(public, ref) < TOLERANCE[torch.float32]


# fp8 KV cache: K / k_scale and V / v_scale in float8_e4m3fn; the kernels fold the scales back in. Scales well
# away from 1 (randn K/V of magnitude ~3 become ~60 and ~150 in the cache), so a scale applied twice or never fails.
FP8_SCALES = (0.05, 0.02)
# bf16 queries too, on the CPU as well: over an fp8 cache the kernels run a bf16 query in fp16 (it is only loaded,
# scaled in fp32 and cast, which the interpreter does right) and store bf16 outputs
FP8_QUERY_DTYPES = list(dict.fromkeys(DTYPES + [torch.bfloat16]))


def _fp8_caches(batch) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(the batch's caches in fp8 as the engine lays them out, NaN poison kept; the same without the poison, for the
    references)."""
    return fp8_caches(batch.k_cache, batch.v_cache, *FP8_SCALES), fp8_caches(*batch.clean_caches(), *FP8_SCALES)


# (dtype, fp8_query): the query in fp8 too is for 16-bit models (its P x V runs in fp16)
@pytest.mark.parametrize("dtype,fp8_query", [(dtype, False) for dtype in FP8_QUERY_DTYPES]
                         + [(dtype, True) for dtype in FP8_QUERY_DTYPES if dtype != torch.float32],
                         ids=lambda value: {False: "query", True: "fp8_query"}.get(value, str(value)))
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("mix", PREFILL_MIXES)
def test_fp8_cache_prefill_matches_reference(mix, window, dtype, fp8_query):
    chunks, block_size = PREFILL_MIXES[mix]
    batch = random_paged_batch(chunks, num_heads=6, num_kv_heads=2, head_dim=32, block_size=block_size,
                               dtype=dtype, seed=zlib.crc32(mix.encode()) % 1000 + (window or 0), device=DEVICE)
    (k_cache, v_cache), (clean_k, clean_v) = _fp8_caches(batch)
    # masked, unmasked and skipped key tiles
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, FP8_QUERY=fp8_query)
    out = pa._paged_prefill(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                            batch.scale, batch.max_query_len, torch.empty_like(batch.q), config, window, *FP8_SCALES)
    # an fp8 query is rounded to e4m3 row by row first: the reference takes the same rounding
    query = pa.fp8_query_ref(batch.q) if fp8_query else batch.q.float()
    ref = pa.paged_prefill_attention_ref(query, clean_k, clean_v, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, batch.scale, batch.max_query_len, window, *FP8_SCALES)
    assert relative_l2(out, ref) < TOLERANCE[dtype]
    if pa.prefill_launch_config(32, 3, batch.max_query_len, dtype, KV_FP8)["FP8_QUERY"] == fp8_query:
        public = pa.paged_prefill_attention(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                            batch.block_tables, batch.scale, batch.max_query_len, window, *FP8_SCALES)
        assert relative_l2(public, ref) < TOLERANCE[dtype]


def test_fp8_cache_prefill_reference_rounds_the_query_as_the_kernel_does():
    """The CPU engine runs the references: a 16-bit query over an fp8 cache must get the kernel's fp8 rounding there
    too (without it the two differ by ~0.02)."""
    batch = random_paged_batch([(0, 24), (17, 9)], num_heads=6, num_kv_heads=2, head_dim=32, block_size=16,
                               dtype=torch.float16, seed=5, device=DEVICE)
    (k_cache, v_cache), (clean_k, clean_v) = _fp8_caches(batch)
    args = (batch.query_start_loc, batch.seq_lens, batch.block_tables, batch.scale, batch.max_query_len, None,
            *FP8_SCALES)
    kernel = pa.paged_prefill_attention(batch.q, k_cache, v_cache, *args)
    reference = pa.paged_prefill_attention_ref(batch.q, clean_k, clean_v, *args)
    assert relative_l2(kernel, reference) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", FP8_QUERY_DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache_decode_matches_reference(num_splits, window, dtype):
    batch = random_paged_batch([(n - 1, 1) for n in DECODE_LENGTHS], num_heads=8, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=dtype, device=DEVICE, seed=num_splits + (window or 0))
    (k_cache, v_cache), (clean_k, clean_v) = _fp8_caches(batch)
    max_keys = pa.decode_max_keys(batch.block_tables.shape[1] * 16, window)
    config = pa.decode_launch_config(len(DECODE_LENGTHS), 2, 32, max_keys, batch.q.device, dtype, num_splits)
    out = pa._paged_decode(batch.q, k_cache, v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                           torch.empty_like(batch.q), config, window, *FP8_SCALES)
    ref = pa.paged_decode_attention_ref(batch.q.float(), clean_k, clean_v, batch.seq_lens, batch.block_tables,
                                        batch.scale, window, *FP8_SCALES)
    assert relative_l2(out, ref) < TOLERANCE[dtype]
    public = pa.paged_decode_attention(batch.q, k_cache, v_cache, batch.seq_lens, batch.block_tables, batch.scale,
                                       window, *FP8_SCALES)
    assert relative_l2(public, ref) < TOLERANCE[dtype]


# What e4m3's 3 mantissa bits cost: attention over an fp8 cache against the same in fp32, relative L2 (measured
# 0.032 on the prefill batch, 0.029-0.036 over seeds and with scales of 1; one rounding of each K/V element is up
# to 6% relative, ~3.6% rms); 0.034 on the decode batch.
FP8_CACHE_ERROR = 0.05


def _fp8_store_then_attend(chunks, seed):
    """(the batch, its caches in fp8 with the step's K/V written by store_kv over NaN poison)."""
    batch = random_paged_batch(chunks, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
                               seed=seed, device=DEVICE)
    (k_cache, v_cache), _ = _fp8_caches(batch)
    assert v_cache.stride(1) == 1   # keys-contiguous
    for cache in (k_cache, v_cache):
        cache[batch.slot_mapping // 16, batch.slot_mapping % 16] = float("nan")
    store_kv(batch.key, batch.value, k_cache, v_cache, batch.slot_mapping, *FP8_SCALES)
    return batch, k_cache, v_cache


def test_fp8_cache_store_then_attend_stays_near_full_precision():
    batch, k_cache, v_cache = _fp8_store_then_attend([(20, 12), (0, 9), (40, 1)], seed=11)
    out = pa.paged_prefill_attention(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.scale, batch.max_query_len, None, *FP8_SCALES)
    assert 0 < relative_l2(out, _prefill_ref(batch)) < FP8_CACHE_ERROR


def test_fp8_cache_store_then_decode_stays_near_full_precision():
    batch, k_cache, v_cache = _fp8_store_then_attend([(29, 1), (63, 1), (140, 1)], seed=12)
    out = pa.paged_decode_attention(batch.q, k_cache, v_cache, batch.seq_lens, batch.block_tables, batch.scale, None,
                                    *FP8_SCALES)
    assert 0 < relative_l2(out, _decode_ref(batch)) < FP8_CACHE_ERROR
