"""The fused MoE kernel (Triton, the interpreter without a GPU) against its torch reference, and the expert grouping."""
import pytest
import torch

from batchgen.kernels import fused_moe as fused_moe_module
from batchgen.kernels.activation import silu_and_mul_fp8_ref
from batchgen.kernels.fp8 import FP8, quantize_fp8_ref
from batchgen.kernels.fused_moe import fused_moe, fused_moe_ref, group_by_expert
from batchgen.kernels.testing import TEST_DEVICE as DEVICE, TEST_DTYPES as DTYPES, TOLERANCE, relative_l2

NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 8, 2, 64, 32


def random_moe_inputs(num_tokens: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    w_gate_up = (torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(dtype)
    w_down = (torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=gen) / INTERMEDIATE ** 0.5).to(dtype)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen)
    topk_weights, topk_ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    return tuple(t.to(DEVICE) for t in (hidden, w_gate_up, w_down, topk_weights, topk_ids))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 40])
def test_fused_moe_matches_reference(num_tokens, dtype):
    inputs = random_moe_inputs(num_tokens, dtype, seed=num_tokens)
    out = fused_moe(*inputs)
    ref = fused_moe_ref(*(x.float() if x.is_floating_point() else x for x in inputs))
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == dtype
    assert relative_l2(out, ref) < TOLERANCE[dtype]


FP8_UNIT = 200.0   # block scales around 1/200 put the test weights (~0.1..0.2) in fp8's normal range


def fp8_experts(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (fp8 weight, scales [E, N] per row, or [E, N / block_n, K / block_k] per block): per-row
    scales as the online quantizer draws them; block scales random, so every block multiplies differently."""
    if block is None:
        quantized, scales = zip(*(quantize_fp8_ref(expert) for expert in weight.float()))
        return torch.stack(quantized), torch.stack(scales).squeeze(-1)
    num_experts, rows, cols = weight.shape
    scales = torch.rand(num_experts, -(-rows // block[0]), cols // block[1], generator=torch.Generator().manual_seed(1))
    scales = (scales + 0.5) / FP8_UNIT
    expanded = scales.repeat_interleave(block[0], 1)[:, :rows].repeat_interleave(block[1], 2)
    return (weight.float() / expanded).clamp(-448, 448).to(FP8), scales


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [None, (16, 32), (48, 32)], ids=["per-channel", "block16x32", "block48x32"])
@pytest.mark.parametrize("num_tokens", [1, 17, 40])
def test_fused_moe_fp8_experts_match_the_reference(num_tokens, block, dtype, monkeypatch):
    """fp8 weights with their scales, and each GEMM's input quantized to fp8 (per token, or per token per block
    column group), multiplied fp8 by fp8; the reference does the same in fp32 from the fp8 values. A 48-row block
    straddles the gate/up boundary of neither layer and leaves a partial last block row in down [E, 64, 32]. Rows
    scaled from 1e-2 to 1e2 (bf16: 1e-3 to 1e5) check that each token gets its own scale."""
    if DEVICE.type == "cpu":
        # the interpreter rounds some values to fp8 wrongly (carries into the exponent: test_fp8.py); quantized by
        # torch, the activations are the reference's, and the GEMMs' arithmetic is what is checked
        monkeypatch.setattr(fused_moe_module, "quantize_fp8", quantize_fp8_ref)
        monkeypatch.setattr(fused_moe_module, "silu_and_mul_fp8", silu_and_mul_fp8_ref)
    hidden, w_gate_up, w_down, topk_weights, topk_ids = random_moe_inputs(num_tokens, dtype, seed=num_tokens)
    low, high = (-3, 5) if dtype == torch.bfloat16 else (-2, 2)
    hidden = (hidden.float() * torch.logspace(low, high, num_tokens, device=hidden.device)[:, None]).to(dtype)
    gate_up_q, gate_up_scale = (t.to(DEVICE) for t in fp8_experts(w_gate_up.cpu(), block))
    down_q, down_scale = (t.to(DEVICE) for t in fp8_experts(w_down.cpu(), block))
    out = fused_moe(hidden, gate_up_q, down_q, topk_weights, topk_ids, gate_up_scale, down_scale, block)
    ref = fused_moe_ref(hidden, gate_up_q, down_q, topk_weights, topk_ids, gate_up_scale, down_scale, block)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == dtype
    assert relative_l2(out, ref) < TOLERANCE[dtype]
    # and the scales matter: the fp8 weights alone, unscaled, are far from it
    assert relative_l2(fused_moe_ref(hidden.float(), gate_up_q.float(), down_q.float(), topk_weights, topk_ids),
                       ref) > 0.5
    # the activations are quantized: the same fp8 weights dequantized, times unquantized activations, differ
    # by about fp8's rounding (3 mantissa bits), far more than the kernel does from the reference
    unquantized = fused_moe_ref(hidden.float(), *(dequantize(w, scale, block) for w, scale in
                                                  ((gate_up_q, gate_up_scale), (down_q, down_scale))),
                                topk_weights, topk_ids)
    assert relative_l2(unquantized, ref.float()) > 0.01


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """fp8 experts [E, N, K] with their scales -> the fp32 weights they stand for."""
    if block is None:
        return weight.float() * scale[:, :, None]
    rows = scale.repeat_interleave(block[0], 1)[:, :weight.shape[1]]
    return weight.float() * rows.repeat_interleave(block[1], 2)


def test_fused_moe_weights_only_its_chosen_experts():
    """Every token on one expert with weight 1 is that expert's MLP; a zero weight removes an expert."""
    hidden, w_gate_up, w_down, _, _ = random_moe_inputs(5, torch.float32)
    ids = torch.tensor([[3, 6]] * 5, device=DEVICE)
    weights = torch.tensor([[1.0, 0.0]] * 5, device=DEVICE)
    expected = torch.nn.functional.linear(
        torch.nn.functional.silu(hidden @ w_gate_up[3, :INTERMEDIATE].T) * (hidden @ w_gate_up[3, INTERMEDIATE:].T),
        w_down[3])
    assert relative_l2(fused_moe(hidden, w_gate_up, w_down, weights, ids), expected) < 1e-5


@pytest.mark.parametrize("num_tokens,block_m", [(1, 16), (40, 16), (9, 4)])
def test_group_by_expert_puts_each_pair_once_in_a_block_of_its_expert(num_tokens, block_m):
    _, _, _, _, topk_ids = random_moe_inputs(num_tokens, torch.float32, seed=7)
    sorted_pairs, block_expert = group_by_expert(topk_ids, NUM_EXPERTS, block_m)
    num_pairs = topk_ids.numel()
    assert sorted_pairs.shape == (block_expert.shape[0] * block_m,)
    real = sorted_pairs < num_pairs
    assert sorted(sorted_pairs[real].tolist()) == list(range(num_pairs))
    row_expert = block_expert.repeat_interleave(block_m)
    assert torch.equal(row_expert[real], topk_ids.flatten()[sorted_pairs[real].long()].int())
    used = block_expert >= 0
    assert used.sum() == sum(-(-int((topk_ids == e).sum()) // block_m) for e in range(NUM_EXPERTS))
    assert not used[int(used.sum()):].any()   # the used blocks come first, experts in ascending order
