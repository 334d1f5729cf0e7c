"""store_kv, rms_norm, rotary_embedding and the gated activations (Triton) against their torch references."""
import pytest
import torch

from batchgen.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul, silu_and_mul_ref
from batchgen.kernels.rms_norm import rms_norm, rms_norm_ref
from batchgen.kernels.rotary import rotary_embedding, rotary_embedding_ref
from batchgen.kernels.store_kv import KV_FP8, cache_views, store_kv, store_kv_ref
from batchgen.kernels.testing import TEST_DEVICE as DEVICE, TEST_DTYPES as DTYPES, TOLERANCE, relative_l2


def _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v as the strided views a fused qkv projection yields."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 32, 16), (3, 24, 64)])
def test_store_kv_writes_exactly_the_reference_slots(num_kv_heads, head_dim, block_size, dtype):
    num_tokens, num_blocks = 11, 5
    _, key, value = _fused_qkv(num_tokens, 4, num_kv_heads, head_dim, dtype)
    slot_mapping = torch.randperm(num_blocks * block_size)[:num_tokens].to(DEVICE)
    slot_mapping[[2, 7, 10]] = -1  # padding rows: their NaN must never reach the cache
    key[[2, 7, 10]] = float("nan")
    value[[2, 7, 10]] = float("nan")
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(DEVICE, dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_ref, v_ref, slot_mapping)
    store_kv(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_quantizes_to_fp8_like_the_reference(dtype):
    # bit-exact fp8 bytes: ties and values whose rounding carries into the next power of two (x.96875 * 2^e),
    # e4m3 subnormals (3.5e-3 is 1.8 steps of 2^-9), values past +-448 * scale (saturate, never inf/NaN), a
    # negative value that rounds to zero (-0, byte 0x80), padding rows skipped
    num_tokens, num_kv_heads, head_dim, block_size, k_scale, v_scale = 9, 2, 32, 16, 0.25, 0.0625
    _, key, value = _fused_qkv(num_tokens, 4, num_kv_heads, head_dim, dtype)
    key = key * 20
    key[0, 0, :8] = torch.tensor([31.5, 15.75, 7.9, 1.99, 3.5e-3, -31.9, 1e4, -1e4]).to(DEVICE, dtype) * k_scale
    value[1, 1, :5] = torch.tensor([2.0 ** -9, 3 * 2.0 ** -10, 1e3, -500.0, -1e-4]).to(DEVICE, dtype) * v_scale
    slot_mapping = torch.randperm(3 * block_size)[:num_tokens].to(DEVICE)
    slot_mapping[[4, 8]] = -1
    key[[4, 8]] = float("nan")
    # one layer's caches as the engine lays them out: V keys-contiguous, each page's head [head_dim, block_size]
    buffer, ref_buffer = (torch.zeros(2, 3, block_size, num_kv_heads, head_dim, dtype=KV_FP8, device=DEVICE)
                          for _ in range(2))
    (k_cache, v_cache), (k_ref, v_ref) = cache_views(buffer), cache_views(ref_buffer)
    store_kv_ref(key, value, k_ref, v_ref, slot_mapping, k_scale, v_scale)
    store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    assert torch.equal(buffer.view(torch.uint8), ref_buffer.view(torch.uint8))
    block, slot = slot_mapping // block_size, slot_mapping % block_size
    stored_k = k_ref.float()[block[0], slot[0]]
    assert stored_k[0, :8].tolist() == [32.0, 16.0, 8.0, 2.0, 2 ** -8, -32.0, 448.0, -448.0]
    v_pages = ref_buffer[1].view(torch.uint8).view(3, num_kv_heads, head_dim, block_size)
    assert v_pages[block[1], 1, 4, slot[1]] == 0x80
    assert torch.isfinite(k_ref.float()).all() and torch.isfinite(v_ref.float()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama_weight", "gemma_weight"])
def test_rms_norm_matches_reference(unit_offset, with_residual, shape, dtype):
    x = torch.randn(shape).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(DEVICE, dtype)
    residual = torch.randn(shape).to(DEVICE, dtype) if with_residual else None
    x_before = x.clone()
    out = rms_norm(x, weight, 1e-6, residual, unit_offset)
    ref = rms_norm_ref(x.float(), weight.float(), 1e-6, None if residual is None else residual.float(), unit_offset)
    assert torch.equal(x, x_before)
    if with_residual:
        (out, new_residual), (ref, ref_residual) = out, ref
        assert new_residual.dtype == dtype and relative_l2(new_residual, ref_residual) < TOLERANCE[dtype]
    assert out.shape == shape and out.dtype == dtype
    assert relative_l2(out, ref) < TOLERANCE[dtype]


def test_rms_norm_fp32_weight_on_fp16_input_promotes_like_reference():
    x, weight = torch.randn(5, 48).to(DEVICE, torch.float16), 1 + 0.1 * torch.randn(48).to(DEVICE)
    out = rms_norm(x, weight, 1e-5)
    ref = rms_norm_ref(x, weight, 1e-5)
    assert out.dtype == ref.dtype == torch.float32
    assert relative_l2(out, ref) < TOLERANCE[torch.float32]   # an fp16 output would be off by ~1e-3


def _cos_sin_cache(max_positions, head_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim",
                         [(6, 2, 32, 32), (4, 4, 64, 64), (3, 1, 24, 24), (4, 2, 32, 24), (3, 1, 64, 16)])
def test_rotary_matches_reference(num_heads, num_kv_heads, head_dim, rotary_dim, dtype):
    q, k, _ = _fused_qkv(9, num_heads, num_kv_heads, head_dim, dtype)
    positions = torch.randint(0, 100, (9,)).to(DEVICE)
    cos_sin_cache = _cos_sin_cache(100, rotary_dim)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = rotary_embedding(positions, q, k, cos_sin_cache)
    q_ref, k_ref = rotary_embedding_ref(positions, q.float(), k.float(), cos_sin_cache)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    assert q_out.dtype == k_out.dtype == dtype
    assert relative_l2(q_out, q_ref) < TOLERANCE[dtype] and relative_l2(k_out, k_ref) < TOLERANCE[dtype]
    # dims past rotary_dim pass through untouched (partial rotary, Phi-3 / Phi-4-mini)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 160), (2, 3, 2 * 1500)])
@pytest.mark.parametrize("act_and_mul,reference", [(silu_and_mul, silu_and_mul_ref),
                                                    (gelu_tanh_and_mul, gelu_tanh_and_mul_ref)], ids=["silu", "gelu"])
def test_gated_activation_matches_reference(act_and_mul, reference, shape, dtype):
    x = (2 * torch.randn(shape)).to(DEVICE, dtype)
    out = act_and_mul(x)
    ref = reference(x.float())
    assert out.shape == ref.shape and out.dtype == dtype
    assert relative_l2(out, ref) < TOLERANCE[dtype]


def test_attention_on_a_head_dim_the_triton_kernels_do_not_tile_runs_the_reference():
    # Phi-3-mini: head_dim 96
    from batchgen.kernels import ops, paged_attention as pa
    from batchgen.kernels.testing import random_paged_batch

    assert not pa.supports_head_dim(96) and pa.supports_head_dim(128)
    batch = random_paged_batch([(5, 3), (0, 4)], num_heads=4, num_kv_heads=2, head_dim=96, block_size=16,
                               dtype=torch.float32, device=DEVICE)
    k_cache, v_cache = batch.clean_caches()
    out = ops.paged_prefill_attention(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                      batch.block_tables, batch.scale, batch.max_query_len)
    ref = pa.paged_prefill_attention_ref(batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, batch.scale, batch.max_query_len)
    assert torch.equal(out, ref)
