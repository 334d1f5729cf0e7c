"""One sequence being generated; all its state lives here, not in the scheduler or the cache."""
import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from batchgen.outputs import TokenLogprobs
from batchgen.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    # which user prompt and which of its n samples (or beams) this sequence is
    group_index: int = 0
    sample_index: int = 0
    # the prefix cache's scope: blocks are shared only between requests with equal salts and extra keys
    # (a job's or tenant's salt; later a LoRA adapter) and rotary-table offset (rope_position_offset, below)
    cache_salt: str | None = None
    cache_extra_keys: tuple = ()

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0     # tokens whose K/V are in the cache
    # 1 while the token sampled last step is still on the device: the next step already computes it, and the
    # engine appends it once that step is under way
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0       # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    suspect: bool = False            # was in a step that raised: runs alone next, to see if it is the cause
    num_failures: int = 0            # steps that raised while it ran alone
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # chained digests of this sequence's full blocks
    num_registered_blocks: int = 0   # leading full blocks already offered to the prefix cache
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprobs] | None = None
    # entry p: logprob of prompt token p given the ones before it (entry 0 stays None); filled by the prefill
    # passes, overwritten alike when a preempted request is recomputed
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    grammar: Any = None              # per-request grammar matcher when structured output is asked for
    rope_position_offset: int = 0    # rotary-table row of position 0 (LongRoPE's long-factor half, or 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def length(self) -> int:
        """Tokens the sequence has once the token still on the device (if any) is appended: what the next step
        computes up to."""
        return self.num_tokens + self.num_pending_tokens

    def pending_token_is_last(self, max_model_len: int) -> bool:
        """The token still on the device surely ends the request (a length limit), so no step needs to
        compute it."""
        return self.num_pending_tokens > 0 and (len(self.output_token_ids) + 1 >= self.params.max_tokens
                                                or self.num_tokens + 1 >= max_model_len)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
