"""Mixture-of-experts feed-forward over routed tokens: sum_k weight[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))
with e = topk_ids[t, k].

Expert weights are 3-D, `w_gate_up` [E, 2I, H] (gate rows then up rows) and `w_down` [E, H, I], so tensor
parallelism can shard every expert along I. The Triton path groups the (token, choice) pairs by expert, each
expert's group padded to a whole number of BLOCK_M rows, so every row block of the two grouped GEMMs reads one
expert's weights; the down GEMM multiplies each row by its routing weight before storing it.

fp8 expert weights (float8_e4m3fn) come with their scales: one per expert per output row (per-channel), or one
per expert per [block_n, block_k] block. The activations going into each GEMM are quantized too, as the fp8 linear
layers quantize theirs: per token (per-channel weights) or per token per block_k columns (block-scaled), so the
grouped GEMMs multiply fp8 by fp8 on the tensor cores and apply both scales to their fp32 sums, after the loop over
K (per-channel) or per K step (block-scaled). No dequantized copy of the weights is ever made. (Widening the fp8
weights to the activations' dtype in the loop instead left fp8 experts at 0.6x of bf16 experts' prefill rate, and
Mixtral's decode slower than bf16: docs/benchmarks.md, eleventh session.)
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from batchgen.kernels.activation import silu_and_mul, silu_and_mul_fp8, silu_and_mul_ref
from batchgen.kernels.fp8 import fp8_block_gemm_ref, fp8_gemm_ref, quantize_fp8, quantize_fp8_ref
from batchgen.kernels.paged_attention import _dot_precision


def _expert_gemm_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] | None,
                     expert: int, out_dtype: torch.dtype) -> torch.Tensor:
    """x [T, K] @ weight[expert]^T: in x's dtype, or for fp8 weights x quantized as `fused_moe` quantizes it and
    the fp8 GEMM's reference in fp32, rounded to out_dtype."""
    if scale is None:
        return F.linear(x, weight[expert]).to(out_dtype)
    x_q, x_scale = quantize_fp8_ref(x, block[1] if block else None)
    if block is None:
        return fp8_gemm_ref(x_q, x_scale, weight[expert], scale[expert], out_dtype)
    return fp8_block_gemm_ref(x_q, x_scale, weight[expert], scale[expert], block, out_dtype)


def fused_moe_ref(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                  down_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> torch.Tensor:
    """hidden [T, H]; topk_weights [T, K] (any float dtype), topk_ids [T, K] -> [T, H] in hidden's dtype.
    fp8 weights come with scales (per row, or per block of `block`), and each GEMM's input is quantized to fp8
    (per token, or per token per block[1] columns).

    Expert by expert, like transformers' eager experts loop: the product with the routing weight happens in the
    wider of the two dtypes, and the sum over a token's experts in hidden's dtype, in ascending expert order.
    (transformers' default grouped_mm experts, and the kernel, sum in fp32; on the logits the difference is
    below what bf16 routing near-ties cause: docs/benchmarks.md, MoE logits on CPU.)
    """
    out = torch.zeros_like(hidden)
    wide = torch.float32 if gate_up_scale is not None else hidden.dtype   # fp8 GEMMs sum in fp32
    for expert in topk_ids.unique().tolist():
        tokens, choice = torch.where(topk_ids == expert)
        gate_up = _expert_gemm_ref(hidden[tokens], w_gate_up, gate_up_scale, block, expert, hidden.dtype)
        expert_out = _expert_gemm_ref(silu_and_mul_ref(gate_up), w_down, down_scale, block, expert, wide)
        # a token picks an expert at most once, so this adds each row once (and is much faster than index_add_)
        out.index_put_((tokens,), (expert_out * topk_weights[tokens, choice, None]).to(out.dtype), accumulate=True)
    return out


def group_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs, flat index t * K + k, sorted by expert, each expert's run padded to a multiple
    of block_m with the index T * K (a row that loads zeros and stores nothing).

    Returns (sorted_pairs int32 [num_blocks * block_m], block_expert int32 [num_blocks]: the expert of each row
    block, -1 past the last). num_blocks is an upper bound fixed by the shapes, so nothing waits on the GPU and
    the whole computation can be captured in a CUDA graph.
    """
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    num_blocks = min(triton.cdiv(num_pairs, block_m) + num_experts, num_pairs)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))
    expert_blocks = (counts + block_m - 1) // block_m
    blocks_end = expert_blocks.cumsum(0)
    block_expert = torch.searchsorted(blocks_end, torch.arange(num_blocks, device=flat.device), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)

    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (blocks_end - expert_blocks)[sorted_experts] * block_m + rank_in_expert
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[destination] = order.to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _grouped_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, weights_ptr, sorted_pairs_ptr,
                         block_expert_ptr, num_pairs, top_k, N, K, stride_am, stride_as, stride_be, stride_bn,
                         stride_bk, stride_cm, stride_se, stride_sn, stride_sk, scale_block_n, scale_block_k,
                         WEIGHT_SCALE: tl.constexpr, GATHER_TOKENS: tl.constexpr, SCATTER_PAIRS: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """C[row] = A[row] @ B[expert]^T for one row block (one expert) and one column block.

    Rows of A are tokens (GATHER_TOKENS: row = pair // top_k) or sorted positions; rows of C are pairs, each
    scaled by its routing weight (SCATTER_PAIRS), or sorted positions. WEIGHT_SCALE "channel" / "block": A and B
    are fp8, A with scales per row / per row and scale_block_k columns, B per output row / per [scale_block_n,
    scale_block_k] block (BLOCK_K divides scale_block_k, so each K step lies in one block column); "none": A and B
    in one dtype, unscaled.
    """
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    positions = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + positions)
    valid = pairs < num_pairs
    if GATHER_TOKENS:
        a_rows = (pairs // top_k).to(tl.int64)
    else:
        a_rows = positions.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_scale_ptrs = a_scale_ptr + a_rows * stride_as
    scale_ptrs = b_scale_ptr + expert * stride_se
    for k in range(0, K, BLOCK_K):
        k_mask = ks + k < K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (cols[None, :] < N), other=0.0)
        product = tl.dot(a, b, input_precision=DOT_PRECISION)
        if WEIGHT_SCALE == "block":
            a_scales = tl.load(a_scale_ptrs + k // scale_block_k, mask=valid, other=0.0)
            block_scales = tl.load(scale_ptrs + (cols // scale_block_n) * stride_sn + (k // scale_block_k) * stride_sk,
                                   mask=cols < N, other=0.0)
            product *= a_scales[:, None] * block_scales[None, :]
        acc += product
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if WEIGHT_SCALE == "channel":
        acc *= (tl.load(a_scale_ptrs, mask=valid, other=0.0)[:, None]
                * tl.load(scale_ptrs + cols * stride_sn, mask=cols < N, other=0.0)[None, :])
    if SCATTER_PAIRS:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
        c_rows = pairs.to(tl.int64)
    else:
        c_rows = positions.to(tl.int64)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < N))


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: about the pairs an expert gets, so decode steps waste little on padding."""
    return min(64, max(16, triton.next_power_of_2(num_pairs // num_experts)))


def _grouped_gemm(a, a_scale, b, b_scale, block, c, weights, sorted_pairs, block_expert, num_pairs, top_k, block_m,
                  gather_tokens):
    """c = the grouped GEMM of a with the experts b; for fp8 experts (b_scale given) a is fp8 with a_scale."""
    n, k = b.shape[1], b.shape[2]
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    weight_scale = "none" if b_scale is None else "channel" if block is None else "block"
    # a K step reads as many bytes of fp8 as of 16-bit values in half the columns; an fp8 dot's K is at least 32
    block_k = (min(64, max(16, triton.next_power_of_2(k))) if b_scale is None
               else min(128, max(32, triton.next_power_of_2(k))))
    scale_block_n, scale_block_k = block or (1, k)
    if weight_scale == "none":
        a_scale = scales = b
    else:
        scales = b_scale.view(b_scale.shape[0], b_scale.shape[1], -1)
    if weight_scale == "block":   # the largest power of two dividing the scale block's width
        block_k = min(block_k, scale_block_k & -scale_block_k)
        assert block_k >= 32, f"fp8 block width {scale_block_k} is not a multiple of 32 (an fp8 dot's least K)"
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, a_scale, b, scales, c, weights, sorted_pairs, block_expert, num_pairs, top_k, n, k, a.stride(0),
        a_scale.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0), scales.stride(0), scales.stride(1),
        scales.stride(2), scale_block_n, scale_block_k, WEIGHT_SCALE=weight_scale, GATHER_TOKENS=gather_tokens,
        SCATTER_PAIRS=not gather_tokens, DOT_PRECISION=_dot_precision(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=8 if block_m * block_n >= 64 * 128 else 4, num_stages=3)


def fused_moe(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Triton twin of `fused_moe_ref`: gate-up grouped GEMM, SiLU-and-mul, down grouped GEMM weighted per pair,
    then the sum over each token's K experts."""
    num_tokens, top_k = topk_ids.shape
    num_experts, intermediate = w_down.shape[0], w_down.shape[2]
    hidden_size = hidden.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    assert hidden.stride(1) == 1 and w_gate_up.is_contiguous() and w_down.is_contiguous()
    num_pairs = num_tokens * top_k
    block_m = _block_m(num_pairs, num_experts)
    sorted_pairs, block_expert = group_by_expert(topk_ids, num_experts, block_m)
    weights = topk_weights.contiguous()
    # fp8 experts: each GEMM's input quantized per token (per token per block[1] columns for block scales)
    fp8, group = gate_up_scale is not None, block[1] if block else None
    a, a_scale = quantize_fp8(hidden, group) if fp8 else (hidden, None)
    gate_up = torch.empty(sorted_pairs.shape[0], 2 * intermediate, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(a, a_scale, w_gate_up, gate_up_scale, block, gate_up, weights, sorted_pairs, block_expert,
                  num_pairs, top_k, block_m, gather_tokens=True)
    if not fp8:
        activated, activated_scale = silu_and_mul(gate_up), None
    elif group is None:   # the product and its per-token quantization, as the fp8 MLPs take it
        activated, activated_scale = silu_and_mul_fp8(gate_up)
    else:
        activated, activated_scale = quantize_fp8(silu_and_mul(gate_up), group)
    pair_out = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(activated, activated_scale, w_down, down_scale, block, pair_out, weights, sorted_pairs,
                  block_expert, num_pairs, top_k, block_m, gather_tokens=False)
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1)
