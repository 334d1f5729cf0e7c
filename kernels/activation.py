"""SiLU(gate) * up over a fused gate_up projection output."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate then up) -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    # the reference rounds silu(gate) to the input dtype before the product; so does this
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * stride_o + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_and_mul_ref` for x [..., 2I]."""
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * intermediate)
    out = torch.empty(rows.shape[0], intermediate, dtype=x.dtype, device=x.device)
    assert rows.stride(-1) == 1
    block = min(1024, triton.next_power_of_2(intermediate))
    if rows.shape[0]:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(intermediate, block))](
            rows, out, intermediate, rows.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], intermediate)
