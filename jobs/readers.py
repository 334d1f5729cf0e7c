"""Input files -> PromptRows, streaming, through pyarrow filesystems (local paths or URIs).

JSONL (OpenAI batch lines included) is read line by line as bytes, so a bad line is that row's error; Parquet
by record batches. `validate_input` makes the single submit-time pass that counts rows, records where each
shard starts, and finds duplicate ids; `read_rows` then reads one shard without re-scanning.
"""
import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen.jobs.errors import JobInputError
from batchgen.jobs.paths import check_roots, filesystem, redact_url
from batchgen.jobs.rows import OPENAI_LINE_FIELDS, PromptRow, RowParser
from batchgen.jobs.spec import InputFormat, InputSummary, JobSpec

log = logging.getLogger("batchgen.jobs")

_READ_BUFFER = 1 << 20
_PARQUET_BATCH_ROWS = 1024     # rows decoded at a time; bounds memory for long-text columns
_DETECT_LINES = 64             # lines looked at to tell plain JSONL from OpenAI batch lines
_FIRST_ERRORS = 10


def validate_input(spec: JobSpec) -> InputSummary:
    """Check the input at submit time and survey it in one streaming pass (flat memory, plus 16 bytes per
    row to find duplicate ids). Raises JobInputError for whole-file problems; row problems are counted and
    a few reported in `first_errors`. Store the result as `spec.input_summary` before planning shards."""
    check_roots(spec)
    fs, path, info = _open_input(spec)
    input_format = spec.input_format or _detect_format(fs, path, spec)
    name = spec.input_display
    try:
        spec.check_input_format(input_format)
    except ValueError as exc:
        raise JobInputError(f"{name}: {exc}") from None
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


def input_report(spec: JobSpec) -> list[str]:
    """What validation found in a job's input, for the person who submitted it: rows, shards, how many rows
    will carry an error, and the first few of those errors."""
    summary = spec.summary
    note = f"{spec.input_display}: {summary.num_rows:,} rows ({summary.input_format}), {spec.num_shards:,} shard(s)"
    if summary.num_invalid_rows or summary.duplicate_rows:
        note += (f"; {summary.num_invalid_rows:,} invalid and {len(summary.duplicate_rows):,} duplicate-id rows "
                 "will carry an error")
    return [note, *(f"  {error}" for error in summary.first_errors[:3])]


def read_rows(spec: JobSpec, start: int, end: int) -> Iterator[PromptRow]:
    """Parsed rows [start, end) (`spec.shard_rows(i)`) in input order. JSONL seeks to the nearest shard start
    recorded by validate_input; Parquet decodes only the row groups that hold the range. Raises JobInputError
    if the file changed since validation (the shard plan would no longer match it)."""
    summary = spec.summary
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
        self.max_n, self.any_logprobs, self.any_json_output, self.any_scoring = 1, False, False, False
        self.row_sampling: dict[str, int] = {}

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
        for name in row.sampling_fields:
            self.row_sampling[name] = self.row_sampling.get(name, 0) + 1
        self.any_scoring |= params.prompt_logprobs is not None
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
            max_n=self.max_n, any_logprobs=self.any_logprobs, any_json_output=self.any_json_output,
            any_scoring=self.any_scoring, row_sampling=self.row_sampling)


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
