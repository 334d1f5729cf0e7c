"""Continuous batching under a per-step token budget.

Each step first gives every running request its next tokens (one for a decode, the rest of its prompt, or
a chunk of it, for a prefill in progress), then admits waiting requests while budget, sequence cap and KV
blocks allow. When blocks run out, the most recently admitted running request is preempted: its blocks are
freed and it goes back to the head of the queue to be recomputed later (its generated tokens are kept, so
its output doesn't change). The scheduler speaks only in tokens per request; blocks are the KV manager's.

Admission ("reserve", the default) keeps preemption rare: a request is admitted only while the cache can hold
every running request as it grows, each by its expected growth: the share of its remaining max_tokens that
recently finished requests have used (about the last max_num_seqs of them, so a worker's next job is not
judged by its last one; all of it until one finishes, as when outputs run to full length). Requests end at
different steps and give their blocks back, so what must fit is the most they hold at once (`_peak_blocks`),
not all of them at full length side by side: with lengths drawn from 100-1,024 tokens in and out, 1.3x as many
ran at once (docs/benchmarks.md; requests of equal lengths admitted together end together, and gain nothing).
A preempted request's K/V is computed twice: admitting requests the cache cannot finish cost the 1000-in /
1000-out runs up to 60% of their prompt tokens again (docs/benchmarks.md). Except for a tail that is cheaper to
recompute than to run as a wave of its own: when equal lengths finish together, what waits runs as a last wave,
a whole output length at few rows a step, each step still reading every weight. When recomputing everything
still waiting (its expected tokens: the worst case, preempted at its end) costs less than the steps it would run
alone, each worth `decode_step_tokens` tokens of prefill, it is admitted while its prompts fit. Those steps are
counted from when the running requests ending first would give it room: requests that arrived one after another
end one after another, and what waits behind them runs beside the rest, not alone. "greedy" admits while the
prompt fits.
"""
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from batchgen.engine.kv_cache import KVCacheManager
from batchgen.engine.request import Request, RequestStatus

# A decode step's fixed cost, reading every weight once, in tokens of prefill that cost as much: the device's
# matmul rate over its memory bandwidth, per weight. H200: bf16 790 TFLOP/s over 4.14 TB/s, 2 bytes and 2 FLOPs a
# weight per token: ~190; fp8 ~1,300 TFLOP/s, 1 byte: ~157 (docs/benchmarks.md). A 2-core x86 CPU, fp32: a
# 4096 x 4096 F.linear of 1 row took as long as 8-11 rows of one of 256.
DECODE_STEP_TOKENS = {"cuda": 160, "cpu": 10}


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, is_ready: Callable[[Request], bool] = lambda r: True,
                 max_model_len: int = 1 << 62, rope_position_offset: Callable[[int], int] = lambda length: 0,
                 admission: str = "reserve", decode_step_tokens: int = DECODE_STEP_TOKENS["cpu"]):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.is_ready = is_ready     # e.g. its grammar has compiled
        self.max_model_len = max_model_len
        # the rotary-table offset a sequence of a given length uses (LongRoPE: long factors past a length)
        self.rope_position_offset = rope_position_offset
        self.admission = admission   # "reserve" or "greedy": see the module docstring
        self.decode_step_tokens = decode_step_tokens   # DECODE_STEP_TOKENS: when a tail is merged
        # over requests that finished generating (not aborted or failed), each earlier one weighing
        # 1 - 1 / max_num_seqs less than the next
        self.finished_output_tokens = 0.0
        self.finished_max_tokens = 0.0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self._set_rope_position_offset(request, self.rope_position_offset(request.num_tokens))
        self.waiting.append(request)

    @staticmethod
    def _set_rope_position_offset(request: Request, offset: int) -> None:
        """The same tokens at another offset have other K/V: the offset roots the prefix-cache digests, so the
        request's are made again."""
        request.rope_position_offset = offset
        request.block_hashes = []

    @property
    def output_share(self) -> float:
        """The share of their max_tokens that recently finished requests generated; 1 until one has finished."""
        return self.finished_output_tokens / self.finished_max_tokens if self.finished_max_tokens else 1.0

    def _expected_growth(self, request: Request) -> int:
        """Tokens the request is expected to add before it finishes: output_share of those its max_tokens (and
        the context) still allow."""
        limit = min(request.num_prompt_tokens + request.params.max_tokens, self.max_model_len)
        return math.ceil(max(0, limit - request.length) * self.output_share)

    def _expected_blocks(self, request: Request) -> int:
        """Blocks the request is expected to hold when it finishes."""
        return self.kv_cache.blocks_needed(request.length + self._expected_growth(request))

    def _peak_blocks(self, requests: list[Request]) -> int:
        """At most how many blocks `requests` will hold at once, each growing a token a step for its expected
        growth and then freeing its blocks: the most over the steps at which one of them ends, when those
        growing at least as long are alive, each at its length then (a block shared by a prefix counted for
        each of its holders). At step t a request of length L holds ceil((L + t) / B) <= (L + t + B - 1) / B."""
        lengths = np.array([r.length for r in requests], dtype=np.int64)
        growth = np.array([self._expected_growth(r) for r in requests], dtype=np.int64)
        order = np.argsort(-growth, kind="stable")
        lengths, growth = lengths[order], growth[order]
        alive = np.arange(1, len(requests) + 1)
        size = self.kv_cache.block_size
        return int(((np.cumsum(lengths) + alive * (growth + size - 1)) // size).max())

    def _waiting_is_cheaper_to_recompute(self) -> bool:
        """Recomputing everything waiting at its expected length costs fewer tokens than the steps it would run
        alone as a wave of its own are worth: see the module docstring. A tail that cannot run beside the running
        requests (the sequence cap) or would not fit the cache by itself is no last wave; so this reads at most
        max_num_seqs requests a step."""
        if len(self.running) + len(self.waiting) > self.max_num_seqs:
            return False
        tokens = steps = 0
        most = min(self.decode_step_tokens * self.max_model_len, self.kv_cache.num_blocks * self.kv_cache.block_size)
        for request in self.waiting:
            growth = self._expected_growth(request)
            tokens += request.num_tokens + growth
            steps = max(steps, growth)
            if tokens > most:
                return False
        if tokens > self.decode_step_tokens * steps:   # it runs alone for at most all of its steps: the cheap bound
            return False
        return tokens <= self.decode_step_tokens * self._steps_alone(steps)

    def _steps_alone(self, steps: int) -> int:
        """Of the waiting tail's `steps`, how many it would run after every running request has ended, were it
        admitted once those ending first give it room. Requests that end in lockstep leave it all of its steps;
        requests that arrived one after another end one after another, and a tail admitted as the first of them
        end runs beside the rest (counted as a wave, such tails were merged at every step and preempted hundreds
        of times: docs/benchmarks.md)."""
        if not self.running:
            return steps
        remaining = np.array([self._expected_growth(r) for r in self.running], dtype=np.int64)
        held = np.array([self._expected_blocks(r) for r in self.running], dtype=np.int64)
        order = np.argsort(remaining, kind="stable")
        freed = np.cumsum(held[order])
        # free blocks the running requests will not take as they grow (a prefill in progress takes its prompt's)
        growing_into = int(np.maximum(held - np.array([len(r.block_ids) for r in self.running]), 0).sum())
        room = sum(map(self._expected_blocks, self.waiting)) - (self.kv_cache.num_free_blocks - growing_into)
        admitted_at = 0 if room <= 0 else int(remaining[order][min(np.searchsorted(freed, room), len(order) - 1)])
        return max(0, admitted_at + steps - int(remaining.max()))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        suspect = next((r for r in self.waiting if r.suspect), None)
        if suspect is not None:
            return self._schedule_alone(suspect)
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.pending_token_is_last(self.max_model_len):
                index += 1
                continue
            offset = self.rope_position_offset(request.length)
            if offset != request.rope_position_offset:
                # LongRoPE switches to its long factors once a sequence passes the original context, and every
                # K/V changes with them: recompute the sequence, as Hugging Face's generate does there
                self._preempt(self.running.pop(index))
                self._set_rope_position_offset(request, offset)
                continue
            num_new = min(request.length - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is request:
                    break
            else:
                batch.requests.append(request)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                index += 1

        # admitting new work while running requests were just preempted would only thrash
        if batch.num_preempted:
            return batch
        can_admit = bool(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs
        reserve = self.admission == "reserve" and can_admit and not self._waiting_is_cheaper_to_recompute()
        # free blocks the running requests are expected to take as they grow
        reserved = sum(max(0, self._expected_blocks(r) - len(r.block_ids)) for r in self.running) if reserve else 0
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self.is_ready(request):
                skipped.append(self.waiting.popleft())
                continue
            first_admission = request.num_preemptions == 0
            cached_prefix = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached_prefix) * self.kv_cache.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            expected = self._expected_blocks(request) if reserve else 0
            # everyone's growth fits the free blocks side by side (cheap to check), or else at its peak
            if (reserve and self.running and expected - len(cached_prefix) > self.kv_cache.num_free_blocks - reserved
                    and self._peak_blocks([*self.running, request]) > self.kv_cache.num_blocks):
                break
            if not self.kv_cache.allocate(request, num_new, cached_prefix):
                break
            reserved += max(0, expected - len(request.block_ids))
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if first_admission:
                request.num_cached_tokens = num_cached
                self.kv_cache.num_hit_tokens += num_cached
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _schedule_alone(self, request: Request) -> ScheduledBatch:
        """After a step raised, each of its requests runs once by itself, so the one that breaks the engine
        is found and the others are cleared."""
        batch = ScheduledBatch()
        num_new = min(request.num_tokens, self.max_num_batched_tokens)
        while not self.kv_cache.allocate(request, num_new):
            self.preempt(self.running[-1])
            batch.num_preempted += 1
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        batch.requests.append(request)
        batch.num_new_tokens.append(num_new)
        return batch

    def preempt(self, request: Request) -> None:
        """Send a running request back to the queue to be recomputed (one already back there stays as is)."""
        if request in self.running:
            self.running.remove(request)
            self._preempt(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Drop a finished (or aborted) request and release its blocks."""
        if request.finish_reason in ("stop", "length") and request.params.max_tokens:
            keep = 1 - 1 / self.max_num_seqs
            limit = min(request.params.max_tokens, self.max_model_len - request.num_prompt_tokens)
            self.finished_output_tokens = self.finished_output_tokens * keep + len(request.output_token_ids)
            self.finished_max_tokens = self.finished_max_tokens * keep + limit
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
