"""The fused MoE kernel (Triton, the interpreter without a GPU) against its torch reference, and the expert grouping."""
import pytest
import torch

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
