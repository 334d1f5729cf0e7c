"""The fused MoE kernel (Triton, the interpreter without a GPU) against its torch reference, and the expert grouping."""
import pytest
import torch

from batchgen.kernels.fp8 import FP8, quantize_fp8_ref
from batchgen.kernels.fused_moe import dequantized_expert, fused_moe, fused_moe_ref, group_by_expert
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


@pytest.mark.parametrize("dtype", list(dict.fromkeys(DTYPES + [torch.bfloat16])), ids=str)
@pytest.mark.parametrize("block", [None, (16, 32), (48, 16)], ids=["per-channel", "block16x32", "block48x16"])
@pytest.mark.parametrize("num_tokens", [1, 17, 40])
def test_fused_moe_fp8_experts_match_the_reference(num_tokens, block, dtype):
    """fp8 weights with their scales, dequantized inside the kernel; the reference dequantizes each chosen
    expert (in fp32 here, so only the kernel's own rounding to `dtype` is measured). A 48-row block straddles
    the gate/up boundary of neither layer and leaves a partial last block row in down [E, 64, 32].
    bf16 runs on the CPU too: its dots run in fp16 (no bf16 arithmetic, which the interpreter gets wrong), each row
    scaled into fp16's range first; rows from 1e-3 to 1e5 (past fp16's 65504) check that scaling."""
    hidden, w_gate_up, w_down, topk_weights, topk_ids = random_moe_inputs(num_tokens, dtype, seed=num_tokens)
    if dtype == torch.bfloat16:
        hidden = (hidden.float() * torch.logspace(-3, 5, num_tokens, device=hidden.device)[:, None]).to(dtype)
    gate_up_q, gate_up_scale = (t.to(DEVICE) for t in fp8_experts(w_gate_up.cpu(), block))
    down_q, down_scale = (t.to(DEVICE) for t in fp8_experts(w_down.cpu(), block))
    out = fused_moe(hidden, gate_up_q, down_q, topk_weights, topk_ids, gate_up_scale, down_scale, block)
    ref = fused_moe_ref(hidden.float(), gate_up_q, down_q, topk_weights, topk_ids, gate_up_scale, down_scale, block)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == dtype
    # the interpreter casts fp32 to bf16 by truncation (round to nearest on the GPU), and this path stores bf16
    # twice (gate-up, then the output): measured 0.012-0.016 here, where one RNE rounding each gives ~0.005
    bf16_interpreted = dtype == torch.bfloat16 and DEVICE.type == "cpu"
    assert relative_l2(out, ref) < (2.5e-2 if bf16_interpreted else TOLERANCE[dtype])
    # and the scales matter: the fp8 weights alone, unscaled, are far from it
    assert relative_l2(fused_moe_ref(hidden.float(), gate_up_q.float(), down_q.float(), topk_weights, topk_ids),
                       ref) > 0.5


@pytest.mark.parametrize("block", [None, (16, 32)], ids=["per-channel", "block16x32"])
def test_dequantized_expert_is_the_weight_the_scales_stand_for(block):
    _, w_gate_up, _, _, _ = random_moe_inputs(1, torch.float32)
    quantized, scales = fp8_experts(w_gate_up.cpu(), block)
    dequantized = dequantized_expert(quantized, scales, block, 5, torch.float32)
    assert dequantized.shape == w_gate_up.shape[1:]
    # fp8 keeps 3 mantissa bits: within half a step (1/16 relative) of the original weights
    assert relative_l2(dequantized, w_gate_up[5].cpu()) < 0.04
    rows, cols = (3, 7)
    row_scale = scales[5, rows] if block is None else scales[5, rows // block[0], cols // block[1]]
    assert dequantized[rows, cols] == quantized[5, rows, cols].float() * row_scale


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
