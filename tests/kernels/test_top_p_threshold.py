"""top_p_threshold (Triton, sort-free) against its sort-based torch reference and Hugging Face's TopP."""
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from batchgen.kernels.testing import TEST_DEVICE as DEVICE
from batchgen.kernels.top_p_threshold import top_p_threshold, top_p_threshold_ref


def _rows(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 3000, generator=generator) * torch.tensor([[0.5], [1.0], [2.0], [4.0], [8.0], [1.0]])
    logits[1, :2000] = float("-inf")                 # a grammar's mask
    logits[2] = logits[2].round()                    # many ties
    logits[5] = float("-inf")                        # a dead end: keep everything
    return logits.to(DEVICE)


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_matches_reference(seed):
    logits = _rows(seed)
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.99, 0.9], device=DEVICE)
    assert torch.equal(top_p_threshold(logits, top_p), top_p_threshold_ref(logits, top_p))


def test_reference_keeps_what_hf_keeps():
    """On rows without ties (HF splits tied values at the cut by sort order; the threshold keeps them all)."""
    logits = _rows(2)[[0, 1, 3, 4]]
    for row, p in enumerate([0.9, 0.5, 0.3, 0.99]):
        kept_hf = TopPLogitsWarper(p)(None, logits[row:row + 1].clone()) > float("-inf")
        threshold = top_p_threshold_ref(logits[row:row + 1], torch.tensor([p], device=DEVICE))
        assert torch.equal(logits[row:row + 1] >= threshold[:, None], kept_hf)
