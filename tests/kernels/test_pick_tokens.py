"""pick_tokens (Triton, one pass) against its torch reference: the exponential race or argmax, and logsumexp."""
import pytest
import torch

from batchgen.kernels.pick_tokens import pick_tokens, pick_tokens_ref
from batchgen.kernels.testing import TEST_DEVICE as DEVICE

VOCAB = 3000   # two of the kernel's 2048-column blocks, the second partial


def _logits(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, VOCAB, generator=generator) * torch.tensor([[0.5], [1.0], [2.0], [4.0], [8.0], [1.0]])
    logits[1, :2500] = float("-inf")                 # a grammar's mask: the row's tokens all in the second block
    logits[3, [100, 2148]] = 50.0                    # ties across blocks, in one lane of the kernel's
    logits[0, [2500, 7]] = 50.0                      # blocks and in two: the first one wins
    logits[5] = float("-inf")                        # a dead end
    return logits.to(DEVICE)


def _noise(seed: int) -> torch.Tensor:
    noise = torch.empty(6, VOCAB).exponential_(generator=torch.Generator().manual_seed(seed))
    noise[4] = 1.0                                   # a greedy row of a mixed batch
    noise[2, :10] = 0.0                              # draws of exactly 0
    return noise.to(DEVICE)


def _assert_same(got, want):
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_race_matches_reference(seed):
    logits = _logits(seed)
    processed = (logits / 0.7).masked_fill(logits < -1.5, float("-inf"))   # temperature, a truncation
    noise = _noise(seed)
    _assert_same(pick_tokens(processed, logits, noise), pick_tokens_ref(processed, logits, noise))
    _assert_same(pick_tokens(logits, logits, noise), pick_tokens_ref(logits, logits, noise))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sixteen_bit_logits_are_read_as_float32(dtype):
    # a model's logits as its LM head makes them: the race and the log-normalizer computed on their fp32 values
    logits = _logits(4).to(dtype)
    processed = (logits.float() / 0.7).masked_fill(logits < -1.5, float("-inf"))
    noise = _noise(4)
    _assert_same(pick_tokens(logits, logits, noise), pick_tokens_ref(logits.float(), logits.float(), noise))
    _assert_same(pick_tokens(processed, logits, noise), pick_tokens_ref(processed, logits.float(), noise))


def test_argmax_matches_reference():
    logits = _logits(3)
    want = pick_tokens_ref(logits, logits, None)
    assert want[0][3] == 100 and want[0][0] == 7 and want[0][5] == 0 and want[1][5] == float("-inf")
    _assert_same(pick_tokens(logits, logits, None), want)
    _assert_same(pick_tokens(logits, logits, torch.ones_like(logits)), want)   # noise of 1: argmax too


def test_race_draws_follow_the_probabilities():
    # one row repeated: the race's picks among 4 tokens against softmax, through the kernel (1,000 draws: the
    # counts' standard error is below 0.015; argmax instead of the race would miss by 0.35)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]], device=DEVICE).repeat(1000, 1)
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator(device=DEVICE).manual_seed(0))
    tokens, _ = pick_tokens(logits, logits, noise)
    counts = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.045)
