"""A job's output directory: its layout, written atomically, and read back.

    parts/shard-00042.parquet   one per shard, written to a temp name then moved into place, so a part that
                                exists is complete; its footer metadata carries the shard's ShardStats
    .batchgen/job.json          the JobSpec (input summary included)
    .batchgen/stats.json        JobStats, once the job completed
    .batchgen/results.jsonl     only with output_format "openai": OpenAI Batch API output lines

The metadata sits in a dot-folder because every dataset reader skips one (pyarrow and pandas skip names
that start with `_` or `.`, HF datasets skips dot-files, DuckDB's `out/**/*.parquet` matches only parts): the
directory reads as one Parquet dataset. Outputs written before kept job.json and stats.json at the top; the
readers here accept them too.
"""
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen.jobs.errors import JobOutputError
from batchgen.jobs.output_rows import OutputRow, rows_table
from batchgen.jobs.paths import check_roots, filesystem, redact_url
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.stats import JobStats, ShardStats

log = logging.getLogger("batchgen.jobs")

PARTS_DIR = "parts"
METADATA_DIR = ".batchgen"
SPEC_FILE = "job.json"
STATS_FILE = "stats.json"
OPENAI_OUTPUT_FILE = "results.jsonl"
SHARD_STATS_KEY = b"batchgen.shard_stats"
_PART_NAME = re.compile(r"^shard-(\d+)\.parquet$")
_TEMP_SUFFIX = ".tmp"
_OPENAI_BATCH_ROWS = 1024      # rows of a part in memory at a time while writing results.jsonl


def prepare_output(spec: JobSpec, replace: bool = False) -> None:
    """Make sure the job's output directory holds no other job's files, since an existing part would be
    taken for one of this job's finished shards. `replace` deletes batchgen's own files left by an earlier
    run (.batchgen/, parts/, and the metadata files older outputs kept at the top); otherwise their presence
    is an error. An output outside BATCHGEN_OUTPUT_ROOT is refused (see `check_roots`)."""
    check_roots(spec)
    fs, base = filesystem(spec.output)
    ours = [posixpath.join(base, name) for name in (PARTS_DIR, METADATA_DIR, SPEC_FILE, STATS_FILE,
                                                       OPENAI_OUTPUT_FILE)]
    found = [info for info in fs.get_file_info(ours) if info.type != pafs.FileType.NotFound]
    if not found:
        return
    if not replace:
        raise JobOutputError(f"{spec.output_display}: already holds a job's output ({found[0].base_name}); "
                             "choose another output directory or remove it")
    for info in found:
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


def part_path(output: str, shard_index: int) -> str:
    """Where shard `shard_index` of a job writing to `output` lands (in output's filesystem)."""
    return posixpath.join(filesystem(output)[1], PARTS_DIR, f"shard-{shard_index:05d}.parquet")


def write_part(rows: Iterable[OutputRow], output: str, shard_index: int, schema: pa.Schema,
               stats: ShardStats | None = None) -> str:
    """Write one shard's rows as parts/shard-NNNNN.parquet, atomically: a temp file moved into place, so the
    final name never holds a partial part. `stats` rides in the footer metadata. Returns the path."""
    table = rows_table(rows, schema)
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


def read_shard_stats(output: str) -> list[ShardStats]:
    """The ShardStats stored in each finished part's footer, in shard order."""
    fs, _ = filesystem(output)
    return [stats for _, path in list_parts(output) if (stats := _footer_stats(fs, path)) is not None]


def part_stats(output: str, shard_index: int) -> ShardStats | None:
    """The ShardStats in one part's footer (None for a part written without them)."""
    return _footer_stats(filesystem(output)[0], part_path(output, shard_index))


def _footer_stats(fs: pafs.FileSystem, path: str) -> ShardStats | None:
    with fs.open_input_file(path) as source:
        raw = (pq.read_schema(source).metadata or {}).get(SHARD_STATS_KEY)
    return ShardStats.model_validate_json(raw) if raw else None


def write_openai_output(spec: JobSpec, created: datetime | None = None) -> str:
    """.batchgen/results.jsonl in the OpenAI Batch API output shape, one line per row in input order, streamed part
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
                    batch_size=_OPENAI_BATCH_ROWS, columns=["id", "text", "finish_reason", "prompt_tokens",
                                                             "completion_tokens", "error", "endpoint"])
                for batch in batches:
                    lines = []
                    for record in batch.to_pylist():
                        lines.append(json.dumps(_openai_line(spec, record, index, timestamp), ensure_ascii=False))
                        index += 1
                    stream.write(("\n".join(lines) + "\n").encode())

    path = posixpath.join(base, METADATA_DIR, OPENAI_OUTPUT_FILE)
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
    """.batchgen/job.json in the output directory (atomically), input and output without credentials; returns
    its path."""
    shown = spec.model_copy(update={"input": spec.input_display, "output": spec.output_display})
    return _write_text(spec.output, SPEC_FILE, shown.model_dump_json(indent=2))


def load_spec(output: str) -> JobSpec:
    """The job.json of an output directory (either layout)."""
    return JobSpec.model_validate_json(_read_text(output, SPEC_FILE))


def save_stats(output: str, stats: JobStats) -> str:
    """.batchgen/stats.json in the output directory (atomically); returns its path."""
    return _write_text(output, STATS_FILE, stats.model_dump_json(indent=2))


def load_stats(output: str) -> JobStats:
    """The stats.json of an output directory (either layout); JobOutputError while the job hasn't finished."""
    return JobStats.model_validate_json(_read_text(output, STATS_FILE))


def _write_text(output: str, name: str, text: str) -> str:
    fs, base = filesystem(output)
    path = posixpath.join(base, METADATA_DIR, name)
    _write_atomic(fs, path, lambda stream: stream.write(text.encode()))
    return path


def _read_text(output: str, name: str) -> str:
    """A metadata file from .batchgen/, or from the top of the directory where older outputs kept it."""
    fs, base = filesystem(output)
    for path in (posixpath.join(base, METADATA_DIR, name), posixpath.join(base, name)):
        try:
            with fs.open_input_stream(path) as source:
                return source.read().decode()
        except FileNotFoundError:
            continue
    raise JobOutputError(f"{redact_url(output)}: no {name}")


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
