"""What a user may ask of one generation; validated once, with errors that name the field."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class StructuredOutput(BaseModel):
    """Exactly one constraint on the output text."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None
    json_object: bool = False          # any JSON object
    regex: str | None = None
    choice: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [self.json_schema is not None, self.json_object, self.regex is not None, self.choice is not None]
        if sum(given) != 1:
            raise ValueError("structured output takes exactly one of json_schema, json_object, regex, choice")
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one option")
        return self


MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    """vLLM-style sampling parameters. temperature 0 is greedy; beam_width > 1 turns on beam search.
    max_tokens 0 scores the prompt (prompt_logprobs) and generates nothing. Fields left unset take the
    model's defaults (its generation_config.json: `Engine.default_sampling`)."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n: int = Field(1, ge=1, le=128)
    # top-k logprobs per prompt token; declared before max_tokens, whose validator reads it
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int = Field(16, ge=0)         # 0: score the prompt only
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)               # 0 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)          # top-k logprobs per generated token
    beam_width: int = Field(1, ge=1, le=64)
    length_penalty: float = 1.0
    structured: StructuredOutput | None = None

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_for_scoring(cls, value: int, info: ValidationInfo) -> int:
        if value == 0 and info.data.get("prompt_logprobs") is None:
            raise ValueError("max_tokens 0 is for scoring prompts: set prompt_logprobs too (0 for the prompt "
                             "tokens' own logprobs)")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value):
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.beam_width > 1 and self.n > self.beam_width:
            raise ValueError(f"n ({self.n}) must not exceed beam_width ({self.beam_width}) in beam search")
        if self.beam_width > 1 and self.structured is not None:
            raise ValueError("beam search cannot be combined with structured output")
        if self.prompt_logprobs is not None and self.beam_width > 1:
            raise ValueError("prompt_logprobs cannot be combined with beam search")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
