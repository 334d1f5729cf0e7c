"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer, and optionally
with the per-token fp8 quantization of its output for the fp8 projection that follows it.

Two weight conventions: Llama's (`weight * normed`, normed rounded to the input dtype first) and Gemma's
(`unit_offset`: the checkpoint stores w - 1, and `normed * (1 + w)` is taken in fp32 before rounding).
"""
import torch
import triton
import triton.language as tl

from batchgen.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, quantize_fp8_ref


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 unit_offset: bool = False):
    """x [..., H]. Without residual: returns normed x. With residual: x += residual first and returns
    (normed, x + residual), the second being the next layer's residual. Normalisation runs in fp32 and is
    cast back before the weight, as Hugging Face's Llama/Qwen RMSNorm does (with unit_offset: after the
    weight, as Gemma's does)."""
    if residual is not None:
        x = x + residual
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        normed = (hidden * (1.0 + weight.float())).to(x.dtype)
    else:
        normed = weight * hidden.to(x.dtype)
    return normed if residual is None else (normed, x)


def rms_norm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                     unit_offset: bool = False):
    """`rms_norm_ref` with its normed output [T, H] quantized per token: (fp8 [T, H], scales [T, 1]) in its
    place."""
    result = rms_norm_ref(x, weight, eps, residual, unit_offset)
    normed = result if residual is None else result[0]
    quantized = quantize_fp8_ref(normed.reshape(-1, normed.shape[-1]))
    return quantized if residual is None else (quantized, result[1])


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, scale_ptr, hidden_size, eps,
                     stride_x, stride_r, stride_o, stride_ro, fp8_max, min_scale, HAS_RESIDUAL: tl.constexpr,
                     UNIT_OFFSET: tl.constexpr, QUANTIZE: tl.constexpr, BLOCK: tl.constexpr):
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
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        out = hidden * inv_rms * (1.0 + weight)
    else:
        out = weight * (hidden * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    if QUANTIZE:
        # the normed value in the compute dtype is what gets quantized, as in the reference
        out = out.to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(out), 0) / fp8_max, min_scale)
        out = tl.clamp(tl.div_rn(out, scale), -fp8_max, fp8_max)
        tl.store(scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             unit_offset: bool = False):
    """Triton twin of `rms_norm_ref`: one program per row; inputs are not modified."""
    out_dtype = x.dtype if unit_offset else torch.result_type(weight, x)
    out, _, residual_out = _launch(x, weight, eps, residual, out_dtype, unit_offset, quantize=False)
    out = out.view(x.shape)
    return out if residual is None else (out, residual_out.view(x.shape))


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 unit_offset: bool = False, out_dtype: torch.dtype = FP8):
    """Triton twin of `rms_norm_fp8_ref`. A wider out_dtype keeps the scaled values unrounded (tests: the
    interpreter's own fp8 rounding is wrong for some values)."""
    assert weight.dtype == x.dtype
    out, scales, residual_out = _launch(x, weight, eps, residual, out_dtype, unit_offset, quantize=True)
    return (out, scales) if residual is None else ((out, scales), residual_out.view(x.shape))


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
            out_dtype: torch.dtype, unit_offset: bool, quantize: bool):
    hidden_size = x.shape[-1]
    rows = x.reshape(-1, hidden_size)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    scales = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device) if quantize else out
    if residual is None:
        residual_rows = residual_out = rows  # unused when HAS_RESIDUAL is off
    else:
        residual_rows = residual.reshape(-1, hidden_size)
        residual_out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    assert rows.stride(-1) == residual_rows.stride(-1) == weight.stride(-1) == 1
    block = triton.next_power_of_2(hidden_size)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, residual_rows, weight, out, residual_out, scales, hidden_size, eps, rows.stride(0),
            residual_rows.stride(0), out.stride(0), residual_out.stride(0), FP8_MAX, MIN_SCALE,
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, QUANTIZE=quantize, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16))
    return out, scales, residual_out
