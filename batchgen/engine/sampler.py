"""Next-token choice for a whole batch: penalties, min_tokens, temperature, top-k/top-p/min-p, seeded draws,
logprobs.

Logits are processed in Hugging Face's order so its logits processors are the test oracle. Logprobs come from
the raw model distribution (vLLM's default), so they do not depend on how a request chose to sample.
"""
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from batchgen.engine.request import Request
from batchgen.engine.transfer import to_device
from batchgen.kernels import ops
from batchgen.outputs import TokenLogprobs

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: list[int]                        # one per row
    logprobs: list[float]                       # raw-distribution logprob of each chosen token
    top_logprobs: list[TokenLogprobs | None]    # for rows whose params.logprobs is not None


class TokenHistory:
    """Each request's prompt + output tokens as a growing int64 array, so a step converts only the tokens
    sampled since the previous step: turning a long prompt's Python list into an array every step costs
    milliseconds under a repetition penalty. Entries go when their request is garbage-collected."""

    def __init__(self):
        self._arrays: weakref.WeakKeyDictionary[Request, tuple[np.ndarray, int]] = weakref.WeakKeyDictionary()

    def token_ids(self, request: Request) -> np.ndarray:
        """Prompt + output token ids, as a view: later calls only write past its end or start a new array."""
        num_prompt = len(request.prompt_token_ids)
        num_tokens = num_prompt + len(request.output_token_ids)
        array, filled = self._arrays.get(request, (None, 0))
        if array is None or filled > num_tokens:   # first sight, or the output was cut back
            array = np.empty(2 * num_tokens + 16, dtype=np.int64)
            array[:num_prompt] = request.prompt_token_ids
            filled = num_prompt
        elif num_tokens > len(array):
            array = np.concatenate([array[:filled], np.empty(2 * num_tokens - filled, dtype=np.int64)])
        array[filled:num_tokens] = request.output_token_ids[filled - num_prompt:]
        self._arrays[request] = (array, num_tokens)
        return array[:num_tokens]


def process_logits(logits: torch.Tensor, requests: list[Request], history: TokenHistory | None = None
                   ) -> torch.Tensor:
    """The logits each row samples from: repetition penalty, presence/frequency penalties, the min_tokens ban on
    stop tokens, then temperature, top-k, top-p, min-p. Greedy rows get only the steps before temperature (the
    rest cannot move their argmax). Returns `logits` itself when no row asks for anything (in its dtype), else an
    fp32 copy; never edits it. Pass the same `history` every step to skip re-reading token lists."""
    vocab_size = logits.shape[1]
    params = [request.params for request in requests]
    repetition_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    occurrence_rows = [i for i, r in enumerate(requests)
                       if r.output_token_ids and (r.params.presence_penalty or r.params.frequency_penalty)]
    banned_tokens = {i: tokens for i, r in enumerate(requests) if (tokens := _banned_by_min_tokens(r, vocab_size))}
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    tempered = any(params[i].temperature != 1.0 for i in sampled_rows)
    truncated_rows = [i for i in sampled_rows if 0 < params[i].top_k < vocab_size or params[i].top_p < 1.0]
    min_p_rows = [i for i in sampled_rows if params[i].min_p > 0.0]
    if not (repetition_rows or occurrence_rows or banned_tokens or tempered or truncated_rows or min_p_rows):
        return logits

    # Greedy rows carry neutral warper settings so whole-batch steps leave them alone.
    row_params = to_device(
        [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
         + ([1.0, 0.0, 1.0, 0.0] if p.greedy else [p.temperature, p.top_k, p.top_p, p.min_p]) for p in params],
        logits.device, torch.float32)
    repetition, presence, frequency, temperature, top_k, top_p, min_p = row_params.unbind(1)
    # below this a temperature is argmax anyway, and logits / 1e-40 would overflow to inf and then NaN
    temperature = temperature.clamp_min(1e-5)

    history = history if history is not None else TokenHistory()
    out = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if repetition_rows:
        prompts_and_outputs = [history.token_ids(requests[i]) for i in repetition_rows]
        _apply_repetition_penalty(out, prompts_and_outputs, repetition_rows, repetition)
    if occurrence_rows:
        outputs = [history.token_ids(requests[i])[requests[i].num_prompt_tokens:] for i in occurrence_rows]
        _apply_presence_frequency(out, outputs, occurrence_rows, presence, frequency)
    if banned_tokens:
        _ban_tokens_keeping_one(out, [np.array(t, dtype=np.int64) for t in banned_tokens.values()],
                                list(banned_tokens))
    if tempered:
        out.div_(temperature[:, None])
    if truncated_rows:
        top_ks = [params[i].top_k if 0 < params[i].top_k < vocab_size else 0 for i in truncated_rows]
        if not any(top_ks):
            _on_rows(out, truncated_rows, _keep_top_p, top_p)
        else:
            # with a top-k on every such row only the k_max largest logits can survive: no full-vocab sort
            num_candidates = max(top_ks) if all(top_ks) else vocab_size
            _on_rows(out, truncated_rows, lambda x, k, p: _keep_top_k_top_p(x, k, p, num_candidates), top_k, top_p)
    if min_p_rows:
        _on_rows(out, min_p_rows, _keep_min_p, min_p)
    return out


class Sampler:
    """Picks one token per row. Rows with params.seed draw from their own generator (kept on the request, so a
    seeded request samples the same tokens whatever else is in the batch); the rest share this sampler's."""

    def __init__(self, seed: int = 0, draw: str = "auto"):
        """draw: "race" (exponential race: a noise vector per row, cheap on a GPU, where one kernel pass picks the
        tokens: `batchgen.kernels.pick_tokens`), "inverse_cdf" (one uniform per row against the cumulative
        probabilities: the CPU's random numbers are the cost there), or "auto" (by device)."""
        if draw not in ("auto", "race", "inverse_cdf"):
            raise ValueError(f"draw must be auto, race or inverse_cdf, not {draw!r}")
        self.seed = seed
        self.draw = draw
        self._generators: dict[torch.device, torch.Generator] = {}
        self._history = TokenHistory()

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        return self.sample(logits, requests).result()

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> "PendingSample":
        """Queue the sampling work on the logits' device and return without waiting for it. logits: the
        model's (any float dtype: the race reads them as they are, the rest is computed in fp32)."""
        num_rows, vocab_size = logits.shape
        method = self.draw if self.draw != "auto" else "inverse_cdf" if logits.device.type == "cpu" else "race"
        if method != "race":
            logits = logits.float()
        processed = process_logits(logits, requests, self._history)
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if method == "race" or not sampled_rows:
            noise = self._race_noise(processed, requests, sampled_rows)
            token_ids, log_normalizer = ops.pick_tokens(processed, logits, noise)
        else:
            token_ids = processed.argmax(-1)
            index = to_device(sampled_rows, logits.device)
            drawn = self._inverse_cdf_draws(processed.index_select(0, index), [requests[i] for i in sampled_rows])
            token_ids.index_copy_(0, index, drawn)
            log_normalizer = logits.logsumexp(-1)
        chosen_logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - log_normalizer
        packed = [token_ids.double(), _nan_to_neg_inf(chosen_logprobs).double()]
        top_rows = [i for i, r in enumerate(requests) if r.params.logprobs]
        num_top = min(max((requests[i].params.logprobs for i in top_rows), default=0), vocab_size)
        if top_rows:
            index = to_device(top_rows, logits.device)
            top_values, top_ids = logits.index_select(0, index).topk(num_top, dim=-1)
            top_logprobs = _nan_to_neg_inf(top_values - log_normalizer.index_select(0, index)[:, None])
            packed += [top_ids.flatten().double(), top_logprobs.flatten().double()]
        return PendingSample(token_ids, torch.cat(packed), requests, top_rows, num_top)

    def _race_noise(self, processed: torch.Tensor, requests: list[Request], sampled: list[int]
                    ) -> torch.Tensor | None:
        """Exp(1) draws for the race, a row per sampled request (`sampled`: their rows) from its own generator
        when seeded (which is what lets seeded rows ignore the rest of the batch), 1.0 on greedy rows (their
        argmax stays); None when no row samples."""
        if not sampled:
            return None
        unseeded = [i for i in sampled if requests[i].params.seed is None]
        if len(unseeded) == len(requests):
            noise = torch.empty_like(processed, dtype=torch.float32)
            return noise.exponential_(generator=self._generator(processed.device))
        noise = torch.ones_like(processed, dtype=torch.float32)
        if unseeded:
            index = to_device(unseeded, processed.device)
            draws = torch.empty((len(unseeded), processed.shape[1]), dtype=torch.float32, device=processed.device)
            noise.index_copy_(0, index, draws.exponential_(generator=self._generator(processed.device)))
        for i in sampled:
            if requests[i].params.seed is not None:
                noise[i].exponential_(generator=_request_generator(requests[i], processed.device))
        return noise

    def _inverse_cdf_draws(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row with probability softmax(logits), each row from its own random numbers (seeded
        rows from their own generators)."""
        seeded = [j for j, r in enumerate(requests) if r.params.seed is not None]
        if not seeded:
            return _inverse_cdf(logits, self._generator(logits.device))
        token_ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        unseeded = [j for j, r in enumerate(requests) if r.params.seed is None]
        if unseeded:
            index = to_device(unseeded, logits.device)
            token_ids.index_copy_(0, index, _inverse_cdf(logits.index_select(0, index),
                                                         self._generator(logits.device)))
        for j in seeded:
            token_ids[j] = _inverse_cdf(logits[j:j + 1], _request_generator(requests[j], logits.device))[0]
        return token_ids

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


class PendingSample:
    """A step's sampling, queued on the device. `token_ids` stays there for the next step's inputs; `result()`
    waits for this sampling alone (not for work queued after it) and brings everything to the host in one
    copy."""

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, requests: list[Request], top_rows: list[int],
                 num_top: int):
        self.token_ids = token_ids
        self._requests, self._top_rows, self._num_top = requests, top_rows, num_top
        self._copied: torch.cuda.Event | None = None
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = packed

    def result(self) -> SamplerOutput:
        if self._copied is not None:
            self._copied.synchronize()
        return _unpack(self._host.tolist(), self._requests, self._top_rows, self._num_top)


def _inverse_cdf(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniform number per row against the cumulative probabilities (torch.multinomial does the same
    but is several times slower on the CPU)."""
    probs = logits.softmax(-1).nan_to_num_(nan=1.0)   # a row with no finite logit: any token (logprob -inf)
    cdf = probs.cumsum_(-1)
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    # strictly above u * total: a zero-probability token (a flat stretch of the cdf) is never the answer
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_max_(cdf.shape[1] - 1).squeeze(1)


def _unpack(values: list[float], requests: list[Request], top_rows: list[int], num_top: int) -> SamplerOutput:
    """Splits the packed transfer: token ids, chosen logprobs, then num_top ids and logprobs per top row."""
    num_rows = len(requests)
    token_ids = [int(t) for t in values[:num_rows]]
    logprobs = values[num_rows:2 * num_rows]
    top_ids = [int(t) for t in values[2 * num_rows:2 * num_rows + len(top_rows) * num_top]]
    top_logprobs = values[2 * num_rows + len(top_rows) * num_top:]
    top_start = {row: j * num_top for j, row in enumerate(top_rows)}
    entries: list[TokenLogprobs | None] = []
    for i, request in enumerate(requests):
        if request.params.logprobs is None:
            entries.append(None)
            continue
        start = top_start.get(i, 0)
        stop = start + min(request.params.logprobs, num_top)
        top = dict(zip(top_ids[start:stop], top_logprobs[start:stop]))
        entries.append(TokenLogprobs(token_ids[i], logprobs[i], top))
    return SamplerOutput(token_ids, logprobs, entries)


def _request_generator(request: Request, device: torch.device) -> torch.Generator:
    """Created on first use and kept on the request, so the stream continues across steps and preemptions;
    sample_index gives each of a prompt's n samples its own stream."""
    if request.generator is None:
        request.generator = torch.Generator(device=device).manual_seed(request.params.seed + request.sample_index)
    return request.generator


def _banned_by_min_tokens(request: Request, vocab_size: int) -> list[int]:
    """Tokens that would end the request before min_tokens; eos only counts when it stops (not ignore_eos)."""
    if len(request.output_token_ids) >= request.params.min_tokens:
        return []
    stops = set(request.params.stop_token_ids)
    if not request.params.ignore_eos:
        stops |= request.eos_token_ids
    return sorted(t for t in stops if 0 <= t < vocab_size)


def _flat_positions(token_arrays: list[np.ndarray], rows: list[int], vocab_size: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each listed token sits in the flattened [batch rows, V] logits, and in a flattened [len(rows), V]
    buffer. The tokens go up as one array; the index arithmetic runs on the device."""
    lengths = [len(tokens) for tokens in token_arrays]
    total = sum(lengths)
    tokens = to_device(np.concatenate(token_arrays), device)
    local_row = torch.repeat_interleave(torch.arange(len(rows), device=device), to_device(lengths, device),
                                        output_size=total)
    batch_row = to_device(rows, device)[local_row]
    return batch_row * vocab_size + tokens, local_row * vocab_size + tokens


def _apply_repetition_penalty(logits: torch.Tensor, token_arrays: list[np.ndarray], rows: list[int],
                              penalty: torch.Tensor) -> None:
    """HF semantics: every token seen in prompt or output is divided by the penalty if positive, multiplied if
    negative, once however often it occurs (repeated positions write the same value)."""
    positions, _ = _flat_positions(token_arrays, rows, logits.shape[1], logits.device)
    flat = logits.view(-1)
    scores = flat[positions]
    row_penalty = penalty[positions // logits.shape[1]]
    flat[positions] = torch.where(scores < 0, scores * row_penalty, scores / row_penalty)


def _apply_presence_frequency(logits: torch.Tensor, token_arrays: list[np.ndarray], rows: list[int],
                              presence: torch.Tensor, frequency: torch.Tensor) -> None:
    """OpenAI semantics over output tokens: logit -= frequency * count + presence * (count > 0). Integer counts
    over the vocab of these rows only; every occurrence then writes its token's final value."""
    vocab_size = logits.shape[1]
    positions, count_positions = _flat_positions(token_arrays, rows, vocab_size, logits.device)
    counts = torch.zeros(len(rows) * vocab_size, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, count_positions, torch.ones_like(count_positions, dtype=torch.int32))
    row = positions // vocab_size
    flat = logits.view(-1)
    flat[positions] = flat[positions] - frequency[row] * counts[count_positions] - presence[row]


def _ban_tokens_keeping_one(logits: torch.Tensor, token_arrays: list[np.ndarray], rows: list[int]) -> None:
    """Sets the tokens to -inf, except in a row where nothing else is allowed (a grammar that only accepts eos):
    there the grammar wins over min_tokens rather than leaving no token to sample."""
    vocab_size = logits.shape[1]
    positions, local_positions = _flat_positions(token_arrays, rows, vocab_size, logits.device)
    flat = logits.view(-1)
    original = flat[positions]
    flat[positions] = _NEG_INF
    alive = logits.index_select(0, to_device(rows, logits.device)).amax(-1) > _NEG_INF
    flat[positions] = torch.where(alive[local_positions // vocab_size], _NEG_INF, original)


def _on_rows(logits: torch.Tensor, rows: list[int], edit, *row_params: torch.Tensor) -> None:
    """Runs an in-place `edit(rows_logits, *rows_params)` on some rows only, without copies when it is all rows."""
    if len(rows) == logits.shape[0]:
        edit(logits, *row_params)
        return
    index = to_device(rows, logits.device)
    selected = logits.index_select(0, index)
    edit(selected, *(p.index_select(0, index) for p in row_params))
    logits.index_copy_(0, index, selected)


def _keep_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, num_candidates: int) -> None:
    """HF TopK then TopP on the rows' largest `num_candidates` logits, ascending. Both drop a prefix of that
    order, so the result is one threshold per row: the smallest surviving value (tokens tied with it stay)."""
    if num_candidates < logits.shape[1]:
        candidates = logits.topk(num_candidates, dim=-1).values.flip(-1)
    else:
        candidates = logits.sort(dim=-1).values
    k = torch.where((top_k > 0) & (top_k < num_candidates), top_k, num_candidates).long()
    kth = candidates.gather(1, (num_candidates - k)[:, None])
    candidates.masked_fill_(candidates < kth, _NEG_INF)
    cumulative = candidates.softmax(-1).cumsum_(-1)
    # top_p == 1 is off: no cumulative probability, not even an underflowed 0, may drop a token
    dropped = cumulative <= torch.where(top_p < 1.0, 1.0 - top_p, -1.0)[:, None]
    dropped[:, -1] = False
    first_kept = candidates.gather(1, dropped.sum(-1, keepdim=True))
    logits.masked_fill_(logits < torch.maximum(kth, first_kept), _NEG_INF)


def _keep_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """HF TopP alone, as a threshold per row (sort-free on the GPU: `batchgen.kernels.top_p_threshold`)."""
    logits.masked_fill_(logits < ops.top_p_threshold(logits, top_p)[:, None], _NEG_INF)


def _keep_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """HF MinP (drop p < min_p * p_max), compared in logit space so no softmax is needed."""
    threshold = logits.amax(-1, keepdim=True) + min_p.log()[:, None]
    logits.masked_fill_(logits < threshold, _NEG_INF)


def _nan_to_neg_inf(values: torch.Tensor) -> torch.Tensor:
    """A row with no finite logit (a grammar dead end) has no distribution; report -inf, not NaN."""
    return torch.where(values.isnan(), _NEG_INF, values)
