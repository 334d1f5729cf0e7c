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
def _act_and_mul_kernel(x_ptr, out_ptr, amax_ptr, intermediate, stride_x, stride_o, GELU_TANH: tl.constexpr,
                        STORE_AMAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row, block of columns); STORE_AMAX: also the block's amax, for the fp8 quantization."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    out = _act_and_mul_block(x_ptr, row, stride_x, intermediate, cols, mask, GELU_TANH)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_AMAX:   # masked columns hold act(0) * 0 = 0
        tl.store(amax_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.max(tl.abs(out), 0))


@triton.jit
def _quantize_by_block_amax_kernel(x_ptr, amax_ptr, out_ptr, scale_ptr, num_cols, num_blocks, stride_x, stride_o,
                                   fp8_max, min_scale, BLOCK: tl.constexpr, BLOCKS_POW2: tl.constexpr):
    """One program per (row, block of columns): the row's scale from its blocks' amaxes, the block quantized."""
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.arange(0, BLOCKS_POW2)
    amax = tl.max(tl.load(amax_ptr + row * num_blocks + blocks, mask=blocks < num_blocks, other=0.0), 0)
    scale = tl.maximum(amax / fp8_max, min_scale)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    quantized = tl.clamp(tl.div_rn(x, scale), -fp8_max, fp8_max)
    tl.store(out_ptr + row * stride_o + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + row, scale)


@triton.jit
def _act_and_mul_fp8_row_kernel(x_ptr, out_ptr, scale_ptr, intermediate, stride_x, stride_o, fp8_max, min_scale,
                                GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row, the whole row held in registers: act(gate) * up, its amax, the row quantized."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < intermediate
    out = _act_and_mul_block(x_ptr, row, stride_x, intermediate, cols, mask, GELU_TANH)
    scale = tl.maximum(tl.max(tl.abs(out), 0) / fp8_max, min_scale)   # masked columns hold act(0) * 0 = 0
    quantized = tl.clamp(tl.div_rn(out, scale), -fp8_max, fp8_max)
    tl.store(out_ptr + row * stride_o + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


# The widest row one program holds (32 values of gate and of up a thread at 32 warps): Llama-70B's 28,672
_ROW_IN_ONE_PROGRAM = 32768


def _columns_per_program(intermediate: int) -> int:
    """Up to 1,024: many small programs keep enough loads in flight to run at bandwidth. The fp8 path's two
    passes (rows wider than one program holds) share it: the quantizing pass reads the first one's per-block amaxes."""
    return min(1024, triton.next_power_of_2(intermediate))


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool, store_amax: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., 2I] -> (act(gate) * up [..., I], and with store_amax each row's per-block amax [T, blocks])."""
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * intermediate)
    out = torch.empty(rows.shape[0], intermediate, dtype=x.dtype, device=x.device)
    block = _columns_per_program(intermediate)
    grid = (rows.shape[0], triton.cdiv(intermediate, block))
    amax = torch.empty(grid, dtype=torch.float32, device=x.device) if store_amax else None
    assert rows.stride(-1) == 1
    if rows.shape[0]:
        _act_and_mul_kernel[grid](rows, out, amax, intermediate, rows.stride(0), out.stride(0),
                                  GELU_TANH=gelu_tanh, STORE_AMAX=store_amax, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], intermediate), amax


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_and_mul_ref` for x [..., 2I]."""
    return _act_and_mul(x, gelu_tanh=False)[0]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `gelu_tanh_and_mul_ref` for x [..., 2I]."""
    return _act_and_mul(x, gelu_tanh=True)[0]


def _act_and_mul_fp8(x: torch.Tensor, gelu_tanh: bool, out_dtype: torch.dtype, num_warps: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) * up in x's dtype (as the reference rounds it before quantizing), quantized per row: in one pass
    where a program holds the row, else in two (`_act_and_mul_fp8_two_pass`). num_warps: kernels_gpu.py's sweep."""
    assert x.dim() == 2
    num_rows, intermediate = x.shape[0], x.shape[1] // 2
    block = triton.next_power_of_2(intermediate)
    if block > _ROW_IN_ONE_PROGRAM:
        return _act_and_mul_fp8_two_pass(x, gelu_tanh, out_dtype)
    out = torch.empty(num_rows, intermediate, dtype=out_dtype, device=x.device)
    scales = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    assert x.stride(-1) == 1
    if num_rows:
        # 16 columns a thread, up to 32 warps: swept on an H200 (docs/benchmarks.md, thirteenth session) at 856
        # and 8,192 rows of 14,336 columns, 0.0345 and 0.2404 ms (16 warps 0.0391 / 0.2368; two passes 0.0361 / 0.2767)
        _act_and_mul_fp8_row_kernel[(num_rows,)](x, out, scales, intermediate, x.stride(0), out.stride(0), FP8_MAX,
                                                 MIN_SCALE, GELU_TANH=gelu_tanh, BLOCK=block,
                                                 num_warps=num_warps or max(1, min(32, block // 512)))
    return out, scales


def _act_and_mul_fp8_two_pass(x: torch.Tensor, gelu_tanh: bool, out_dtype: torch.dtype
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) * up in x's dtype with each block's amax, then the row quantized by the largest: for rows wider
    than one program holds."""
    product, block_amax = _act_and_mul(x, gelu_tanh, store_amax=True)
    num_rows, intermediate = product.shape
    out = torch.empty(num_rows, intermediate, dtype=out_dtype, device=x.device)
    scales = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    num_blocks = block_amax.shape[1]
    if num_rows:
        _quantize_by_block_amax_kernel[(num_rows, num_blocks)](
            product, block_amax, out, scales, intermediate, num_blocks, product.stride(0), out.stride(0), FP8_MAX,
            MIN_SCALE, BLOCK=_columns_per_program(intermediate),
            BLOCKS_POW2=triton.next_power_of_2(num_blocks), num_warps=4)
    return out, scales


def silu_and_mul_fp8(x: torch.Tensor, out_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `silu_and_mul_fp8_ref` for x [T, 2I]. A wider out_dtype keeps the scaled values
    unrounded (tests: the interpreter's own fp8 rounding is wrong for some values)."""
    return _act_and_mul_fp8(x, False, out_dtype)


def gelu_tanh_and_mul_fp8(x: torch.Tensor, out_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `gelu_tanh_and_mul_fp8_ref`; out_dtype as in `silu_and_mul_fp8`."""
    return _act_and_mul_fp8(x, True, out_dtype)
