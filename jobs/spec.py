"""What a job is: where its rows come from, how they become requests, where results go, and what the
submit-time survey of its input learned (`InputSummary`), which fixes its shards.

What a row may contain is `batchgen.jobs.rows`; whole-file problems are `batchgen.jobs.errors.JobInputError`.
"""
import json
import os
import secrets
import string
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchgen.engine import grammar
from batchgen.jobs.paths import is_uri, redact_url
from batchgen.sampling_params import SamplingParams, StructuredOutput

InputFormat = Literal["jsonl", "parquet", "openai"]
OutputFormat = Literal["parquet", "openai"]

DEFAULT_MAX_TOKENS = 256
DEFAULT_SHARD_SIZE = 2000
# Nothing longer fits any context window; reading it whole would only spend memory.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024

# Columns every output part may carry; kept input columns must not shadow them.
OUTPUT_COLUMNS = frozenset({"id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs",
                            "json", "json_valid", "error", "endpoint"})


def new_job_id() -> str:
    """Sortable by submit time, unique without coordination."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class InputSummary(BaseModel):
    """What one streaming pass over the input learned; workers read shards with it without re-scanning."""
    model_config = ConfigDict(extra="forbid")

    input_format: InputFormat
    num_rows: int
    num_invalid_rows: int                       # rows rejected by the parser (duplicates are listed apart)
    input_size: int                             # bytes; read_rows refuses a file that changed since
    input_mtime_ns: int | None = None
    shard_size: int                             # stride of shard_starts
    shard_starts: list[tuple[int, int]] = []    # JSONL: (byte offset, 1-based line) of rows 0, k, 2k, ...
    duplicate_rows: list[int] = []              # row indices whose id an earlier row already has
    unknown_fields: dict[str, str] = {}         # field -> where it was first seen (warned, ignored)
    first_errors: list[str] = []                # a few row errors, for the submit-time report
    kept_schema: str | None = None              # base64 Arrow IPC schema of the kept columns
    max_n: int = 1                              # n > 1 anywhere makes the text column a list
    any_logprobs: bool = False
    any_json_output: bool = False               # a json_schema / json_object row: json, json_valid columns


class JobSpec(BaseModel):
    """One submitted job: where rows come from, how they become requests, where results go."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    job_id: str = Field(default_factory=new_job_id, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    input: str                                  # local path or pyarrow filesystem URI
    input_format: InputFormat | None = None     # None: detected by validate_input
    model: str = "default"
    output: str                                 # directory: local path or pyarrow filesystem URI
    output_format: OutputFormat = "parquet"     # openai: also results.jsonl in the Batch API output shape
    sampling: dict[str, Any] = Field(default_factory=lambda: {"max_tokens": DEFAULT_MAX_TOKENS})
    structured: StructuredOutput | None = None  # job-wide; a row's response_format replaces it
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    id_column: str = "id"
    template: str | None = None                 # "Summarize: {text}"; placeholders are column names
    system_prompt: str | None = None            # makes every row a chat
    as_chat: bool = False                       # send prompt text as one user message (chat template)
    cache_salt: str | None = None               # prefix-cache blocks are shared only with requests of this salt
    keep_columns: list[str] = []
    shard_size: int = Field(DEFAULT_SHARD_SIZE, ge=1)
    max_line_bytes: int = Field(DEFAULT_MAX_LINE_BYTES, ge=1024)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    input_summary: InputSummary | None = None   # set from validate_input at submit time

    @field_validator("input", "output")
    @classmethod
    def _absolute_local_path(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value if is_uri(value) else os.path.abspath(value)

    @field_validator("sampling")
    @classmethod
    def _valid_sampling(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "structured" in value:
            raise ValueError("give structured output as the job's `structured`, not inside sampling")
        value = {"max_tokens": DEFAULT_MAX_TOKENS, **value}
        SamplingParams.model_validate(value, strict=True)
        return value

    @field_validator("structured")
    @classmethod
    def _valid_schema(cls, value: StructuredOutput | None) -> StructuredOutput | None:
        if value is not None:
            if value.json_schema is not None:
                check_json_schema(json.dumps(value.json_schema, sort_keys=True))
            grammar.validate(value)   # the grammar engine can enforce it: else refuse the job at submit time
        return value

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value is not None:
            template_placeholders(value)
        return value

    @field_validator("keep_columns")
    @classmethod
    def _no_shadowing(cls, value: list[str]) -> list[str]:
        clash = sorted(OUTPUT_COLUMNS & set(value))
        if clash:
            raise ValueError(f"kept columns {clash} would shadow output columns of the same name")
        return value

    @model_validator(mode="after")
    def _fits_given_input_format(self):
        if self.input_format is not None:
            self.check_input_format(self.input_format)
        return self

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in ("input", "output") else value

    @property
    def input_display(self) -> str:
        return redact_url(self.input)

    @property
    def output_display(self) -> str:
        return redact_url(self.output)

    def check_input_format(self, input_format: InputFormat) -> None:
        """Refuse settings that the input's format (given, or detected at submit time) can't take."""
        if self.template is not None and input_format == "openai":
            raise ValueError("a template applies to JSONL / Parquet rows, not to OpenAI batch lines")

    @property
    def summary(self) -> InputSummary:
        """The survey of the input that `validate_input` makes at submit time; everything after needs it."""
        if self.input_summary is None:
            raise ValueError("spec.input_summary is not set: run validate_input at submit time")
        return self.input_summary

    @property
    def num_shards(self) -> int:
        return -(-self.summary.num_rows // self.shard_size)

    def shard_rows(self, shard_index: int) -> tuple[int, int]:
        """The [start, end) input rows of a shard."""
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.summary.num_rows)


def template_placeholders(template: str) -> list[str]:
    """Column names a template reads. Only plain `{column}` is allowed: attribute or index access
    (`{x.__class__}`, `{x[0]}`), positional fields and format specs are refused, so row data can never reach
    into Python objects."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None
    names = []
    for _, name, format_spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name:
            raise ValueError(f"bad template placeholder {{{name}}}: use a column name, as in {{text}}")
        if format_spec or conversion:
            raise ValueError(f"bad template placeholder in {template!r}: format specs and conversions "
                             "are not supported")
        names.append(name)
    if not names:
        raise ValueError(f"template {template!r} has no {{column}} placeholder")
    return names


@lru_cache(maxsize=256)
def check_json_schema(schema_json: str) -> None:
    """Refuse a schema that is not valid under its own JSON Schema draft (ValueError saying where)."""
    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(f"invalid JSON schema at {where}: {exc.message}") from None
