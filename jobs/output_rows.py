"""Engine results -> output rows -> one Arrow table per shard, with the one schema every part of a job has.

For json_schema / json_object rows the text is parsed and checked against the schema here (the `json` and
`json_valid` columns).
"""
import base64
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema
import pyarrow as pa
import referencing
import referencing.exceptions

from batchgen.jobs.rows import PromptRow
from batchgen.jobs.spec import OUTPUT_COLUMNS, JobSpec
from batchgen.outputs import RequestOutput, TokenLogprobs

_TOP_LOGPROB = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64())])
LOGPROBS_TYPE = pa.list_(pa.struct([("token_id", pa.int64()), ("logprob", pa.float64()),
                                    ("top", pa.list_(_TOP_LOGPROB))]))


@dataclass(slots=True)
class OutputRow:
    """One row of output: the engine's answer to a PromptRow (or the row's error), per completion lists
    (one entry per sample, n of them)."""
    id: str
    columns: dict[str, Any]
    endpoint: str                                   # "chat" | "completion": the OpenAI object it maps to
    texts: list[str] | None = None
    finish_reasons: list[str] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    logprobs: list[list[TokenLogprobs] | None] | None = None
    json: list[str | None] | None = None
    json_valid: list[bool] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    total_logprob: float | None = None              # scoring: sum of the prompt tokens' logprobs (all but the first)
    scored_tokens: int | None = None
    error: str | None = None

    @property
    def perplexity(self) -> float | None:
        if not self.scored_tokens:
            return None
        return math.exp(-self.total_logprob / self.scored_tokens)


def output_row(row: PromptRow, result: RequestOutput | None) -> OutputRow:
    """Pair an input row with its engine result (None for rows that never ran because they are invalid).
    For json_schema / json_object rows the text is parsed and checked against the schema here."""
    out = OutputRow(id=row.id, columns=row.columns, endpoint="chat" if row.is_chat else "completion",
                    error=row.error)
    if row.error is not None:
        return out
    if result is None:
        raise ValueError(f"row {row.id!r} is valid but has no engine result")
    out.prompt_tokens = result.prompt_tokens
    if result.error is not None:
        out.error = result.error
        return out
    completions = result.outputs
    out.texts = [c.text for c in completions]
    out.finish_reasons = [c.finish_reason for c in completions]
    out.completion_tokens = result.completion_tokens
    out.cached_tokens = result.num_cached_tokens
    out.preemptions = result.num_preemptions
    if row.params.logprobs is not None:
        out.logprobs = [c.logprobs for c in completions]
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = result.prompt_logprobs
        out.scored_tokens = len(result.prompt_logprobs) - 1
        out.total_logprob = sum(entry.logprob for entry in result.prompt_logprobs[1:])
    structured = row.params.structured
    if structured is not None and (structured.json_schema is not None or structured.json_object):
        checked = [_check_json(text, structured.json_schema) for text in out.texts]
        out.json = [text for text, _ in checked]
        out.json_valid = [valid for _, valid in checked]
    return out


def _check_json(text: str, schema: dict | None) -> tuple[str | None, bool]:
    """(the JSON text if it parses, whether it parses and fits the schema / is an object)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None, False
    if schema is None:
        return text, isinstance(value, dict)
    try:
        return text, _validator(json.dumps(schema, sort_keys=True)).is_valid(value)
    except referencing.exceptions.Unresolvable:    # a $ref to another document: never fetched
        return text, False


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> jsonschema.protocols.Validator:
    """An empty registry: jsonschema would otherwise fetch a row's remote $ref (http://, file://) itself."""
    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema, registry=referencing.Registry())


def output_schema(spec: JobSpec) -> pa.Schema:
    """The one Arrow schema every part of a job is written with, fixed at submit time from the survey:
    text and finish_reason (and logprobs, json, json_valid) are list<...> with one entry per sample when any
    row asks for n > 1, plain values otherwise; logprobs appears when any row asks for them, json and
    json_valid when any row asks for JSON output, endpoint with output_format "openai"."""
    summary = spec.summary

    def per_sample(value_type: pa.DataType) -> pa.DataType:
        return pa.list_(value_type) if summary.max_n > 1 else value_type

    kept = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(summary.kept_schema))) if summary.kept_schema else []
    fields = [pa.field("id", pa.string(), nullable=False), *kept,
              ("text", per_sample(pa.string())), ("finish_reason", per_sample(pa.string())),
              ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())]
    if summary.any_logprobs:
        fields.append(("logprobs", per_sample(LOGPROBS_TYPE)))
    if summary.any_json_output:
        fields += [("json", per_sample(pa.string())), ("json_valid", per_sample(pa.bool_()))]
    if summary.any_scoring:
        fields += [("total_logprob", pa.float64()), ("scored_tokens", pa.int64()), ("perplexity", pa.float64())]
    if "prompt_logprobs" in spec.sampling or summary.row_sampling.get("prompt_logprobs"):
        fields.append(("prompt_logprobs", LOGPROBS_TYPE))
    fields.append(("error", pa.string()))
    if spec.output_format == "openai":
        fields.append(("endpoint", pa.string()))
    return pa.schema(fields, metadata={b"batchgen.job_id": spec.job_id.encode()})


def rows_table(rows: Iterable[OutputRow], schema: pa.Schema) -> pa.Table:
    multi = pa.types.is_list(schema.field("text").type)
    kept = [f.name for f in schema if f.name not in OUTPUT_COLUMNS]
    kept_as_text = {f.name for f in schema if f.name in kept and pa.types.is_string(f.type)}
    columns: dict[str, list] = {name: [] for name in schema.names}

    def per_sample(values: list | None) -> Any:
        return values if values is None or multi else values[0]

    for row in rows:
        columns["id"].append(row.id)
        for name in kept:
            value = row.columns.get(name)
            if name in kept_as_text and value is not None and not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)   # mixed-type JSON column: stored as JSON text
            columns[name].append(value)
        columns["text"].append(per_sample(row.texts))
        columns["finish_reason"].append(per_sample(row.finish_reasons))
        columns["prompt_tokens"].append(row.prompt_tokens)
        columns["completion_tokens"].append(row.completion_tokens)
        if "logprobs" in columns:
            columns["logprobs"].append(per_sample(None if row.logprobs is None else
                                                  [_logprob_records(lp) for lp in row.logprobs]))
        if "json" in columns:
            columns["json"].append(per_sample(row.json))
            columns["json_valid"].append(per_sample(row.json_valid))
        if "total_logprob" in columns:
            columns["total_logprob"].append(row.total_logprob)
            columns["scored_tokens"].append(row.scored_tokens)
            columns["perplexity"].append(row.perplexity)
        if "prompt_logprobs" in columns:
            columns["prompt_logprobs"].append(_logprob_records(row.prompt_logprobs))
        columns["error"].append(row.error)
        if "endpoint" in columns:
            columns["endpoint"].append(row.endpoint)
    return pa.Table.from_pydict(columns, schema=schema)


def _logprob_records(positions: list[TokenLogprobs | None] | None) -> list[dict | None] | None:
    """Parquet records of logprobs; a prompt's first token has none (None)."""
    if positions is None:
        return None
    return [None if p is None else
            {"token_id": p.token_id, "logprob": p.logprob,
             "top": [{"token_id": t, "logprob": lp} for t, lp in sorted(p.top.items(), key=lambda kv: -kv[1])]}
            for p in positions]
