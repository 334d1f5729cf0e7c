"""Readers and writers of job files, streaming, through pyarrow filesystems (local paths or URIs).

Inputs: JSONL (OpenAI batch lines included) read line by line as bytes, so a bad line is that row's error;
Parquet read by record batches. `validate_input` makes the single submit-time pass that counts rows, records
where each shard starts, and finds duplicate ids; `read_rows` then reads one shard without re-scanning.

Outputs, under the job's output directory:
  job.json                    the JobSpec (input summary included)
  parts/shard-00042.parquet   one per shard, written to a temp name then moved into place, so a part that
                              exists is complete; its footer metadata carries the shard's ShardStats
  stats.json                  JobStats
  results.jsonl               only with output_format "openai": OpenAI Batch API output lines
"""
import base64
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import referencing
import referencing.exceptions

from batchgen.jobs.spec import (OPENAI_LINE_FIELDS, OUTPUT_COLUMNS, InputFormat, InputSummary, JobSpec, PromptRow,
                                RowParser, is_uri, redact_url)
from batchgen.jobs.stats import JobStats, ShardStats
from batchgen.outputs import RequestOutput, TokenLogprobs

log = logging.getLogger("batchgen.jobs")

PARTS_DIR = "parts"
SPEC_FILE = "job.json"
STATS_FILE = "stats.json"
OPENAI_OUTPUT_FILE = "results.jsonl"
SHARD_STATS_KEY = b"batchgen.shard_stats"
_PART_NAME = re.compile(r"^shard-(\d+)\.parquet$")
_TEMP_SUFFIX = ".tmp"
_READ_BUFFER = 1 << 20
_PARQUET_BATCH_ROWS = 1024     # rows decoded at a time; bounds memory for long-text columns
_DETECT_LINES = 64             # lines looked at to tell plain JSONL from OpenAI batch lines
_FIRST_ERRORS = 10

_TOP_LOGPROB = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64())])
LOGPROBS_TYPE = pa.list_(pa.struct([("token_id", pa.int64()), ("logprob", pa.float64()),
                                    ("top", pa.list_(_TOP_LOGPROB))]))


class JobInputError(ValueError):
    """The input as a whole can't be used (missing, empty, unknown format, no prompt column, truncated):
    the job is refused before anything is enqueued. The message names the file."""


class JobOutputError(OSError):
    """The output location can't be written or read (unwritable, full, missing parts)."""


def check_roots(spec: JobSpec) -> None:
    """Refuse a job whose input lies outside BATCHGEN_INPUT_ROOT, or whose output outside BATCHGEN_OUTPUT_ROOT
    (each when set): a deployment whose workers must read and write only there, whoever submits. `..` and
    symbolic links are resolved before comparing; a URI must lie under a URI root. Raises JobInputError /
    JobOutputError naming the location."""
    for location, variable, error in (("input", "BATCHGEN_INPUT_ROOT", JobInputError),
                                      ("output", "BATCHGEN_OUTPUT_ROOT", JobOutputError)):
        root = os.environ.get(variable)
        if root and not _inside(getattr(spec, location), root):
            raise error(f"{redact_url(getattr(spec, location))}: the {location} must lie under {variable} "
                        f"({redact_url(root)})")


def _inside(location: str, root: str) -> bool:
    if is_uri(location) or is_uri(root):
        where, base = urlsplit(location), urlsplit(root)
        path, root_path = posixpath.normpath(where.path or "/"), posixpath.normpath(base.path or "/")
        same_place = (is_uri(location) and is_uri(root)
                      and (where.scheme, where.hostname) == (base.scheme, base.hostname))
    else:
        path, root_path, same_place = os.path.realpath(location), os.path.realpath(root), True
    return same_place and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or a URI (s3://, gs://, file://...)."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


# ---------------------------------------------------------------------------------------------------------
# reading

def validate_input(spec: JobSpec) -> InputSummary:
    """Check the input at submit time and survey it in one streaming pass (flat memory, plus 16 bytes per
    row to find duplicate ids). Raises JobInputError for whole-file problems; row problems are counted and
    a few reported in `first_errors`. Store the result as `spec.input_summary` before planning shards."""
    check_roots(spec)
    fs, path, info = _open_input(spec)
    input_format = spec.input_format or _detect_format(fs, path, spec)
    name = spec.input_display
    if input_format == "openai" and spec.template:
        raise JobInputError(f"{name}: a template applies to JSONL / Parquet rows, not to OpenAI batch lines")
    survey = _Survey(spec, input_format)
    if input_format == "parquet":
        with _open_parquet(fs, path, name) as parquet:
            columns = _parquet_columns(spec, parquet, survey.parser, name)
            survey.unknown_fields = {c: "the schema" for c in parquet.schema_arrow.names if c not in columns}
            for row in _parquet_rows(parquet, survey.parser, columns, 0, parquet.metadata.num_rows, name):
                survey.add(row, row.index + 1)
            kept = pa.schema([parquet.schema_arrow.field(c).with_nullable(True) for c in spec.keep_columns])
    else:
        with _open_stream(fs, path) as stream:
            for offset, line_no, line in _lines(stream, 0, 1, spec.max_line_bytes):
                if survey.num_rows % spec.shard_size == 0:
                    survey.shard_starts.append((offset, line_no))
                survey.add(_line_row(survey.parser, spec, line, survey.num_rows, line_no), line_no)
        kept = survey.kept_schema()
    if survey.num_rows == 0:
        raise JobInputError(f"{name}: no rows (the file holds only blank lines)")
    if survey.num_invalid_rows == survey.num_rows:
        raise JobInputError(f"{name}: no valid rows; the first problems:\n  " + "\n  ".join(survey.first_errors))
    for field_name, where in survey.unknown_fields.items():
        log.warning("%s: unknown field '%s' ignored (first at %s)", name, field_name, where)
    return survey.summary(input_format, info, kept)


def plan_shards(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of the shards, in input order."""
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def read_rows(spec: JobSpec, start: int, end: int) -> Iterator[PromptRow]:
    """Parsed rows [start, end) in input order. JSONL seeks to the nearest shard start recorded by
    validate_input; Parquet decodes only the row groups that hold the range. Raises JobInputError if the
    file changed since validation (the shard plan would no longer match it)."""
    summary = spec.input_summary
    if summary is None:
        raise ValueError("spec.input_summary is not set: run validate_input at submit time")
    fs, path, info = _open_input(spec)
    name = spec.input_display
    if info.size != summary.input_size or (summary.input_mtime_ns is not None and info.mtime_ns is not None
                                           and info.mtime_ns != summary.input_mtime_ns):
        raise JobInputError(f"{name}: the file changed since the job was submitted; submit it again")
    parser = RowParser(spec, summary.input_format, frozenset(summary.duplicate_rows))
    if summary.input_format == "parquet":
        with _open_parquet(fs, path, name) as parquet:
            yield from _parquet_rows(parquet, parser, _parquet_columns(spec, parquet, parser, name), start, end, name)
        return
    if start >= end or not summary.shard_starts:
        return
    stride = min(start // summary.shard_size, len(summary.shard_starts) - 1)
    offset, line_no = summary.shard_starts[stride]
    index = stride * summary.shard_size
    with _open_stream(fs, path) as stream:
        stream.seek(offset)
        for _, line_no, line in _lines(stream, offset, line_no, spec.max_line_bytes):
            if index >= end:
                return
            if index >= start:
                yield _line_row(parser, spec, line, index, line_no)
            index += 1


class _Survey:
    """What validate_input accumulates row by row."""

    def __init__(self, spec: JobSpec, input_format: InputFormat):
        self.spec = spec
        self.parser = RowParser(spec, input_format)
        self.num_rows = self.num_invalid_rows = 0
        self.shard_starts: list[tuple[int, int]] = []
        self.first_errors: list[str] = []
        self.unknown_fields: dict[str, str] = {}
        self.id_digests = bytearray()
        self.kept_kinds: dict[str, set[str]] = {name: set() for name in spec.keep_columns}
        self.max_n, self.any_logprobs, self.any_json_output = 1, False, False

    def add(self, row: PromptRow, position: int) -> None:
        self.num_rows += 1
        self.id_digests += hashlib.blake2b(row.id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        for name in row.unknown_fields:
            self.unknown_fields.setdefault(name, f"{self.parser.unit} {position}")
        for name, value in row.columns.items():
            self.kept_kinds[name].add(_kind(value))
        if row.error is not None:
            self.num_invalid_rows += 1
            if len(self.first_errors) < _FIRST_ERRORS:
                self.first_errors.append(row.error)
            return
        params = row.params
        self.max_n = max(self.max_n, params.n)
        self.any_logprobs |= params.logprobs is not None
        self.any_json_output |= params.structured is not None and (
            params.structured.json_schema is not None or params.structured.json_object)

    def kept_schema(self) -> pa.Schema:
        """JSON values have no declared types: the narrowest Arrow type that holds every value seen."""
        return pa.schema([(name, _KIND_TYPES.get(frozenset(kinds - {"null"}), pa.string()))
                          for name, kinds in self.kept_kinds.items()])

    def summary(self, input_format: InputFormat, info: pafs.FileInfo, kept: pa.Schema) -> InputSummary:
        return InputSummary(
            input_format=input_format, num_rows=self.num_rows, num_invalid_rows=self.num_invalid_rows,
            input_size=info.size, input_mtime_ns=info.mtime_ns, shard_size=self.spec.shard_size,
            shard_starts=self.shard_starts, duplicate_rows=_later_duplicates(self.id_digests),
            unknown_fields=self.unknown_fields, first_errors=self.first_errors,
            kept_schema=base64.b64encode(kept.serialize().to_pybytes()).decode(),
            max_n=self.max_n, any_logprobs=self.any_logprobs, any_json_output=self.any_json_output)


_KIND_TYPES = {frozenset(): pa.string(), frozenset({"bool"}): pa.bool_(), frozenset({"int"}): pa.int64(),
               frozenset({"float"}): pa.float64(), frozenset({"int", "float"}): pa.float64(),
               frozenset({"str"}): pa.string()}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -2 ** 63 <= value < 2 ** 63 else "json"
    if isinstance(value, float):
        return "float"
    return "str" if isinstance(value, str) else "json"


def _later_duplicates(id_digests: bytearray) -> list[int]:
    """Indices of rows whose id digest an earlier row has (16-byte BLAKE2b: collisions are not a concern)."""
    keys = np.frombuffer(id_digests, dtype="S16")
    order = np.argsort(keys, kind="stable")     # stable: among equal ids the first row comes first
    ordered = keys[order]
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    return sorted(order[repeated].tolist())


def _open_input(spec: JobSpec) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    name = spec.input_display
    try:
        fs, path = filesystem(spec.input)
        info = fs.get_file_info(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise JobInputError(f"{name}: cannot open: {_redacted(exc, spec.input)}") from None
    if info.type == pafs.FileType.NotFound:
        raise JobInputError(f"{name}: no such file")
    if info.type != pafs.FileType.File:
        raise JobInputError(f"{name}: not a file")
    if info.size == 0:
        raise JobInputError(f"{name}: empty file")
    return fs, path, info


def _open_stream(fs: pafs.FileSystem, path: str) -> io.BufferedReader:
    return io.BufferedReader(fs.open_input_file(path), _READ_BUFFER)


def _detect_format(fs: pafs.FileSystem, path: str, spec: JobSpec) -> InputFormat:
    """Parquet by magic bytes or extension; JSONL otherwise, OpenAI batch lines when the first JSON object
    has custom_id, method, url and body."""
    name = spec.input_display
    try:
        with _open_stream(fs, path) as stream:
            if stream.read(4) == b"PAR1" or path.lower().endswith((".parquet", ".pq")):
                return "parquet"
            stream.seek(0)
            for count, (_, _, line) in enumerate(_lines(stream, 0, 1, spec.max_line_bytes), start=1):
                first = _json_object(line)
                if first is not None:
                    return "openai" if OPENAI_LINE_FIELDS <= first.keys() else "jsonl"
                if count == _DETECT_LINES:
                    break
    except OSError as exc:
        raise JobInputError(f"{name}: cannot read: {_redacted(exc, spec.input)}") from None
    if path.lower().endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"      # every row is broken: the survey refuses it, quoting the first errors
    raise JobInputError(f"{name}: unknown format: not Parquet, and none of the first {_DETECT_LINES} lines "
                        "is a JSON object")


def _json_object(line: bytes | None) -> dict | None:
    if line is None:
        return None
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _lines(stream: io.BufferedReader, offset: int, line_no: int, max_line_bytes: int
           ) -> Iterator[tuple[int, int, bytes | None]]:
    """(byte offset, 1-based line number, line) of each non-blank line, read in chunks. A line longer than
    max_line_bytes comes as None: its chunks are dropped as soon as it passes the limit, so memory stays
    under the limit whatever the file holds."""
    while True:
        chunks, size, too_long = [], 0, False
        while True:
            chunk = stream.readline(_READ_BUFFER)
            if not chunk:
                break
            size += len(chunk)
            ended = chunk.endswith(b"\n")
            if not too_long:
                if size - ended > max_line_bytes:
                    too_long, chunks = True, []
                else:
                    chunks.append(chunk)
            if ended:
                break
        if size == 0:
            return
        line = None if too_long else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if line is None or not line.isspace():
            yield offset, line_no, line
        offset += size
        line_no += 1


def _line_row(parser: RowParser, spec: JobSpec, line: bytes | None, index: int, line_no: int) -> PromptRow:
    if line is None:
        return parser.failed(None, index, line_no, None,
                             f"line longer than {spec.max_line_bytes:,} bytes (max_line_bytes); skipped")
    return parser.parse_line(line, index, line_no)


def _open_parquet(fs: pafs.FileSystem, path: str, name: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise JobInputError(f"{name}: not a readable Parquet file (truncated or corrupt?): {exc}") from None


def _parquet_columns(spec: JobSpec, parquet: pq.ParquetFile, parser: RowParser, name: str) -> list[str]:
    """The columns rows use; refuses a file that can't give every row a prompt."""
    schema = parquet.schema_arrow
    available = schema.names
    listing = f"(columns: {', '.join(available)})"
    if spec.template:
        for placeholder in parser.placeholders:
            if placeholder not in available:
                raise JobInputError(f"{name}: template placeholder {{{placeholder}}} is not a column {listing}")
    elif spec.prompt_column in available:
        prompt_type = schema.field(spec.prompt_column).type
        if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)):
            raise JobInputError(f"{name}: prompt column '{spec.prompt_column}' holds {prompt_type}, not text")
    elif spec.messages_column not in available:
        raise JobInputError(f"{name}: no prompt column '{spec.prompt_column}' (nor '{spec.messages_column}') "
                            f"{listing}; name it with --prompt-column or build prompts with --template")
    for kept in spec.keep_columns:
        if kept not in available:
            raise JobInputError(f"{name}: kept column '{kept}' is not a column {listing}")
    return parser.read_columns(available)


def _parquet_rows(parquet: pq.ParquetFile, parser: RowParser, columns: list[str], start: int, end: int,
                  name: str) -> Iterator[PromptRow]:
    groups, first_row, row = [], 0, 0
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if row < end and row + size > start:
            first_row = first_row if groups else row
            groups.append(group)
        row += size
    if not groups:
        return
    index = first_row
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=columns,
                                          use_threads=False):
            low, high = max(start - index, 0), min(end - index, batch.num_rows)
            if low < high:
                for i, raw in enumerate(batch.slice(low, high - low).to_pylist(), start=index + low):
                    yield parser.parse(raw, i, i + 1)
            index += batch.num_rows
            if index >= end:
                return
    except (OSError, pa.ArrowException) as exc:
        raise JobInputError(f"{name}: unreadable Parquet data near row {index + 1}: {exc}") from None


def _redacted(exc: BaseException, location: str) -> str:
    return str(exc).replace(location, redact_url(location))


# ---------------------------------------------------------------------------------------------------------
# output rows

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
    error: str | None = None


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
    summary = spec.input_summary
    if summary is None:
        raise ValueError("spec.input_summary is not set: run validate_input at submit time")

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
    fields.append(("error", pa.string()))
    if spec.output_format == "openai":
        fields.append(("endpoint", pa.string()))
    return pa.schema(fields, metadata={b"batchgen.job_id": spec.job_id.encode()})


def _rows_table(rows: Iterable[OutputRow], schema: pa.Schema) -> pa.Table:
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
        columns["error"].append(row.error)
        if "endpoint" in columns:
            columns["endpoint"].append(row.endpoint)
    return pa.Table.from_pydict(columns, schema=schema)


def _logprob_records(positions: list[TokenLogprobs] | None) -> list[dict] | None:
    if positions is None:
        return None
    return [{"token_id": p.token_id, "logprob": p.logprob,
             "top": [{"token_id": t, "logprob": lp} for t, lp in sorted(p.top.items(), key=lambda kv: -kv[1])]}
            for p in positions]


# ---------------------------------------------------------------------------------------------------------
# writing

def part_path(output: str, shard_index: int) -> str:
    """Where shard `shard_index` of a job writing to `output` lands (in output's filesystem)."""
    return posixpath.join(filesystem(output)[1], PARTS_DIR, f"shard-{shard_index:05d}.parquet")


def write_part(rows: Iterable[OutputRow], output: str, shard_index: int, schema: pa.Schema,
               stats: ShardStats | None = None) -> str:
    """Write one shard's rows as parts/shard-NNNNN.parquet, atomically: a temp file moved into place, so the
    final name never holds a partial part. `stats` rides in the footer metadata. Returns the path."""
    table = _rows_table(rows, schema)
    if stats is not None:
        table = table.replace_schema_metadata({**(schema.metadata or {}),
                                               SHARD_STATS_KEY: stats.model_dump_json().encode()})
    fs, _ = filesystem(output)
    path = part_path(output, shard_index)
    _write_atomic(fs, path, lambda stream: pq.write_table(table, stream, compression="zstd"))
    return path


def part_exists(output: str, shard_index: int) -> bool:
    """A complete part is there. A file whose footer doesn't read (cut short by a crash of the machine) does
    not count, so the shard is run again and the file replaced."""
    fs, _ = filesystem(output)
    path = part_path(output, shard_index)
    try:
        with fs.open_input_file(path) as source:
            pq.read_metadata(source)
    except FileNotFoundError:
        return False
    except (OSError, pa.ArrowException) as exc:
        log.warning("part %s is unreadable (%s); it will be written again", redact_url(path), exc)
        return False
    return True


def list_parts(output: str) -> list[tuple[int, str]]:
    """(shard index, path) of every finished part, in shard order."""
    fs, base = filesystem(output)
    selector = pafs.FileSelector(posixpath.join(base, PARTS_DIR), allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        match = _PART_NAME.match(info.base_name)
        if match and info.type == pafs.FileType.File:
            found.append((int(match.group(1)), info.path))
    return sorted(found)


def remove_temp_files(output: str) -> int:
    """Delete temp files that writers killed mid-write left in parts/ (call when finalizing); returns how
    many. They are never mistaken for parts, so this only reclaims space."""
    fs, base = filesystem(output)
    selector = pafs.FileSelector(posixpath.join(base, PARTS_DIR), allow_not_found=True)
    temps = [info.path for info in fs.get_file_info(selector)
             if info.base_name.startswith(".") and info.base_name.endswith(_TEMP_SUFFIX)]
    for path in temps:
        fs.delete_file(path)
    return len(temps)


def read_output(output: str) -> pa.Table:
    """Every finished part as one table, rows in input order."""
    fs, _ = filesystem(output)
    parts = list_parts(output)
    if not parts:
        raise JobOutputError(f"{redact_url(output)}: no output parts yet")
    tables = []
    for _, path in parts:
        with fs.open_input_file(path) as source:
            tables.append(pq.read_table(source))
    return pa.concat_tables(tables)


def read_shard_stats(output: str) -> list[ShardStats]:
    """The ShardStats stored in each finished part's footer, in shard order."""
    fs, _ = filesystem(output)
    stats = []
    for _, path in list_parts(output):
        with fs.open_input_file(path) as source:
            metadata = pq.read_schema(source).metadata or {}
        if SHARD_STATS_KEY in metadata:
            stats.append(ShardStats.model_validate_json(metadata[SHARD_STATS_KEY]))
    return stats


def write_openai_output(spec: JobSpec, created: datetime | None = None) -> str:
    """results.jsonl in the OpenAI Batch API output shape, one line per row in input order, streamed part
    by part. Row errors come as status_code 400 responses. Logprobs are left out (the Batch shape wants
    token strings). Returns the path."""
    fs, base = filesystem(spec.output)
    timestamp = int((created or datetime.now(timezone.utc)).timestamp())
    parts = list_parts(spec.output)

    def write(stream: pa.NativeFile) -> None:
        index = 0
        for _, path in parts:
            with fs.open_input_file(path) as source:
                batches = pq.ParquetFile(source).iter_batches(
                    batch_size=_PARQUET_BATCH_ROWS, columns=["id", "text", "finish_reason", "prompt_tokens",
                                                             "completion_tokens", "error", "endpoint"])
                for batch in batches:
                    lines = []
                    for record in batch.to_pylist():
                        lines.append(json.dumps(_openai_line(spec, record, index, timestamp), ensure_ascii=False))
                        index += 1
                    stream.write(("\n".join(lines) + "\n").encode())

    path = posixpath.join(base, OPENAI_OUTPUT_FILE)
    _write_atomic(fs, path, write)
    return path


def _openai_line(spec: JobSpec, record: dict[str, Any], index: int, created: int) -> dict[str, Any]:
    request_id = f"{spec.job_id}-{index}"
    if record["error"] is not None:
        body: dict[str, Any] = {"error": {"message": record["error"], "type": "invalid_request_error",
                                          "param": None, "code": None}}
        return {"id": f"batch_req_{request_id}", "custom_id": record["id"],
                "response": {"status_code": 400, "request_id": request_id, "body": body}, "error": None}
    texts, reasons = record["text"], record["finish_reason"]
    if not isinstance(texts, list):
        texts, reasons = [texts], [reasons]
    chat = record["endpoint"] == "chat"
    choices = [{"index": i, **({"message": {"role": "assistant", "content": text}} if chat else {"text": text}),
                "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))]
    usage = {"prompt_tokens": record["prompt_tokens"], "completion_tokens": record["completion_tokens"],
             "total_tokens": record["prompt_tokens"] + record["completion_tokens"]}
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion" if chat else "text_completion", "created": created, "model": spec.model,
            "choices": choices, "usage": usage}
    return {"id": f"batch_req_{request_id}", "custom_id": record["id"],
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def save_spec(spec: JobSpec) -> str:
    """job.json in the output directory (atomically), input and output without credentials; returns its path."""
    shown = spec.model_copy(update={"input": spec.input_display, "output": spec.output_display})
    return _write_text(spec.output, SPEC_FILE, shown.model_dump_json(indent=2))


def load_spec(output: str) -> JobSpec:
    return JobSpec.model_validate_json(_read_text(output, SPEC_FILE))


def save_stats(output: str, stats: JobStats) -> str:
    """stats.json in the output directory (atomically); returns its path."""
    return _write_text(output, STATS_FILE, stats.model_dump_json(indent=2))


def load_stats(output: str) -> JobStats:
    return JobStats.model_validate_json(_read_text(output, STATS_FILE))


def _write_text(output: str, name: str, text: str) -> str:
    fs, base = filesystem(output)
    path = posixpath.join(base, name)
    _write_atomic(fs, path, lambda stream: stream.write(text.encode()))
    return path


def _read_text(output: str, name: str) -> str:
    fs, base = filesystem(output)
    try:
        with fs.open_input_stream(posixpath.join(base, name)) as source:
            return source.read().decode()
    except FileNotFoundError:
        raise JobOutputError(f"{redact_url(output)}: no {name}") from None


def _write_atomic(fs: pafs.FileSystem, path: str, write: Callable[[pa.NativeFile], Any]) -> None:
    """Write to a hidden temp name beside `path`, then move it over `path`: a rename on local disks, so
    readers see the old file or the whole new one, never a partial one. A failure (disk full, no
    permission) removes the temp file and raises JobOutputError naming the file."""
    directory, name = posixpath.split(path)
    temp = posixpath.join(directory, f".{name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        fs.create_dir(directory, recursive=True)
        with fs.open_output_stream(temp) as stream:
            write(stream)
        fs.move(temp, path)
    except BaseException as exc:
        try:
            fs.delete_file(temp)
        except (OSError, pa.ArrowException):
            pass
        if isinstance(exc, (OSError, pa.ArrowException)) and not isinstance(exc, JobOutputError):
            # in-filesystem paths carry no credentials (from_uri takes them out)
            raise JobOutputError(f"cannot write {path}: {exc}") from None
        raise
