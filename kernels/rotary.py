"""Rotary position embedding (GPT-NeoX / Hugging Face "rotate_half" layout) from a precomputed cos/sin table."""
import torch
import triton
import triton.language as tl


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T]; q [T, Hq, D]; k [T, Hkv, D]; cos_sin_cache [max_pos, R] fp32 holding cos in its first
    R/2 columns and sin in the last R/2 (any rope scaling is already folded in). The first R <= D dims of each
    head rotate (partial rotary when R < D), the rest pass through. Returns rotated (q, k)."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, cos, sin, token, num_heads, half, stride_xt, stride_xh, stride_ot, stride_oh,
                  HEADS_POW2: tl.constexpr, HALF_POW2: tl.constexpr):
    heads = tl.arange(0, HEADS_POW2)[:, None]
    dims = tl.arange(0, HALF_POW2)[None, :]
    mask = (heads < num_heads) & (dims < half)
    x_row = x_ptr + token * stride_xt + heads * stride_xh + dims
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    out_row = out_ptr + token * stride_ot + heads * stride_oh + dims
    tl.store(out_row, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + half, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_sin_ptr, num_heads, num_kv_heads, half,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_cos_sin, Q_HEADS_POW2: tl.constexpr, K_HEADS_POW2: tl.constexpr,
                   HALF_POW2: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_POW2)[None, :]
    cos_row = cos_sin_ptr + position * stride_cos_sin + dims
    cos = tl.load(cos_row, mask=dims < half, other=0.0)
    sin = tl.load(cos_row + half, mask=dims < half, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, cos, sin, token, num_heads, half, stride_qt, stride_qh, stride_qot, stride_qoh,
                  Q_HEADS_POW2, HALF_POW2)
    _rotate_heads(k_ptr, k_out_ptr, cos, sin, token, num_kv_heads, half, stride_kt, stride_kh, stride_kot,
                  stride_koh, K_HEADS_POW2, HALF_POW2)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rotary_embedding_ref`: one program per token rotates all its q and k heads with one
    cos/sin load; q and k may be strided views (of a fused qkv projection, say) and are not modified."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim < head_dim:   # partial rotary: the kernel writes the rotated dims over a copy
        q_out, k_out = q.contiguous().clone(), k.contiguous().clone()
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    assert q.stride(2) == k.stride(2) == cos_sin_cache.stride(1) == 1 and rotary_dim % 2 == 0
    if num_tokens:
        half = rotary_dim // 2
        _rotary_kernel[(num_tokens,)](
            positions, q, k, q_out, k_out, cos_sin_cache, num_heads, num_kv_heads, half, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0), Q_HEADS_POW2=triton.next_power_of_2(num_heads),
            K_HEADS_POW2=triton.next_power_of_2(num_kv_heads), HALF_POW2=triton.next_power_of_2(half),
            num_warps=4)
    return q_out, k_out
