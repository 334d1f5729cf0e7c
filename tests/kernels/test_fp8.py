"""fp8 activation quantization (alone and fused into RMSNorm and SiLU-and-mul), the row-wise fp8 GEMM (_scaled_mm)
and the block-scaled fp8 GEMM (Triton) against their torch references. Triton's interpreter rounds some values to
fp8 wrongly, so there the quantizing kernels are checked with their scaled values carried unrounded in fp32 and
rounded here by torch; on the GPU the kernels store fp8 themselves and the hardware rounds."""
import pytest
import torch

from batchgen.kernels import activation
from batchgen.kernels.activation import (gelu_tanh_and_mul_fp8, gelu_tanh_and_mul_fp8_ref, silu_and_mul_fp8,
                                         silu_and_mul_fp8_ref)
from batchgen.kernels.fp8 import (FP8, fp8_block_gemm, fp8_block_gemm_ref, fp8_gemm, fp8_gemm_ref, quantize_fp8,
                                  quantize_fp8_ref)
from batchgen.kernels.rms_norm import rms_norm_fp8, rms_norm_fp8_ref
from batchgen.kernels.testing import TEST_DEVICE as DEVICE, TEST_DTYPES as DTYPES, relative_l2

# what the quantizing kernels store: fp8 on the GPU, the unrounded scaled values under the interpreter
KERNEL_OUT = FP8 if DEVICE.type == "cuda" else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_fp8_matches_the_reference_exactly(dtype, group_size):
    x = (torch.randn(9, 64) * torch.logspace(-3, 2, 9)[:, None]).to(DEVICE, dtype)
    x[4] = 0.0   # an all-zero row (padding) quantizes to zeros with the smallest scale, never NaN
    x[6, :16] = 0.0
    scaled, scales = quantize_fp8(x, group_size, out_dtype=KERNEL_OUT)
    quantized = scaled.to(FP8)
    want_quantized, want_scales = quantize_fp8_ref(x, group_size)
    assert scales.shape == want_scales.shape == (9, 64 // (group_size or 64))
    assert torch.equal(quantized.float(), want_quantized.float())
    assert torch.equal(scales, want_scales)
    # and the reference is what it says: per row (group) amax maps to 448
    groups = x.float().view(9, -1, group_size or 64)
    assert torch.allclose(want_scales[5], groups[5].abs().amax(-1) / 448.0)
    assert torch.equal(quantized[4].float(), torch.zeros(64, device=DEVICE))


@pytest.mark.parametrize("num_rows", [1, 37, 160])
def test_fp8_gemm_matches_the_reference(num_rows):
    """torch._scaled_mm (on the CPU too): the per-token and per-channel scales land on the right axes."""
    generator = torch.Generator().manual_seed(num_rows)
    x_q, x_scale = quantize_fp8_ref(torch.randn(num_rows, 64, generator=generator) * 3)
    w_q, w_scale = quantize_fp8_ref(torch.randn(48, 64, generator=generator))
    x_q, x_scale, w_q, w_scale = (t.to(DEVICE) for t in (x_q, x_scale, w_q, w_scale.view(-1)))
    out = fp8_gemm(x_q, x_scale, w_q, w_scale, torch.float32)
    assert out.shape == (num_rows, 48) and out.is_contiguous()
    tolerance = 1e-3 if DEVICE.type == "cuda" else 1e-5   # the fp8 tensor cores' sums, as below
    assert relative_l2(out, fp8_gemm_ref(x_q, x_scale, w_q, w_scale, torch.float32)) < tolerance


# relative L2 error allowed: the products are exact and summed in fp32, but 16-bit tensor-core sums may round
# early, and Hopper's fp8 tensor cores keep only 13 mantissa bits of each scale block's sum (about 5e-5 here)
BLOCK_GEMM_TOLERANCE = {FP8: 1e-3 if DEVICE.type == "cuda" else 1e-6, torch.float32: 1e-6,
                        torch.float16: 1e-3, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("carrier", [FP8] + DTYPES, ids=str)
@pytest.mark.parametrize("num_rows, block", [(5, (16, 32)), (37, (48, 32))])   # fp8 tl.dot needs K >= 32
def test_fp8_block_gemm_matches_the_reference(num_rows, block, carrier):
    """The quantized operands as fp8, or carried exactly in a wider dtype (every fp8 value is one of theirs)."""
    generator = torch.Generator().manual_seed(0)
    num_cols, depth = 150, 96   # a partial output tile and a partial last block row
    x_q, x_scale = quantize_fp8_ref(torch.randn(num_rows, depth, generator=generator), block[1])
    w_q = (torch.randn(num_cols, depth, generator=generator) * 100).clamp(-448, 448).to(FP8)
    w_scale = torch.rand(-(-num_cols // block[0]), depth // block[1], generator=generator) + 0.5
    x_q, x_scale, w_q, w_scale = (t.to(DEVICE) for t in (x_q, x_scale, w_q, w_scale))
    want = fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, block, torch.float32)
    out = fp8_block_gemm(x_q.to(carrier), x_scale, w_q.to(carrier), w_scale, block, torch.float32)
    assert out.shape == (num_rows, num_cols)
    assert relative_l2(out, want) < BLOCK_GEMM_TOLERANCE[carrier]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_matches_the_reference(dtype, with_residual):
    x, weight = torch.randn(7, 96).to(DEVICE, dtype), (torch.rand(96) + 0.5).to(DEVICE, dtype)
    residual = torch.randn(7, 96).to(DEVICE, dtype) if with_residual else None
    out = rms_norm_fp8(x, weight, 1e-6, residual, out_dtype=KERNEL_OUT)
    want = rms_norm_fp8_ref(x, weight, 1e-6, residual)
    if with_residual:
        (out, new_residual), (want, want_residual) = out, want
        assert torch.equal(new_residual, want_residual)
    (scaled, scales), (want_q, want_scales) = out, want
    assert torch.allclose(scales, want_scales, rtol=1e-6, atol=0)
    # the same fp8 values but where an fp32 rounding difference in the norm lands on a rounding boundary
    assert (scaled.to(FP8).float() == want_q.float()).float().mean() > 0.99
    assert relative_l2(scaled.to(FP8).float() * scales, want_q.float() * want_scales) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# one block, several blocks with a partial last one; in one program per row, or (rows wider than a program holds)
# in two passes
@pytest.mark.parametrize("passes", ["one_pass", "two_passes"])
@pytest.mark.parametrize("intermediate", [48, 2100])
@pytest.mark.parametrize("act_and_mul_fp8,reference", [(silu_and_mul_fp8, silu_and_mul_fp8_ref),
                                                        (gelu_tanh_and_mul_fp8, gelu_tanh_and_mul_fp8_ref)],
                         ids=["silu", "gelu"])
def test_act_and_mul_fp8_matches_the_reference(act_and_mul_fp8, reference, dtype, intermediate, passes, monkeypatch):
    if passes == "two_passes":
        monkeypatch.setattr(activation, "_ROW_IN_ONE_PROGRAM", 16)
    x = (torch.randn(5, 2 * intermediate) * 3).to(DEVICE, dtype)
    scaled, scales = act_and_mul_fp8(x, out_dtype=KERNEL_OUT)
    want_q, want_scales = reference(x)
    assert torch.allclose(scales, want_scales, rtol=1e-6, atol=0)
    assert (scaled.to(FP8).float() == want_q.float()).float().mean() > 0.99
    assert relative_l2(scaled.to(FP8).float() * scales, want_q.float() * want_scales) < 1e-2
