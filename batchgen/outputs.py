"""What `LLM.generate` returns: one RequestOutput per prompt, in input order."""
from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    """Logprob of the chosen token and the top-k alternatives at one generated position."""
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" | "length" | "error"
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None   # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0      # prompt tokens served by the prefix cache
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then each token's logprob given
    # the tokens before it, with the top-k alternatives (vLLM's shape)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_preemptions: int = 0
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
