"""The batched sampler against Hugging Face's logits processors, torch formulas and sampling statistics."""
import itertools
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from batchgen.engine.request import Request
from batchgen.engine.sampler import Sampler, TokenHistory, process_logits
from batchgen.sampling_params import SamplingParams

EOS = 2


def make_request(prompt, output=(), eos=frozenset({EOS}), sample_index=0, **params) -> Request:
    request = Request(request_id="r", prompt_token_ids=list(prompt), eos_token_ids=eos, sample_index=sample_index,
                      params=SamplingParams(max_tokens=1000, **params))
    request.output_token_ids = list(output)
    return request


def hf_processed(logits_row: torch.Tensor, request: Request) -> torch.Tensor:
    """One row through HF's processors, with OpenAI presence/frequency penalties as a direct torch formula."""
    p = request.params
    ids = torch.tensor([request.prompt_token_ids + request.output_token_ids])
    scores = logits_row[None].clone()
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    counts = torch.zeros(scores.shape[1])
    for token in request.output_token_ids:
        counts[token] += 1
    scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(request.eos_token_ids))
    if p.min_tokens and stops:
        scores = MinNewTokensLengthLogitsProcessor(request.num_prompt_tokens, p.min_tokens, sorted(stops))(ids, scores)
    if p.greedy:
        return scores[0]
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return scores[0]


def random_tokens(rng: random.Random, vocab_size: int, length: int) -> list[int]:
    # a narrow range so tokens repeat and counts exceed one
    return [rng.randrange(vocab_size // 2) for _ in range(length)]


MIXED_SETTINGS = [
    {},
    {"temperature": 0.0},
    {"temperature": 0.0, "repetition_penalty": 1.3, "presence_penalty": 0.5},
    {"temperature": 0.7},
    {"temperature": 1.4, "top_k": 5},
    {"top_p": 0.8},
    {"temperature": 0.5, "top_p": 0.6, "top_k": 10},
    {"min_p": 0.1},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.7, "temperature": 0.9},
    {"presence_penalty": 1.0},
    {"frequency_penalty": 0.6},
    {"frequency_penalty": -0.4, "presence_penalty": -1.0, "top_p": 0.95},
    {"min_tokens": 50, "stop_token_ids": [7, 9]},
    {"min_tokens": 50, "ignore_eos": True, "stop_token_ids": [5]},
    {"min_tokens": 3},   # already past: nothing banned
    {"temperature": 0.0, "min_tokens": 50},
    {"repetition_penalty": 1.2, "presence_penalty": 0.3, "frequency_penalty": 0.2, "min_tokens": 40,
     "temperature": 0.6, "top_k": 8, "top_p": 0.7, "min_p": 0.2},
    {"top_k": 1},
    {"top_p": 0.01},
    {"min_p": 1.0},
]


def mixed_batch(settings, vocab_size=64, seed=0, masked_rows=(3, 6, 8, 18)):
    rng = random.Random(seed)
    requests = [make_request(random_tokens(rng, vocab_size, rng.randrange(1, 12)),
                             random_tokens(rng, vocab_size, rng.randrange(4, 10)), **s) for s in settings]
    logits = torch.randn(len(requests), vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    for row in masked_rows:   # a structured-output mask
        if row < len(requests):
            logits[row, torch.randperm(vocab_size, generator=torch.Generator().manual_seed(row))[:vocab_size // 2]] = \
                float("-inf")
    return logits, requests


@pytest.mark.parametrize("settings", [
    MIXED_SETTINGS,
    list(reversed(MIXED_SETTINGS)),
    [{"top_k": 3}, {"temperature": 0.0}, {"top_k": 17, "temperature": 0.6}, {}],      # top-k without top-p
    [{"top_p": 0.5}] * 3,                                                             # every row truncated
    [{"top_k": 10, "top_p": 0.7}, {"top_k": 4}, {"top_k": 30, "top_p": 0.9, "temperature": 0.5, "min_p": 0.1},
     {"temperature": 0.0}, {}],                                                       # top-p within top-k
    [{"min_p": 0.3, "temperature": 2.0}] * 2 + [{"presence_penalty": 2.0}] * 2,
], ids=["mixed", "mixed-reversed", "top-k-only", "top-p-all", "top-p-within-top-k", "min-p-and-penalties"])
def test_processed_logits_match_hf_processors(settings):
    logits, requests = mixed_batch(settings)
    raw = logits.clone()
    processed = process_logits(logits, requests)
    for row, request in enumerate(requests):
        torch.testing.assert_close(processed[row], hf_processed(raw[row], request), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"row {row} {request.params}: {m}")
    assert torch.equal(logits, raw), "process_logits edited its input"


def test_token_history_follows_growing_and_cut_back_outputs():
    rng = random.Random(5)
    history = TokenHistory()
    request = make_request(random_tokens(rng, 1000, 7))
    for new_tokens in [0, 1, 1, 40, 3, 200, 1]:
        request.output_token_ids += random_tokens(rng, 1000, new_tokens)
        earlier = history.token_ids(request)
        all_token_ids = request.prompt_token_ids + request.output_token_ids
        assert history.token_ids(request).tolist() == all_token_ids == earlier.tolist()
    del request.output_token_ids[5:]
    assert history.token_ids(request).tolist() == request.prompt_token_ids + request.output_token_ids


def test_processing_with_a_history_over_steps_matches_hf():
    logits, requests = mixed_batch(MIXED_SETTINGS, seed=1)
    history = TokenHistory()
    rng = random.Random(1)
    for step in range(4):
        processed = process_logits(logits, requests, history)
        for row, request in enumerate(requests):
            torch.testing.assert_close(processed[row], hf_processed(logits[row], request), rtol=1e-5, atol=1e-5)
            request.output_token_ids += random_tokens(rng, logits.shape[1], step * 20)


def test_nothing_to_process_returns_the_logits_unchanged():
    logits = torch.randn(3, 10)
    requests = [make_request([1, 2]), make_request([3], temperature=0.0), make_request([4], top_k=10)]
    assert process_logits(logits, requests) is logits


def test_min_tokens_never_leaves_a_row_without_a_token():
    """A grammar that only allows eos wins over min_tokens instead of leaving nothing to sample."""
    logits = torch.full((2, 10), float("-inf"))
    logits[0, EOS] = 1.0
    logits[1, [EOS, 4]] = 1.0
    requests = [make_request([1], min_tokens=5), make_request([1], min_tokens=5, temperature=0.5)]
    processed = process_logits(logits, requests)
    assert processed[0, EOS] == 1.0
    assert processed[1, EOS] == float("-inf") and torch.isfinite(processed[1, 4])
    assert Sampler()(logits, requests).token_ids == [EOS, 4]


def test_greedy_rows_take_the_argmax_and_logprobs_come_from_the_raw_logits():
    settings = [dict(s, logprobs=k) for s, k in zip(MIXED_SETTINGS, itertools.cycle([None, 0, 1, 5, 20]))]
    logits, requests = mixed_batch(settings, vocab_size=64)
    raw = logits.clone()
    out = Sampler(seed=3)(logits, requests)
    processed = process_logits(raw, requests)
    raw_logprobs = raw.log_softmax(-1)
    assert len(out.token_ids) == len(out.logprobs) == len(out.top_logprobs) == len(requests)
    for row, request in enumerate(requests):
        token = out.token_ids[row]
        if request.params.greedy:
            assert token == int(processed[row].argmax())
        assert torch.isfinite(processed[row, token])
        assert out.logprobs[row] == pytest.approx(float(raw_logprobs[row, token]), abs=1e-6)
        wanted = request.params.logprobs
        if wanted is None:
            assert out.top_logprobs[row] is None
            continue
        entry = out.top_logprobs[row]
        assert entry.token_id == token and entry.logprob == out.logprobs[row]
        expected = raw_logprobs[row].topk(wanted) if wanted else None
        assert list(entry.top) == ([] if not wanted else expected.indices.tolist())
        assert list(entry.top.values()) == pytest.approx(expected.values.tolist() if wanted else [], abs=1e-6)
    assert torch.equal(logits, raw)


def test_all_greedy_without_penalties_is_the_raw_argmax():
    logits = torch.randn(6, 50)
    requests = [make_request([1], temperature=0.0, logprobs=2) for _ in range(6)]
    out = Sampler()(logits, requests)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == pytest.approx(logits.log_softmax(-1).amax(-1).tolist(), abs=1e-6)


def run_steps(sampler, target, batches):
    """Samples each (requests, logits) batch in turn, appending every row's token; returns the target's tokens."""
    tokens = []
    for requests, logits in batches:
        out = sampler(logits, requests)
        for request, token in zip(requests, out.token_ids):
            request.output_token_ids.append(token)
        tokens.append(out.token_ids[requests.index(target)])
    return tokens


SEEDED = dict(seed=1234, temperature=1.3, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.2)


def seeded_steps_alone(params, num_steps=6, vocab_size=500, sample_index=0, draw="auto"):
    target = make_request([1, 2, 3], sample_index=sample_index, **params)
    batches = [([target], step_logits(step, vocab_size)[None]) for step in range(num_steps)]
    return run_steps(Sampler(seed=0, draw=draw), target, batches), target


def step_logits(step, vocab_size):
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(100 + step))


DRAWS = ["race", "inverse_cdf"]   # the GPU's and the CPU's way of drawing: both checked here


@pytest.mark.parametrize("draw", DRAWS)
def test_seeded_request_samples_the_same_alone_and_in_a_batch(draw):
    vocab_size, num_steps = 500, 6
    alone, target_alone = seeded_steps_alone(SEEDED, num_steps, vocab_size, draw=draw)
    rng = random.Random(7)
    target = make_request([1, 2, 3], **SEEDED)
    others = [make_request(random_tokens(rng, vocab_size, 5), **rng.choice(
        [{}, {"temperature": 0.0}, {"seed": rng.randrange(100), "top_k": 7}, {"temperature": 0.6, "min_p": 0.1},
         {"seed": 1234, "sample_index": 0, "temperature": 0.9}])) for _ in range(32)]
    batches = []
    for step in range(num_steps):
        requests = list(others)
        requests.insert(rng.randrange(len(requests) + 1), target)   # a different position every step
        logits = torch.randn(len(requests), vocab_size) * 2
        logits[requests.index(target)] = step_logits(step, vocab_size)
        batches.append((requests, logits))
    in_batch = run_steps(Sampler(seed=99, draw=draw), target, batches)
    assert in_batch == alone
    assert target.generator is not None and target_alone.generator is not None


def test_seeded_streams_differ_by_seed_and_sample_index():
    base, _ = seeded_steps_alone(SEEDED)
    assert seeded_steps_alone(SEEDED)[0] == base
    assert seeded_steps_alone(dict(SEEDED, seed=1235))[0] != base
    assert seeded_steps_alone(SEEDED, sample_index=1)[0] != base


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.randn(8, 300)
    requests = [make_request([1]) for _ in range(8)]
    assert Sampler(seed=5)(logits, requests).token_ids == Sampler(seed=5)(logits, requests).token_ids
    assert Sampler(seed=5)(logits, requests).token_ids != Sampler(seed=6)(logits, requests).token_ids


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("with_settings", [False, True], ids=["plain", "processed"])
def test_bf16_logits_sample_as_their_fp32_values(draw, with_settings):
    """The model hands the sampler its logits in bf16: tokens, logprobs and top logprobs are those of the same
    values in fp32 (the race reads them as they are; every other step computes in fp32)."""
    settings = [dict(s, logprobs=5) for s in MIXED_SETTINGS] if with_settings else [dict(logprobs=5)] * 12
    logits, requests = mixed_batch(settings, vocab_size=300)
    logits = (logits * 3).bfloat16()
    out16 = Sampler(seed=3, draw=draw)(logits, requests)
    for request in requests:   # seeded rows start their streams again
        request.generator = None
    out32 = Sampler(seed=3, draw=draw)(logits.float(), requests)
    assert out16.token_ids == out32.token_ids
    assert out16.logprobs == out32.logprobs
    assert [(e.token_id, e.top) for e in out16.top_logprobs] == [(e.token_id, e.top) for e in out32.top_logprobs]


STATISTICAL_SETTINGS = [
    {"temperature": 0.7},
    {"top_k": 3, "temperature": 1.5},
    {"top_p": 0.6},
    {"min_p": 0.15, "temperature": 1.2},
    {"repetition_penalty": 1.8, "presence_penalty": 0.5, "top_k": 6, "top_p": 0.9},
]


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("seeded", [False, True], ids=["shared-generator", "per-request-generators"])
@pytest.mark.parametrize("settings", STATISTICAL_SETTINGS, ids=str)
def test_sampling_frequencies_match_processed_probabilities(settings, seeded, draw):
    vocab_size, draws = 12, 4000 if seeded else 20000
    logits_row = torch.randn(vocab_size, generator=torch.Generator().manual_seed(11)) * 1.5
    logits_row[[4, 9]] = float("-inf")   # masked by a grammar
    if seeded:
        requests = [make_request([0, 1, 3], [1, 5], seed=i, **settings) for i in range(draws)]
    else:
        requests = [make_request([0, 1, 3], [1, 5], **settings)] * draws
    logits = logits_row.expand(draws, vocab_size).contiguous()
    out = Sampler(seed=1, draw=draw)(logits, requests)
    probs = process_logits(logits_row[None], requests[:1])[0].softmax(-1)
    frequencies = torch.bincount(torch.tensor(out.token_ids), minlength=vocab_size).double() / draws
    assert frequencies[probs == 0].sum() == 0, "sampled a token the processing excluded"
    total_variation = 0.5 * (frequencies - probs.double()).abs().sum()
    assert total_variation < (0.05 if seeded else 0.025)


@pytest.mark.parametrize("draw", DRAWS)
def test_masked_tokens_are_never_chosen_and_a_single_allowed_token_always_is(draw):
    vocab_size = 40
    rng = random.Random(3)
    settings = [{}, {"temperature": 0.0}, {"top_k": 2}, {"top_p": 0.3, "temperature": 2.0}, {"min_p": 0.5},
                {"seed": 8}, {"repetition_penalty": 1.4, "frequency_penalty": 1.0, "min_tokens": 9}]
    requests = [make_request(random_tokens(rng, vocab_size, 4), random_tokens(rng, vocab_size, 3), logprobs=5,
                             **s) for s in settings for _ in range(30)]
    logits = torch.randn(len(requests), vocab_size) * 4
    allowed = torch.rand(len(requests), vocab_size) < 0.3
    allowed[::3] = False
    allowed[::3, 11] = True   # every third row has exactly one legal token
    allowed[:, EOS] |= allowed.sum(-1) == 0
    masked = logits.masked_fill(~allowed, float("-inf"))
    sampler = Sampler(draw=draw)
    for _ in range(5):
        out = sampler(masked, requests)
        chosen = torch.tensor(out.token_ids)
        assert allowed[torch.arange(len(requests)), chosen].all()
        assert (chosen[::3] == 11).all()
        assert out.logprobs[::3] == pytest.approx([0.0] * len(out.logprobs[::3]), abs=1e-6)
        values = out.logprobs + [lp for entry in out.top_logprobs for lp in entry.top.values()]
        assert not any(v != v for v in values), "NaN logprob"


@pytest.mark.parametrize("draw", DRAWS)
def test_a_row_with_no_allowed_token_gives_no_nan(draw):
    logits = torch.full((2, 8), float("-inf"))
    logits[1, 3] = 0.0
    requests = [make_request([1], logprobs=2), make_request([1], logprobs=2, top_p=0.5)]
    out = Sampler(draw=draw)(logits, requests)
    assert out.token_ids[1] == 3 and out.logprobs == [float("-inf"), 0.0]
    assert list(out.top_logprobs[0].top.values()) == [float("-inf")] * 2
