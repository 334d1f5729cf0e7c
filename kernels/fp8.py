"""fp8 (float8_e4m3fn) activation quantization and fp8 GEMMs.

Scales multiply: a quantized value q with scale s stands for q * s. Activations are quantized per token (one
scale per row) or per token per column group (the block-scaled GEMM's input); weights carry one scale per
output channel or one per [block_n, block_k] block. Every reference computes in fp32 from the fp8 values, as
the GPU kernels do (fp8 products accumulated in fp32, scales applied to the fp32 sums), so the CPU runs the
numerics the GPU runs.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from batchgen.kernels.paged_attention import _dot_precision

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max   # 448
# the smallest scale: a row of zeros (padding) quantizes to zeros instead of dividing by zero
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_fp8_ref(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], fp32 scales [T, 1], or [T, K / group_size] with groups of columns)."""
    rows = x.float().view(x.shape[0], -1, group_size or x.shape[1])
    scales = (rows.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    quantized = (rows / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized.view(x.shape), scales.squeeze(-1)


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] quantized with a checkpoint's static per-tensor scale -> (fp8 [T, K], that scale as [T, 1])."""
    quantized = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    # a row-wise [T, 1] scale (contiguous): _scaled_mm pairs it with the weight's row-wise scales
    return quantized, scale.float().reshape(1, 1).repeat(x.shape[0], 1)


def fp8_gemm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """x_q [T, K] fp8 with x_scale [T, 1]; w_q [N, K] fp8 with w_scale [N] -> [T, N] in out_dtype."""
    return ((x_q.float() @ w_q.float().T) * x_scale * w_scale).to(out_dtype)


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """GPU twin of `fp8_gemm_ref`: torch._scaled_mm with row-wise scales (cuBLASLt/CUTLASS fp8 tensor cores)."""
    return torch._scaled_mm(x_q, w_q.T, scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)


def fp8_block_gemm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """x_q [T, K] fp8 with x_scale [T, K / block_k] (per token per column group); w_q [N, K] fp8 with
    w_scale [ceil(N / block_n), K / block_k] -> [T, N] in out_dtype, from the fp32 dequantized operands."""
    block_n, block_k = block
    x = x_q.float() * x_scale.repeat_interleave(block_k, dim=1)
    w = w_q.float() * w_scale.repeat_interleave(block_n, dim=0)[:w_q.shape[0]].repeat_interleave(block_k, dim=1)
    return (x @ w.T).to(out_dtype)


@triton.jit
def _quantize_fp8_kernel(x_ptr, out_ptr, scale_ptr, num_cols, group_size, stride_x, stride_o, stride_s,
                         fp8_max, min_scale, BLOCK: tl.constexpr):
    """One program per (row, column group): amax, scale, quantize."""
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group_size) & (cols < num_cols)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # the scale as the reference gets it: on the H200 `/` matched torch's division by the scalar bit for bit and
    # div_rn did not; the scaled values are an IEEE division, as torch's tensor / tensor
    scale = tl.maximum(tl.max(tl.abs(x), 0) / fp8_max, min_scale)
    quantized = tl.clamp(tl.div_rn(x, scale), -fp8_max, fp8_max)
    tl.store(out_ptr + row * stride_o + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * stride_s + group, scale)


def quantize_fp8(x: torch.Tensor, group_size: int | None = None,
                 out_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `quantize_fp8_ref`. The rounding to fp8 is the store's cast to `out_dtype`; a wider
    out_dtype keeps the scaled values unrounded, which is how the tests check the arithmetic: Triton's
    interpreter rounds some values to fp8 wrongly (carries into the exponent)."""
    num_rows, num_cols = x.shape
    group_size = group_size or num_cols
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    scales = torch.empty(num_rows, num_cols // group_size, dtype=torch.float32, device=x.device)
    assert x.stride(-1) == 1 and num_cols % group_size == 0
    if num_rows:
        _quantize_fp8_kernel[(num_rows, num_cols // group_size)](
            x, out, scales, num_cols, group_size, x.stride(0), out.stride(0), scales.stride(0), FP8_MAX, MIN_SCALE,
            BLOCK=triton.next_power_of_2(group_size), num_warps=4)
    return out, scales


@triton.jit
def _fp8_block_gemm_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, num_rows, num_cols, depth,
                           stride_x, stride_xs, stride_w, stride_ws, stride_o, scale_block_n,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """One program per [BLOCK_M, BLOCK_N] output tile; BLOCK_K is the scale block's width, so each step over K
    multiplies one scale group: its fp32 product is scaled by the token's and the weight rows' scales."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < num_rows, cols < num_cols
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for group in range(0, tl.cdiv(depth, BLOCK_K)):
        k = group * BLOCK_K + ks
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=col_mask[:, None], other=0.0)
        x_scale = tl.load(x_scale_ptr + rows * stride_xs + group, mask=row_mask, other=0.0)
        w_scale = tl.load(w_scale_ptr + (cols // scale_block_n) * stride_ws + group, mask=col_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION) * x_scale[:, None] * w_scale[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _cuda_at_least(major: int, minor: int) -> bool:
    version = torch.version.cuda
    return version is not None and tuple(int(part) for part in version.split(".")[:2]) >= (major, minor)


# torch's F.scaled_mm with block scales runs cuBLASLt's block-scaled fp8 GEMM (CUDA >= 12.9)
_CUBLAS_BLOCK_SCALED = hasattr(F, "scaled_mm") and _cuda_at_least(12, 9)


@functools.lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def cublas_takes_block_gemm(x_q: torch.Tensor, w_q: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether `fp8_block_gemm_cublas` runs this GEMM: on Hopper (where it was measured), 128x128 weight blocks, and
    the scale layouts cuBLAS asks for (rows and K blocks in multiples of 4, whole blocks of output columns). Other
    GEMMs take the Triton kernel."""
    (num_rows, depth), num_cols = x_q.shape, w_q.shape[0]
    return (_CUBLAS_BLOCK_SCALED and _hopper(x_q.device) and tuple(block) == (128, 128) and num_rows > 0
            and num_rows % 4 == 0 and depth % 512 == 0 and num_cols % 128 == 0)


def fp8_block_gemm_cublas(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """GPU twin of `fp8_block_gemm_ref` for 128x128 blocks: torch's F.scaled_mm with 1x128 activation and 128x128
    weight scales (cuBLASLt). On the H200 it ran Llama-8B's GEMMs at 2.4-3.3x the Triton kernel's rate, at 256 and
    8,192 tokens alike (docs/benchmarks.md, sixth session). cuBLAS reads the activation scales outer-dim-major."""
    return F.scaled_mm(x_q, w_q.t(), x_scale.t().contiguous().t(), F.ScalingType.BlockWise1x128, w_scale.t(),
                       F.ScalingType.BlockWise128x128, output_dtype=out_dtype)


def fp8_block_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of `fp8_block_gemm_ref` (fp8 tensor cores on Hopper; the operands may be carried in a wider
    dtype, which is how the interpreter tests it)."""
    (num_rows, depth), num_cols = x_q.shape, w_q.shape[0]
    block_n, block_k = block
    out = torch.empty(num_rows, num_cols, dtype=out_dtype, device=x_q.device)
    assert x_q.stride(-1) == w_q.stride(-1) == 1 and depth % block_k == 0
    block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
    if num_rows:
        grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, 128))
        _fp8_block_gemm_kernel[grid](
            x_q, x_scale, w_q, w_scale, out, num_rows, num_cols, depth, x_q.stride(0), x_scale.stride(0),
            w_q.stride(0), w_scale.stride(0), out.stride(0), block_n, BLOCK_M=block_m, BLOCK_N=128,
            BLOCK_K=block_k, DOT_PRECISION=_dot_precision(x_q.dtype), num_warps=8 if block_m >= 64 else 4,
            num_stages=3)
    return out
