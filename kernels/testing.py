"""Random paged-attention batches, the error metric and the timer, shared by tests/kernels and the GPU benchmarks.

Cache slots no sequence owns (the tail of each last block, and one spare block that unused block-table
entries point at) hold NaN: a kernel that reads past a context's end turns its output into NaN and fails.
"""
import time
from dataclasses import dataclass

import torch

from batchgen.kernels.store_kv import KV_FP8, keys_contiguous_view, quantize_kv_ref

# relative L2 error allowed against an fp32 reference computation on the same inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Where kernel tests run the Triton launchers: on the GPU when there is one (they take CUDA tensors only), else
# on CPU tensors under TRITON_INTERPRET=1; bf16 only on a GPU, as the interpreter computes bf16 arithmetic wrongly.
TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEST_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if TEST_DEVICE.type == "cuda" else [])


@dataclass
class PagedBatch:
    q: torch.Tensor               # [T, Hq, D], the new tokens' queries
    key: torch.Tensor             # [T, Hkv, D], the new tokens' keys (already stored in k_cache)
    value: torch.Tensor           # [T, Hkv, D]
    k_cache: torch.Tensor         # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor        # int32 [B]
    block_tables: torch.Tensor    # int32 [B, max blocks of the batch]
    slot_mapping: torch.Tensor    # int64 [T]
    max_query_len: int
    scale: float

    def clean_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches with the NaN poison zeroed, for references that read whole blocks."""
        return self.k_cache.nan_to_num(0.0), self.v_cache.nan_to_num(0.0)


def random_paged_batch(chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                       block_size: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                       seed: int = 0) -> PagedBatch:
    """One step's batch: chunks[b] = (cached_len, query_len) of sequence b, blocks scattered at random."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq_lens = [cached + new for cached, new in chunks]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1  # + the poison block
    order = torch.randperm(num_blocks, generator=gen)
    poison_block = int(order[-1])
    block_tables = torch.full((len(chunks), max(blocks_per_seq)), poison_block, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = order[used:used + n]
        used += n

    device_gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=device_gen, device=device).to(dtype)

    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    slot_mapping = []
    for b, n in enumerate(seq_lens):
        for cache in (k_cache, v_cache):
            cache[int(block_tables[b, (n - 1) // block_size]), (n - 1) % block_size + 1:] = float("nan")
        positions = torch.arange(n - chunks[b][1], n)
        slot_mapping.append(block_tables[b, positions // block_size].long() * block_size + positions % block_size)
    for cache in (k_cache, v_cache):
        cache[poison_block] = float("nan")
    slot_mapping = torch.cat(slot_mapping).to(device)
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    query_lens = torch.tensor([new for _, new in chunks])
    query_start_loc = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    query_start_loc[1:] = query_lens.cumsum(0)
    return PagedBatch(
        q=rand(int(query_lens.sum()), num_heads, head_dim), key=flat_k[slot_mapping].clone(),
        value=flat_v[slot_mapping].clone(), k_cache=k_cache, v_cache=v_cache,
        query_start_loc=query_start_loc.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device), slot_mapping=slot_mapping, max_query_len=int(query_lens.max()),
        scale=head_dim ** -0.5)


def fp8_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float,
               v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous 16/32-bit caches as an fp8 cache stores them: values x 1 / scale in e4m3 (NaN poison kept), V
    keys-contiguous as the engine lays it out (store_kv.cache_views)."""
    k_fp8, v_fp8 = quantize_kv_ref(k_cache, k_scale, KV_FP8), quantize_kv_ref(v_cache, v_scale, KV_FP8)
    return k_fp8, keys_contiguous_view(torch.empty_like(v_fp8)).copy_(v_fp8)


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; inf when out holds NaN or inf, so non-finite output never passes."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_ms(fn, interpreted: bool, cuda_graph: bool = False) -> float:
    """Median time of fn in ms (triton's do_bench); under the interpreter one run, only to exercise the code.
    cuda_graph: fn captured once and replayed, as the engine's decode steps run it, so a short sequence of
    kernels is not timed at the rate the host launches them."""
    if interpreted:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    if cuda_graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
