"""Attention over the paged KV cache.

Layout: caches are [num_blocks, block_size, num_kv_heads, head_dim]; `block_tables[b]` lists sequence b's
blocks in order. Queries of a step form one flat batch: sequence b owns query rows
`query_start_loc[b]:query_start_loc[b+1]`, which are its last tokens, so query row j of a chunk of length
q sits at position `seq_lens[b] - q + j` and sees keys at positions up to and including its own (causal).
That one rule covers prefill, chunked prefill on top of cached context (prefix hits) and decode.

A sliding-window layer (`sliding_window=W`) lets the query at position p see only keys in (p - W, p], as
Hugging Face's sliding-window mask does for every family (`kv_idx > q_idx - sliding_window`); the kernels skip
key tiles wholly outside the window. None means global attention.

An fp8 cache (see kernels/store_kv.py) is read as K * k_scale and V * v_scale: the kernels load fp8 tiles, widen
them to the query's dtype (fp16 for a bf16 query: `_query_for_cache`), fold k_scale into the softmax scale and
v_scale into the output. Its V pages are keys-contiguous (store_kv.cache_views); the kernels read either layout
from the caches' strides (Triton compiles a stride of 1 in as a constant: the contiguous axis). Prefill
rounds a 16-bit query to fp8 as well, one scale per head row (`prefill_rounds_query_to_fp8`), so its scores multiply
the K tiles as they are (Hopper's fp8 tensor-core product); decode keeps its query (Hopper multiplies fp8 only in
64-row warpgroup tiles: a one-warp decode tile's fp8 product is widened to fp16 anyway).
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from batchgen.kernels.store_kv import KV_FP8, dequantize_kv_ref, kv_scales, round_to_e4m3


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[len(block_ids) * block_size, Hkv, D]: the blocks' keys (or values) in order (index_select on whole
    blocks: several times faster on the CPU than advanced indexing)."""
    return cache.index_select(0, block_ids.flatten().long()).reshape(-1, *cache.shape[2:])


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, start: int, seq_len: int, scale: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """[seq_len - start, Hkv, D] keys (or values) of positions [start, seq_len) of one sequence, in order, in
    `dtype` (dequantized)."""
    block_size = cache.shape[1]
    first_block, num_blocks = start // block_size, (seq_len + block_size - 1) // block_size
    blocks = _gather_blocks(cache, block_table[first_block:num_blocks])
    return dequantize_kv_ref(blocks[start - first_block * block_size:seq_len - first_block * block_size], scale, dtype)


def _window_start(query_start: int, sliding_window: int | None) -> int:
    """The first key position a query at position query_start (or later) may see."""
    return 0 if sliding_window is None else max(0, query_start - sliding_window + 1)


def prefill_rounds_query_to_fp8(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether prefill attention rounds the query to fp8 (see `prefill_launch_config`): a 16-bit query over an fp8
    cache, at a head size the Triton kernel runs. The reference does the same, so the CPU runs the GPU's numerics
    (and the head sizes that run the reference on the GPU too, Phi-3's 96, keep their query)."""
    return (cache_dtype == KV_FP8 and dtype in (torch.float16, torch.bfloat16) and supports_head_dim(head_dim)
            and head_dim <= 128)


def fp8_query_ref(q: torch.Tensor) -> torch.Tensor:
    """q as the kernels' fp8 query sees it (`_fp8_query`): each head's row rounded to e4m3 at a scale that takes its
    largest value to 448, then scaled back, in fp32."""
    q = q.float()
    row_scale = q.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448.0
    return (q / row_scale).to(KV_FP8).float() * row_scale


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                                block_tables: torch.Tensor, scale: float, max_query_len: int,
                                sliding_window: int | None = None, k_scale: float = 1.0,
                                v_scale: float = 1.0) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; varlen causal attention of query chunks to their paged context."""
    out = torch.empty_like(q)
    if prefill_rounds_query_to_fp8(q.dtype, k_cache.dtype, q.shape[2]):
        q = fp8_query_ref(q).to(q.dtype)
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        first_query = seq_len - (end - start)
        first_key = _window_start(first_query, sliding_window)
        # [1, heads, tokens, head_dim]: the batched layout takes torch's fused CPU kernels
        keys = _gather_context(k_cache, block_tables[b], first_key, seq_len, k_scale, q.dtype).transpose(0, 1)[None]
        values = _gather_context(v_cache, block_tables[b], first_key, seq_len, v_scale, q.dtype).transpose(0, 1)[None]
        query = q[start:end].transpose(0, 1)[None]
        if first_query == first_key == 0 and sliding_window is None:   # plain causal attention: the fast path
            attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                      enable_gqa=True)
        else:
            query_pos = torch.arange(first_query, seq_len, device=q.device)[:, None]
            key_pos = torch.arange(first_key, seq_len, device=q.device)[None, :]
            mask = key_pos <= query_pos
            if sliding_window is not None:
                mask &= key_pos > query_pos - sliding_window
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                                      enable_gqa=True)
        out[start:end] = attended[0].transpose(0, 1)
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                               sliding_window: int | None = None, k_scale: float = 1.0,
                               v_scale: float = 1.0) -> torch.Tensor:
    """q [B, Hq, D], one query token per sequence at position seq_lens[b] - 1 -> out [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = (int(seq_lens.max()) + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks]
    keys = dequantize_kv_ref(_gather_blocks(k_cache, tables), k_scale, q.dtype)
    values = dequantize_kv_ref(_gather_blocks(v_cache, tables), v_scale, q.dtype)
    keys = keys.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = values.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    key_pos = torch.arange(keys.shape[2], device=q.device)[None, :]
    seq_lens = seq_lens[:, None].to(q.device)
    mask = key_pos < seq_lens
    if sliding_window is not None:
        mask &= key_pos >= seq_lens - sliding_window
    # the query heads sharing a KV head become that head's query rows: no K/V repeated per query head
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    return attended.reshape(batch, num_heads, head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels. Both attention kernels run one program per (query tile or split, KV head) and pack the query
# heads that share that KV head into the rows of one tile, so each K/V tile is loaded once per group.
# Softmax runs in base 2 with the scale folded into qk_scale = scale * k_scale * log2(e); accumulation is fp32, and
# v_scale multiplies the normalised output.
# ---------------------------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30   # the window of a global layer: wider than any context


def _window(sliding_window: int | None) -> int:
    return _NO_WINDOW if sliding_window is None else sliding_window


@triton.jit
def _query_for_cache(q, qk_scale, k_cache_ptr):
    """The query tile in the dtype the dots run in, and the scale still to apply to its scores. Over an fp8 cache a
    bf16 query runs in fp16: Hopper widens fp8 to fp16 in one instruction per two values and to bf16 only through
    fp16 (two more per value, the decode kernel's bottleneck). The query is scaled first, so its scores stay far
    inside fp16's range; fp16 holds more mantissa than bf16, so nothing is lost."""
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        if q.dtype == tl.bfloat16:
            q = (q.to(tl.float32) * qk_scale).to(tl.float16)
            qk_scale = 1.0
    return q, qk_scale


@triton.jit
def _fp8_query(q, qk_scale):
    """The query tile in fp8 (e4m3) with one scale per row (its largest value to 448), and the softmax scale times
    each row's scale, as a column to multiply the scores by. Over an fp8 cache the scores then come from an fp8 x
    fp8 product that reads K tiles as stored: none is widened and written back to shared memory (kernel_sass.py)."""
    q = q.to(tl.float32)
    row_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 448.0
    return round_to_e4m3(q / row_scale[:, None]).to(tl.float8e4nv), qk_scale * row_scale[:, None]


@triton.jit
def _attend_key_tile(acc, m_i, l_i, q, q_pos, key_start, block_table_row, k_cache_ptr, v_cache_ptr, kv_head,
                     seq_len, window, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     stride_vd, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
    """One online-softmax step: fold keys [key_start, key_start + BLOCK_N) into (acc, m_i, l_i); key_start is a
    multiple of BLOCK_N. MASKED tiles apply the causal rule key_pos <= q_pos, the window key_pos > q_pos - window
    and the end of the context; the others need none of them. A row that sees no key of a masked tile leaves its
    state as it was."""
    key_pos = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    in_context = key_pos < seq_len
    # a masked tile's keys past the context read the last page's block (their scores and values are masked), so
    # that with pages of a power of two each run of min(PAGE, BLOCK_N) keys shares one block: a keys-contiguous V
    # cache's loads then become 16-byte vectors along the keys. With such pages the tile's block numbers are read
    # once a page, as scalars (prefetched like the tiles): read once a key, as a vector, they were loaded twice, in
    # the K and in the V tile's layout, and the V one's 4-byte copies took ~190 of the fp8 prefill loop's 969
    # instructions (kernel_sass.py; prefill 1.12-1.20x faster without them, docs/benchmarks.md).
    if (PAGE & (PAGE - 1)) == 0:
        PAGES: tl.constexpr = BLOCK_N // PAGE if PAGE < BLOCK_N else 1
        first_page = key_start // PAGE
        last_page = tl.maximum(seq_len - 1, 0) // PAGE
        block = tl.load(block_table_row + (tl.minimum(first_page, last_page) if MASKED else first_page))
        for i in tl.static_range(1, PAGES):
            page = tl.minimum(first_page + i, last_page) if MASKED else first_page + i
            block = tl.where(tl.arange(0, BLOCK_N) // PAGE == i, tl.load(block_table_row + page), block)
        key_pos = tl.multiple_of(key_pos, BLOCK_N)
    else:
        page = (tl.minimum(key_pos, tl.maximum(seq_len - 1, 0)) if MASKED else key_pos) // PAGE
        block = tl.load(block_table_row + page)
    if WIDE_OFFSETS:
        block = block.to(tl.int64)
    slot_in_block = key_pos % PAGE
    k_rows = block * stride_kb + slot_in_block * stride_ks + kv_head * stride_kh
    v_rows = block * stride_vb + slot_in_block * stride_vs + kv_head * stride_vh
    if MASKED:
        k_t = tl.load(k_cache_ptr + k_rows[None, :] + dims[:, None], mask=in_context[None, :], other=0.0)
    else:
        k_t = tl.load(k_cache_ptr + k_rows[None, :] + dims[:, None])
    # an fp8 cache's tile widened to the query's dtype (fp16 for a bf16 model, see _query_for_cache; a no-op
    # otherwise and under an fp8 query, whose P x V runs in fp16); k_scale is in qk_scale
    qk = tl.dot(q, k_t.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
    if q.dtype == tl.float8e4nv:
        pv_dtype: tl.constexpr = tl.float16
    else:
        pv_dtype: tl.constexpr = q.dtype
    if MASKED:
        visible = ((key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - window)
                   & in_context[None, :])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # rows with nothing visible so far keep m = -inf; exp2 of (-inf) - (-inf) would be NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # stride_vs == 1 (an fp8 cache: keys-contiguous pages) or stride_vd == 1 arrives as a constant: the contiguous axis
    v_offsets = v_rows[:, None] + dims[None, :] * stride_vd
    v = tl.load(v_cache_ptr + v_offsets)
    if MASKED:
        # zeros past the context (its slots may hold anything, NaN too); a load masked along the keys would split
        # a keys-contiguous V tile's 16-byte loads into bytes
        v = tl.where(in_context[:, None], v, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(pv_dtype), v.to(pv_dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_row, q_start, q_len, seq_len, first_token,
                  kv_head, window, qk_scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                  FP8_QUERY: tl.constexpr):
    """Attention of ROWS // GROUP query tokens from first_token on, x the GROUP heads of kv_head (row r: token
    r // GROUP, head r % GROUP of the group), over their causal context (within the window)."""
    TOKENS: tl.constexpr = ROWS // GROUP
    cached_len = seq_len - q_len
    rows = tl.arange(0, ROWS)
    row_token = first_token + rows // GROUP
    row_head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < TOKENS * GROUP) & (row_token < q_len)
    q_pos = cached_len + row_token
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_start + row_token)[:, None] * stride_qt + row_head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None], other=0.0)
    if FP8_QUERY:
        q, qk_scale = _fp8_query(q, qk_scale)
    else:
        q, qk_scale = _query_for_cache(q, qk_scale, k_cache_ptr)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    # Key tiles that every row of the tile sees whole need no mask: those at or after the last row's window
    # start and before the first row's position. Tiles before the first row's window start and past the last
    # row's position are skipped; the rest are masked.
    first_pos = cached_len + first_token
    last_pos = cached_len + tl.minimum(first_token + TOKENS, q_len) - 1
    window_start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    unmasked_start = tl.minimum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, unmasked_end)
    for key_start in range(window_start, unmasked_start, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(acc, m_i, l_i, q, q_pos, key_start, block_table_row, k_cache_ptr,
                                         v_cache_ptr, kv_head, seq_len, window, qk_scale, stride_kb, stride_ks,
                                         stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, PAGE, BLOCK_N,
                                         HEAD_DIM, True, DOT_PRECISION, WIDE_OFFSETS)
    for key_start in range(unmasked_start, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(acc, m_i, l_i, q, q_pos, key_start, block_table_row, k_cache_ptr,
                                         v_cache_ptr, kv_head, seq_len, window, qk_scale, stride_kb, stride_ks,
                                         stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, PAGE, BLOCK_N,
                                         HEAD_DIM, False, DOT_PRECISION, WIDE_OFFSETS)
    for key_start in range(unmasked_end, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(acc, m_i, l_i, q, q_pos, key_start, block_table_row, k_cache_ptr,
                                         v_cache_ptr, kv_head, seq_len, window, qk_scale, stride_kb, stride_ks,
                                         stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, PAGE, BLOCK_N,
                                         HEAD_DIM, True, DOT_PRECISION, WIDE_OFFSETS)
    out = acc * (v_scale / l_i)[:, None]
    out_offsets = (q_start + row_token)[:, None] * stride_ot + row_head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# Arguments that change from step to step are not specialized on (Triton would compile a variant for each
# value that is 1 or a multiple of 16): a compile in the middle of a job costs seconds.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
                    block_tables_ptr, window, qk_scale, v_scale, num_seqs,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                    SHORT_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WIDE_OFFSETS: tl.constexpr, FP8_QUERY: tl.constexpr):
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    # the last tiles (latest positions, longest contexts) start first, so the short ones fill the tail
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)

    # Sequence b owns tiles [qsl[b] // TOKENS + b, qsl[b+1] // TOKENS + b + 1): at least cdiv(q_len, TOKENS) of
    # them, so a grid of T // TOKENS + B tiles covers every chunk without a prefix sum. Binary search for b.
    lo = tl.program_id(0) * 0
    hi = lo + num_seqs - 1  # (lo + ...: num_seqs == 1 arrives as a constant, the loop needs a tensor)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        starts_before = tl.load(query_start_loc_ptr + mid) // TOKENS + mid <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_token = (tile - (q_start // TOKENS + seq)) * TOKENS
    if first_token >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    block_table_row = block_tables_ptr + seq * stride_bt
    if q_len * GROUP <= SHORT_ROWS:
        # decode rows (and other tiny chunks) of a mixed batch: a 16-row tile instead of BLOCK_M mostly-empty rows
        _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_row, q_start, q_len, seq_len,
                      first_token, kv_head, window, qk_scale, v_scale, stride_qt, stride_qh, stride_ot,
                      stride_oh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, GROUP,
                      HEAD_DIM, PAGE, SHORT_ROWS, BLOCK_N, DOT_PRECISION, WIDE_OFFSETS, FP8_QUERY)
    else:
        _prefill_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_row, q_start, q_len, seq_len,
                      first_token, kv_head, window, qk_scale, v_scale, stride_qt, stride_qh, stride_ot,
                      stride_oh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, GROUP,
                      HEAD_DIM, PAGE, BLOCK_M, BLOCK_N, DOT_PRECISION, WIDE_OFFSETS, FP8_QUERY)


@triton.jit(do_not_specialize=["keys_per_split", "num_splits", "stride_bt"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr, seq_lens_ptr,
                         block_tables_ptr, window, qk_scale, v_scale, keys_per_split, num_splits,
                         num_heads,
                         stride_qb, stride_qh, stride_ob, stride_oh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                         GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         WIDE_OFFSETS: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # the query sees keys [window_start, seq_len) (window_start > 0 on a sliding-window layer); the splits, and
    # the key tiles in them, start at multiples of BLOCK_N from the tile that holds window_start
    window_start = tl.maximum(seq_len - window, 0)
    split_start = window_start // BLOCK_N * BLOCK_N + split * keys_per_split
    if SPLIT:
        if split_start >= seq_len:
            return  # the reduction reads only splits that hold keys
    split_end = tl.minimum(split_start + keys_per_split, seq_len)

    # rows past GROUP pad the tile up to the 16 rows tl.dot needs; they read zeros and are never stored
    rows = tl.arange(0, GROUP_ROWS)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qb + head[:, None] * stride_qh + dims[None, :], mask=row_valid[:, None],
                other=0.0)
    q, qk_scale = _query_for_cache(q, qk_scale, k_cache_ptr)
    q_pos = tl.zeros([GROUP_ROWS], tl.int32) + seq_len - 1
    m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], tl.float32)
    block_table_row = block_tables_ptr + seq * stride_bt
    tiles_start = split_start
    if tiles_start < window_start:
        # the window's first tile starts before it: masked (only split 0 of a sliding-window layer)
        acc, m_i, l_i = _attend_key_tile(acc, m_i, l_i, q, q_pos, tiles_start, block_table_row, k_cache_ptr,
                                         v_cache_ptr, kv_head, seq_len, window, qk_scale, stride_kb, stride_ks,
                                         stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, PAGE, BLOCK_N,
                                         HEAD_DIM, True, DOT_PRECISION, WIDE_OFFSETS)
        tiles_start += BLOCK_N
    # the query sees every key of the tiles from there to the split's end (it ends at or before the query's own),
    # and keys_per_split is a multiple of BLOCK_N: only a last, partial tile needs the mask
    full_end = tiles_start + tl.maximum(split_end - tiles_start, 0) // BLOCK_N * BLOCK_N
    for key_start in range(tiles_start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(acc, m_i, l_i, q, q_pos, key_start, block_table_row, k_cache_ptr,
                                         v_cache_ptr, kv_head, seq_len, window, qk_scale, stride_kb, stride_ks,
                                         stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, PAGE, BLOCK_N,
                                         HEAD_DIM, False, DOT_PRECISION, WIDE_OFFSETS)
    if full_end < split_end:
        acc, m_i, l_i = _attend_key_tile(acc, m_i, l_i, q, q_pos, full_end, block_table_row, k_cache_ptr,
                                         v_cache_ptr, kv_head, seq_len, window, qk_scale, stride_kb, stride_ks,
                                         stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, PAGE, BLOCK_N,
                                         HEAD_DIM, True, DOT_PRECISION, WIDE_OFFSETS)
    if not SPLIT:
        # an empty context (padding rows of a graph batch) yields zeros, not NaN
        out = acc * (v_scale / tl.maximum(l_i, 1e-30))[:, None]
        tl.store(out_ptr + seq * stride_ob + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        partial_row = (seq * num_heads + head) * num_splits + split
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dims[None, :], acc * (v_scale / l_i)[:, None],
                 mask=row_valid[:, None])
        tl.store(partial_lse_ptr + partial_row, m_i + tl.log2(l_i), mask=row_valid)


@triton.jit(do_not_specialize=["keys_per_split", "num_splits"])
def _decode_reduce_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, seq_lens_ptr, window, keys_per_split,
                          num_splits, num_heads, stride_ob, stride_oh, HEAD_DIM: tl.constexpr,
                          MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # the split kernel's splits start at the tile that holds the window's first key
    tiles_start = tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N
    num_used = tl.minimum(tl.cdiv(seq_len - tiles_start, keys_per_split), num_splits)
    splits = tl.arange(0, MAX_SPLITS)
    used = splits < num_used
    partial_row = (seq * num_heads + head) * num_splits + splits
    lse = tl.load(partial_lse_ptr + partial_row, mask=used, other=float("-inf"))
    lse_max = tl.where(num_used > 0, tl.max(lse, 0), 0.0)
    weight = tl.exp2(lse - lse_max)
    dims = tl.arange(0, HEAD_DIM)
    partial = tl.load(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None],
                      other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.maximum(tl.sum(weight, 0), 1e-30)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def supports_head_dim(head_dim: int) -> bool:
    """The Triton kernels tile head_dim whole: a power of two, at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check_attention_shapes(q: torch.Tensor, k_cache: torch.Tensor) -> int:
    """Returns the GQA group size."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if not supports_head_dim(head_dim):
        raise ValueError(f"Triton paged attention needs a power-of-two head_dim >= 16, got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and the KV cache need a contiguous head_dim")
    return num_heads // num_kv_heads


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models get true fp32 products (Triton's default would be tf32); fp16/bf16 ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


# Element offsets into a cache below this stay int32 in the kernels; 64-bit address math cost the fp8 decode loop
# 11% more instructions (kernel_sass.py: 883 against 794 per 32-key tile)
_INT32_OFFSETS_BELOW = 2**31


def _wide_offsets(*caches: torch.Tensor) -> bool:
    """Whether an element offset into one of the caches can reach int32's limit."""
    return any(sum((size - 1) * stride for size, stride in zip(cache.shape, cache.stride())) >= _INT32_OFFSETS_BELOW
               for cache in caches)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: pretend to be an H100 so CPU tests take the same code paths


def _short_rows(group: int) -> int:
    """Rows of the smallest tile tl.dot takes that holds at least one token's group of heads."""
    return max(16, triton.next_power_of_2(group))


def prefill_launch_config(head_dim: int, group: int, max_query_len: int, dtype: torch.dtype,
                          cache_dtype: torch.dtype | None = None) -> dict:
    """BLOCK_M (query rows = tokens x group heads), BLOCK_N (keys per step), warps and pipeline stages, as swept
    on an H100 with benchmarks/kernels_gpu.py. Short chunks get a short tile so few rows are wasted.
    Over an fp8 cache a 16-bit query is rounded to fp8 too (FP8_QUERY: the scores' product reads K tiles as they
    are, fp8 x fp8): swept on an H200 (docs/benchmarks.md, thirteenth session) 1.10-1.29x the fp16 query, at
    0.022-0.026 relative L2 from the unrounded query (the fp8 K/V cost 0.03). Its tiles hold 64 rows as well: 128-row
    ones spill registers (kernel_sass.py) and ran 1.6-3.7% slower (H200, eighteenth session)."""
    wide = head_dim > 128 or dtype == torch.float32
    fp8_query = prefill_rounds_query_to_fp8(dtype, cache_dtype, head_dim)
    block_m = max(_short_rows(group), min(64, triton.next_power_of_2(max_query_len * group)))
    return dict(BLOCK_M=block_m, BLOCK_N=32 if wide else 64, num_warps=4, num_stages=2 if wide else 3,
                FP8_QUERY=fp8_query)


def _paged_prefill(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len, out,
                   config: dict, sliding_window: int | None = None, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> torch.Tensor:
    group = _check_attention_shapes(q, k_cache)
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
    if num_tokens == 0:
        return out
    tokens_per_tile = config["BLOCK_M"] // group
    assert tokens_per_tile >= 1, "BLOCK_M must hold a whole group of query heads"
    grid = (num_tokens // tokens_per_tile + num_seqs, k_cache.shape[2])
    config = dict(FP8_QUERY=False) | config
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, _window(sliding_window),
        scale * k_scale * _LOG2E, v_scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], *v_cache.stride(),
        block_tables.stride(0), GROUP=group, HEAD_DIM=q.shape[2], PAGE=k_cache.shape[1],
        SHORT_ROWS=min(config["BLOCK_M"], _short_rows(group)), DOT_PRECISION=_dot_precision(q.dtype),
        WIDE_OFFSETS=_wide_offsets(k_cache, v_cache), **config)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_query_len: int, sliding_window: int | None = None,
                            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Triton twin of `paged_prefill_attention_ref` (power-of-two head_dim >= 16)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    config = prefill_launch_config(q.shape[2], q.shape[1] // k_cache.shape[2], max_query_len, q.dtype,
                                   k_cache.dtype)
    return _paged_prefill(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len, out,
                          config, sliding_window, k_scale, v_scale)


_DECODE_MAX_SPLITS = 64
_DECODE_MAX_BLOCK_N = 128
_DECODE_MIN_KEYS_PER_SPLIT = 256


def decode_max_keys(table_keys: int, sliding_window: int | None) -> int:
    """The most keys a decode split kernel's splits must cover for block tables of table_keys keys: a sliding
    window's, counted from the start of the key tile that holds its first (tiles are at most 128 keys)."""
    return table_keys if sliding_window is None else min(table_keys, sliding_window + _DECODE_MAX_BLOCK_N - 1)


def decode_launch_config(batch: int, num_kv_heads: int, head_dim: int, max_keys: int, device: torch.device,
                         dtype: torch.dtype, num_splits: int | None = None) -> dict:
    """Split the context so that batch x kv heads x splits is about 2 programs of 4 warps per SM (3 of one warp),
    but no split holds fewer than 256 keys (swept on an H100: more splits only add partials to write and reduce).
    Only shapes go in (max_keys from `decode_max_keys`), so the launch can be captured in a CUDA graph.
    16-bit models (head_dim <= 128) take one warp per program over 32-key tiles, 5 stages deep, over either cache,
    swept on an H200 (docs/benchmarks.md, 2026-12-01): over an fp8 cache 1.04-1.28x the 4-warp 128-key tiles on
    batches of 32-856 rows (small programs let more of them overlap their loads on each SM), over a 16-bit cache as
    fast on 256-856 rows and 1.02-1.16x on 1-64 rows of 4k-32k keys. Their splits, swept on the H200:
    8 rows of 8k keys 0.072 ms at 5 splits, 0.059 at 10, 0.071 at 20; 64 rows of 4k keys best unsplit (0.178 ms,
    0.199 at 2); one row of 32k keys best at 64. 16-key tiles (10 programs an SM) and 7 stages lost or tied
    (sixteenth session), as did every launch over the old fp8 V pages, which the keys-contiguous ones beat 1.2-1.3x."""
    if dtype != torch.float32 and head_dim <= 128:
        block_n, num_warps, num_stages = 32, 1, 5
    else:
        block_n = 32 if dtype == torch.float32 else 128 if head_dim <= 128 else 64
        num_warps, num_stages = 4, 2 if dtype == torch.float32 else 3
    if num_splits is None:
        programs_per_sm = 3 if num_warps == 1 else 2
        wanted = triton.cdiv(programs_per_sm * _num_sms(device), batch * num_kv_heads)
        num_splits = min(wanted, triton.cdiv(max_keys, _DECODE_MIN_KEYS_PER_SPLIT), _DECODE_MAX_SPLITS)
    num_splits = max(1, min(num_splits, triton.cdiv(max_keys, block_n), _DECODE_MAX_SPLITS))
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    return dict(num_splits=triton.cdiv(max_keys, keys_per_split), keys_per_split=keys_per_split, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=num_stages)


def _paged_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, out, config: dict,
                  sliding_window: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    group = _check_attention_shapes(q, k_cache)
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_splits, keys_per_split = config["num_splits"], config["keys_per_split"]
    if batch == 0:
        return out
    if num_splits > 1:
        # one buffer for both partials: [B, Hq, S, D] outputs then [B, Hq, S] log-sum-exps (base 2)
        partials = torch.empty(batch * num_heads * num_splits * (head_dim + 1), dtype=torch.float32,
                               device=q.device)
        partial_out, partial_lse = partials.split([batch * num_heads * num_splits * head_dim,
                                                   batch * num_heads * num_splits])
    else:
        partial_out = partial_lse = out  # unused: the split kernel writes `out` directly
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, partial_out, partial_lse, seq_lens, block_tables, _window(sliding_window),
        scale * k_scale * _LOG2E, v_scale, keys_per_split, num_splits, num_heads, q.stride(0),
        q.stride(1),
        out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride(), block_tables.stride(0),
        GROUP=group, GROUP_ROWS=_short_rows(group), HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_N=config["BLOCK_N"], SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q.dtype),
        WIDE_OFFSETS=_wide_offsets(k_cache, v_cache),
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            partial_out, partial_lse, out, seq_lens, _window(sliding_window), keys_per_split, num_splits, num_heads,
            out.stride(0),
            out.stride(1), HEAD_DIM=head_dim, MAX_SPLITS=_DECODE_MAX_SPLITS, BLOCK_N=config["BLOCK_N"], num_warps=4)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Triton twin of `paged_decode_attention_ref` (flash-decoding); never reads device memory on the host, so
    it can be captured in a CUDA graph (the scales are host floats, fixed per layer). Sequences of length 0
    (graph padding) get zeros. A sliding-window layer splits only the window's keys."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    max_keys = decode_max_keys(block_tables.shape[1] * k_cache.shape[1], sliding_window)
    config = decode_launch_config(q.shape[0], k_cache.shape[2], q.shape[2], max_keys, q.device, q.dtype)
    return _paged_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, out, config, sliding_window, k_scale,
                         v_scale)
