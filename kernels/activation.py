"""act(gate) * up over a fused gate_up projection output, with SiLU (Llama, Qwen, Phi-3) or tanh-approximated
GELU (Gemma), optionally quantized per token to fp8 for the fp8 down projection that follows it."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from batchgen.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, quantize_fp8_ref


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate then up) -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] -> `silu_and_mul_ref` quantized per token: (fp8 [T, I], scales [T, 1])."""
    out = silu_and_mul_ref(x)
    return quantize_fp8_ref(out.reshape(-1, out.shape[-1]))


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate then up) -> [T, I]; Hugging Face's `gelu_pytorch_tanh`."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu_tanh_and_mul_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] -> `gelu_tanh_and_mul_ref` quantized per token: (fp8 [T, I], scales [T, 1])."""
    out = gelu_tanh_and_mul_ref(x)
    return quantize_fp8_ref(out.reshape(-1, out.shape[-1]))


@triton.jit
def _act_and_mul_block(x_ptr, row, stride_x, intermediate, cols, mask, GELU_TANH: tl.constexpr):
    """act(gate) * up for some columns of a row, rounded to the input dtype, returned in fp32."""
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    if GELU_TANH:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)   # sqrt(2 / pi) * (...)
        activated = 0.5 * gate * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))   # tanh via the logistic
    else:
        activated = gate / (1.0 + tl.exp(-gate))
    # the reference rounds act(gate) to the input dtype before the product; so does this
    activated = activated.to(up.dtype)
    return (activated.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, intermediate, stride_x, stride_o, GELU_TANH: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    out = _act_and_mul_block(x_ptr, row, stride_x, intermediate, cols, mask, GELU_TANH)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, intermediate, stride_x, stride_o, fp8_max, min_scale,
                            GELU_TANH: tl.constexpr, BLOCK: tl.constexpr, ROW_IN_ONE_BLOCK: tl.constexpr):
    """One program per row: the row's amax, then its values quantized. A row that fits one block is computed
    once and kept in registers; a longer one is computed again block by block for the second pass."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    out = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, intermediate, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        out = _act_and_mul_block(x_ptr, row, stride_x, intermediate, cols, cols < intermediate, GELU_TANH)
        amax = tl.maximum(amax, tl.abs(out))
    scale = tl.maximum(tl.max(amax, 0) / fp8_max, min_scale)
    if ROW_IN_ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        out = tl.clamp(tl.div_rn(out, scale), -fp8_max, fp8_max)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=cols < intermediate)
    else:
        for start in range(0, intermediate, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < intermediate
            out = _act_and_mul_block(x_ptr, row, stride_x, intermediate, cols, mask, GELU_TANH)
            out = tl.clamp(tl.div_rn(out, scale), -fp8_max, fp8_max)
            tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * intermediate)
    out = torch.empty(rows.shape[0], intermediate, dtype=x.dtype, device=x.device)
    assert rows.stride(-1) == 1
    block = min(1024, triton.next_power_of_2(intermediate))
    if rows.shape[0]:
        _act_and_mul_kernel[(rows.shape[0], triton.cdiv(intermediate, block))](
            rows, out, intermediate, rows.stride(0), out.stride(0), GELU_TANH=gelu_tanh, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], intermediate)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_and_mul_ref` for x [..., 2I]."""
    return _act_and_mul(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `gelu_tanh_and_mul_ref` for x [..., 2I]."""
    return _act_and_mul(x, gelu_tanh=True)


# the widest row the fp8 kernel holds in registers at once (32 values a thread at 32 warps): wider rows are
# computed twice, once for their amax and once to quantize
_ROW_BLOCK_MAX = 32768


def _act_and_mul_fp8(x: torch.Tensor, gelu_tanh: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    intermediate = x.shape[-1] // 2
    out = torch.empty(x.shape[0], intermediate, dtype=out_dtype, device=x.device)
    scales = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    assert x.dim() == 2 and x.stride(-1) == 1
    block = min(_ROW_BLOCK_MAX, triton.next_power_of_2(intermediate))
    if x.shape[0]:
        _act_and_mul_fp8_kernel[(x.shape[0],)](
            x, out, scales, intermediate, x.stride(0), out.stride(0), FP8_MAX, MIN_SCALE, GELU_TANH=gelu_tanh,
            BLOCK=block, ROW_IN_ONE_BLOCK=block >= intermediate, num_warps=min(max(block // 1024, 4), 32))
    return out, scales


def silu_and_mul_fp8(x: torch.Tensor, out_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `silu_and_mul_fp8_ref` for x [T, 2I]. A wider out_dtype keeps the scaled values
    unrounded (tests: the interpreter's own fp8 rounding is wrong for some values)."""
    return _act_and_mul_fp8(x, False, out_dtype)


def gelu_tanh_and_mul_fp8(x: torch.Tensor, out_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `gelu_tanh_and_mul_fp8_ref`; out_dtype as in `silu_and_mul_fp8`."""
    return _act_and_mul_fp8(x, True, out_dtype)
