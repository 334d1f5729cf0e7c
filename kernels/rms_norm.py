"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""
import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [..., H]. Without residual: returns normed x. With residual: x += residual first and returns
    (normed, x + residual), the second being the next layer's residual. Normalisation runs in fp32 and is
    cast back before the weight, as Hugging Face's Llama/Qwen RMSNorm does."""
    if residual is not None:
        x = x + residual
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * hidden.to(x.dtype)
    return normed if residual is None else (normed, x)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden_size, eps,
                     stride_x, stride_r, stride_o, stride_ro, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # rounded to x's dtype before normalising, exactly as the reference's `x + residual`
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    hidden = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hidden * hidden, 0) / hidden_size + eps)
    normed = (hidden * inv_rms).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Triton twin of `rms_norm_ref`: one program per row; inputs are not modified."""
    hidden_size = x.shape[-1]
    rows = x.reshape(-1, hidden_size)
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    if residual is None:
        residual_rows = residual_out = rows  # unused when HAS_RESIDUAL is off
    else:
        residual_rows = residual.reshape(-1, hidden_size)
        residual_out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    assert rows.stride(-1) == residual_rows.stride(-1) == weight.stride(-1) == 1
    block = triton.next_power_of_2(hidden_size)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, residual_rows, weight, out, residual_out, hidden_size, eps, rows.stride(0),
            residual_rows.stride(0), out.stride(0), residual_out.stride(0), HAS_RESIDUAL=residual is not None,
            BLOCK=block, num_warps=min(max(block // 512, 1), 16))
    out = out.view(x.shape)
    return out if residual is None else (out, residual_out.view(x.shape))
