"""Batches of the Batch API: one batchgen job each, whose id is the batch id.

A batch's life, as OpenAI's client sees it:
  validating   the file is read once: every line a JSON object for the batch's endpoint, naming one model
               that is served; then the job is submitted as the CLI submits one (validate, register, enqueue)
  in_progress  the job's shards run on the workers
  finalizing   the last shard finalizes the job, then its rows are split into the output file (status 200)
               and the error file (the rest)
  completed    (or failed: the file was refused, or the job failed)
  cancelling   a cancel stopped the job; shards still running stop at their next engine step
  cancelled / expired   the rows finished so far are in the output file, the others in the error file
A batch not finished `COMPLETION_WINDOW_S` after creation is stopped and ends expired. Every status change
is worked out from the job store when a batch is read (and by the server's refresh loop): nothing runs a
batch but the workers.
"""
import io
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field

from batchgen.api.files import FileObject, FileStore, storage_location
from batchgen.api.settings import ApiSettings
from batchgen.jobs.errors import JobInputError, JobOutputError
from batchgen.jobs.output_dir import list_parts, write_openai_output
from batchgen.jobs.paths import filesystem
from batchgen.jobs.readers import input_report, read_rows
from batchgen.jobs.rows import OPENAI_ENDPOINTS
from batchgen.jobs.spec import DEFAULT_MAX_LINE_BYTES, JobSpec
from batchgen.jobs.store import JobRecord, JobStore

log = logging.getLogger("batchgen.api")

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
FINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
COMPLETION_WINDOW = "24h"
COMPLETION_WINDOW_S = 24 * 3600
MAX_LISTED_ERRORS = 100
FINISH_CLAIM_S = 600               # a server that died while writing a batch's files leaves it to another after this
VALIDATION_CLAIM_S = 600           # ... or while validating one


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Usage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int = 0
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int = 0


class BatchObject(BaseModel):
    """OpenAI's batch object, as its client parses it."""
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = COMPLETION_WINDOW
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, str] | None = None
    model: str | None = None


class BatchRefused(ValueError):
    """A create or cancel request that can't be honoured (OpenAI answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Batches:
    """Every tenant's batches. The Redis hash of a batch holds its tenant, its object (`record`) and, once
    asked for, why it stops (`stop`: cancelled or expired, the first reason wins) and when."""

    def __init__(self, settings: ApiSettings, files: FileStore, store: JobStore, served_models: Callable[[], set[str]],
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.files = files
        self.store = store
        self.redis = files.redis
        self.prefix = files.prefix
        self.served_models = served_models
        self.clock = clock

    # -- requests ---------------------------------------------------------------------------------------
    def create(self, tenant: str, cache_salt: str, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict[str, str] | None) -> BatchObject:
        """Register a batch as validating; `validate_and_submit` does the rest (off the request). Its job will
        run with `cache_salt`, its tenant's prefix-cache salt."""
        if endpoint not in OPENAI_ENDPOINTS:
            raise BatchRefused(f"endpoint must be one of {sorted(OPENAI_ENDPOINTS)}, got {endpoint!r}", "endpoint")
        if completion_window != COMPLETION_WINDOW:
            raise BatchRefused(f"completion_window must be {COMPLETION_WINDOW!r}", "completion_window")
        source = self.files.get(tenant, input_file_id)
        if source is None:
            raise BatchRefused(f"no file with id {input_file_id!r}", "input_file_id")
        if source.purpose != "batch":
            raise BatchRefused(f"file {input_file_id} has purpose {source.purpose!r}, not 'batch'", "input_file_id")
        now = int(self.clock())
        batch = BatchObject(id="batch_" + secrets.token_hex(12), endpoint=endpoint, input_file_id=input_file_id,
                            created_at=now, expires_at=now + COMPLETION_WINDOW_S, metadata=metadata)
        self.redis.hset(self._key(batch.id), mapping={"tenant": tenant, "cache_salt": cache_salt,
                                                      "record": batch.model_dump_json()})
        self.redis.zadd(self._index(tenant), {batch.id: self.redis.incr(f"{self.prefix}:sequence")})
        self.redis.sadd(self._open_set(), batch.id)
        return batch

    def get(self, tenant: str, batch_id: str) -> BatchObject | None:
        """The tenant's batch brought up to date, or None (unknown, or another tenant's)."""
        if self.redis.hget(self._key(batch_id), "tenant") != tenant:
            return None
        return self.refresh(batch_id)

    def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[BatchObject], bool]:
        """Newest first, starting after the id `after`; and whether more follow."""
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(self._index(tenant), after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = self.redis.zrevrange(self._index(tenant), start, start + limit)
        batches = [batch for batch_id in ids[:limit] if (batch := self.refresh(batch_id)) is not None]
        return batches, len(ids) > limit

    def cancel(self, tenant: str, batch_id: str) -> BatchObject | None:
        batch = self.get(tenant, batch_id)
        if batch is None:
            return None
        if batch.status in FINAL_STATUSES:
            raise BatchRefused(f"batch {batch_id} is {batch.status}; it can't be cancelled")
        self._stop(batch_id, "cancelled")
        return self.refresh(batch_id)

    def open_batch_ids(self) -> list[str]:
        return sorted(self.redis.smembers(self._open_set()))

    # -- validation and submission ----------------------------------------------------------------------
    def validate_and_submit(self, batch_id: str) -> None:
        """Read a validating batch's file once, then submit its job; the batch ends failed with the lines at
        fault when the file can't be run. Called after the create request is answered, and by the refresh
        loop for batches still validating: a claim in Redis lets one caller at a time do it, and expires, so
        a batch whose server stopped mid-validation is taken up by another."""
        if not self.redis.set(self._key(batch_id) + ":validating", "1", nx=True, ex=VALIDATION_CLAIM_S):
            return
        batch = self._record(batch_id)
        if batch is None or batch.status != "validating":
            return
        try:
            self._validate_and_submit(batch)
        except Exception:
            log.exception("batch %s: validation failed unexpectedly", batch_id)
            self.fail(batch_id, [BatchError(code="internal_error", message="the server could not validate the file")])

    def _validate_and_submit(self, batch: BatchObject) -> None:
        from batchgen.workers.submit import submit_job

        stop, cache_salt = self.redis.hmget(self._key(batch.id), ["stop", "cache_salt"])
        if stop is not None:                # cancelled before it was validated: nothing ran
            self._save_final(batch, stop, RequestCounts(), Usage())
            return
        aliases = self.settings.model_aliases
        served = self.served_models() | set(self.settings.models)
        names = served | {alias for alias, model in aliases.items() if model in served}
        model, num_lines, errors = scan_batch_file(self.files.fs, self.files.content_path(batch.input_file_id),
                                                   batch.endpoint, names, self.settings.max_requests)
        if not errors and self.store.get_job(batch.id) is None:   # else a server that stopped had submitted it
            spec = JobSpec(job_id=batch.id, input=self.files.location(batch.input_file_id), input_format="openai",
                           model=aliases.get(model, model), output=storage_location(self.files.storage, "batches",
                                                                                    batch.id),
                           output_format="openai", shard_size=self.settings.shard_size, cache_salt=cache_salt)
            try:
                submit_job(spec, self.store)
                log.info("batch %s: %s", batch.id, "; ".join(input_report(spec)))
            except (JobInputError, JobOutputError) as exc:
                errors = [BatchError(code="invalid_file", message=str(exc).replace(spec.input, batch.input_file_id))]
        update = {"model": model, "request_counts": RequestCounts(total=num_lines)}
        if errors:
            self.fail(batch.id, errors, **update)
            return
        self._save(batch.model_copy(update={"status": "in_progress", "in_progress_at": int(self.clock()), **update}))

    def fail(self, batch_id: str, errors: list["BatchError"], **update: Any) -> None:
        """End a batch that never ran as failed, saying why."""
        batch = self._record(batch_id)
        if batch is not None and batch.status not in FINAL_STATUSES:
            self._save(batch.model_copy(update={"status": "failed", "failed_at": int(self.clock()),
                                                "errors": BatchErrors(data=errors), **update}), final=True)

    # -- the batch's state, worked out from its job -------------------------------------------------------
    def refresh(self, batch_id: str) -> BatchObject | None:
        """The batch as it stands now; moves it on (expiry, stop, files) when its job has."""
        batch = self._record(batch_id)
        if batch is None or batch.status in FINAL_STATUSES or batch.status == "validating":
            return batch
        now = int(self.clock())
        if now >= batch.expires_at:
            self._stop(batch_id, "expired")
        stop, stop_at = self.redis.hmget(self._key(batch_id), ["stop", "stop_at"])
        job = self.store.get_job(batch_id)
        if job is None:
            return batch
        if stop is not None and not job.finished:
            self.store.cancel_job(batch_id)
            job = self.store.get_job(batch_id)
        counts, usage = _progress(job)
        update: dict[str, Any] = {"request_counts": counts, "usage": usage}
        if not job.finished:
            update["status"] = "finalizing" if job.finalize_claimed else "in_progress"
            if job.finalize_claimed and batch.finalizing_at is None:
                update["finalizing_at"] = now
            return self._save_if_changed(batch, update)
        end = _end_status(job, stop)
        if end in ("cancelled", "expired") and any(w.job_id == batch_id for w in self.store.live_workers()):
            # a worker is still stopping one of its shards; the part it may yet write belongs in the output
            update["status"] = "cancelling" if end == "cancelled" else "finalizing"
            update["cancelling_at" if end == "cancelled" else "finalizing_at"] = int(stop_at or now)
            return self._save_if_changed(batch, update)
        # one caller writes the files; the claim stays until it expires, and the batch is read again under
        # it, so a caller that read the batch before another finished it can't write them twice
        if not self.redis.set(self._key(batch_id) + ":finishing", "1", nx=True, ex=FINISH_CLAIM_S):
            return batch.model_copy(update={**update, "status": "finalizing"})
        batch = self._record(batch_id)
        if batch.status in FINAL_STATUSES:
            return batch
        return self._finish(batch, job, end, stop_at, counts, usage)

    def _finish(self, batch: BatchObject, job: JobRecord, end: str, stop_at: str | None, counts: RequestCounts,
                usage: Usage) -> BatchObject:
        """Split the job's rows into the output and error files, once, and end the batch."""
        tenant = self.redis.hget(self._key(batch.id), "tenant")
        spec = self.store.get_spec(batch.id)
        usage.input_tokens_details["cached_tokens"] = sum(
            shard.stats.cached_tokens for shard in self.store.shard_records(batch.id) if shard.stats)
        output, errors = self._result_files(tenant, spec, "batch_expired" if end == "expired" else "batch_cancelled")
        now = int(self.clock())
        update: dict[str, Any] = {"status": end, f"{end}_at": now, "finalizing_at": batch.finalizing_at or now,
                                  "output_file_id": output.id if output else None,
                                  "error_file_id": errors.id if errors else None}
        if end == "cancelled":
            update["cancelling_at"] = batch.cancelling_at or int(stop_at or now)
        if end == "failed":
            update["errors"] = BatchErrors(data=[BatchError(code="job_failed", message=job.error or "the job failed")])
        return self._save_final(batch.model_copy(update=update), end, counts, usage)

    def _result_files(self, tenant: str, spec: JobSpec, unfinished_code: str
                      ) -> tuple[FileObject | None, FileObject | None]:
        """The output file (rows answered 200) and the error file (rows that failed, then the rows that never
        ran because the batch stopped first), both from the job's finished parts."""
        results_path = write_openai_output(spec)
        fs, _ = filesystem(spec.output)

        def lines(ok: bool) -> Iterator[bytes]:
            with io.BufferedReader(fs.open_input_file(results_path)) as results:
                for line in results:
                    if (json.loads(line)["response"]["status_code"] == 200) == ok:
                        yield line
            if not ok:
                yield from _unfinished_lines(spec, unfinished_code)

        output = self.files.write_lines(tenant, lines(True), f"{spec.job_id}_output.jsonl")
        errors = self.files.write_lines(tenant, lines(False), f"{spec.job_id}_error.jsonl")
        return output, errors

    # -- storage ----------------------------------------------------------------------------------------
    def _stop(self, batch_id: str, reason: Literal["cancelled", "expired"]) -> None:
        if self.redis.hsetnx(self._key(batch_id), "stop", reason):
            self.redis.hset(self._key(batch_id), "stop_at", str(int(self.clock())))

    def _record(self, batch_id: str) -> BatchObject | None:
        raw = self.redis.hget(self._key(batch_id), "record")
        return BatchObject.model_validate_json(raw) if raw else None

    def _save_if_changed(self, batch: BatchObject, update: dict[str, Any]) -> BatchObject:
        updated = batch.model_copy(update=update)
        if updated != batch:
            self._save(updated)
        return updated

    def _save_final(self, batch: BatchObject, status: str, counts: RequestCounts, usage: Usage) -> BatchObject:
        now = int(self.clock())
        final = batch.model_copy(update={"status": status, "request_counts": counts, "usage": usage,
                                         f"{status}_at": getattr(batch, f"{status}_at") or now})
        self._save(final, final=True)
        return final

    def _save(self, batch: BatchObject, final: bool = False) -> None:
        self.redis.hset(self._key(batch.id), "record", batch.model_dump_json())
        if final:
            self.redis.srem(self._open_set(), batch.id)

    def _key(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.prefix}:batches:{tenant}"

    def _open_set(self) -> str:
        return f"{self.prefix}:open-batches"


def scan_batch_file(fs, path: str, endpoint: str, served: set[str], max_requests: int
                    ) -> tuple[str | None, int, list[BatchError]]:
    """(the model the file names, its number of requests, what is wrong with it, by line). Each line must be a
    JSON object whose url is the batch's endpoint and whose body names a served model, the same on every
    line. What else a line may get wrong (a missing custom_id, a bad parameter) is that row's error in the
    error file, as batchgen's row parser reports it."""
    model, count, errors = None, 0, []

    def error(code: str, message: str, line: int, param: str | None = None) -> None:
        if len(errors) < MAX_LISTED_ERRORS:
            errors.append(BatchError(code=code, message=message, param=param, line=line))

    with io.BufferedReader(fs.open_input_file(path)) as stream:
        for line_no, line in _lines(stream, DEFAULT_MAX_LINE_BYTES):
            count += 1
            if count > max_requests:
                error("too_many_requests", f"the file has more than {max_requests:,} requests "
                                           "(BATCHGEN_API_MAX_REQUESTS)", line_no)
                break
            try:
                request = json.loads(line) if line is not None else None
            except (ValueError, RecursionError):
                request = None
            if not isinstance(request, dict):
                error("invalid_json_line", "this line is not a JSON object" if line is not None else
                      f"this line is longer than {DEFAULT_MAX_LINE_BYTES:,} bytes", line_no)
                continue
            if request.get("url") != endpoint:
                error("mismatched_endpoint", f"the url {request.get('url')!r} is not the batch's endpoint "
                                             f"{endpoint!r}", line_no, "url")
            body = request.get("body")
            named = body.get("model") if isinstance(body, dict) else None
            if not isinstance(named, str):
                error("missing_model", "the body names no model", line_no, "body.model")
            elif named not in served:
                error("model_not_found", f"model {named!r} is not served here (served: {sorted(served)})",
                      line_no, "body.model")
            elif model is None:
                model = named
            elif named != model:
                error("mismatched_model", f"model {named!r} differs from {model!r} on earlier lines: a batch "
                                          "file names one model", line_no, "body.model")
    if count == 0:
        error("empty_file", "the file holds no requests", 1)
    return model, count, errors


def _lines(stream: io.BufferedReader, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line) of each non-blank line; a line longer than `limit` comes as None, read
    past in pieces rather than held."""
    line_no = 0
    while line := stream.readline(limit + 1):
        line_no += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass
            yield line_no, None
        elif line.strip():
            yield line_no, line


def _unfinished_lines(spec: JobSpec, code: str) -> Iterator[bytes]:
    """Error lines for the rows of the shards that never finished."""
    done = {shard_index for shard_index, _ in list_parts(spec.output)}
    message = ("the batch expired before this request ran" if code == "batch_expired"
               else "the batch was cancelled before this request ran")
    for shard_index in range(spec.num_shards):
        if shard_index in done:
            continue
        for row in read_rows(spec, *spec.shard_rows(shard_index)):
            line = {"id": f"batch_req_{spec.job_id}-{row.index}", "custom_id": row.id, "response": None,
                    "error": {"code": code, "message": message}}
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()


def _progress(job: JobRecord) -> tuple[RequestCounts, Usage]:
    counts = RequestCounts(total=job.rows_total, completed=job.rows_done - job.rows_failed, failed=job.rows_failed)
    usage = Usage(input_tokens=job.prompt_tokens, output_tokens=job.completion_tokens,
                  total_tokens=job.prompt_tokens + job.completion_tokens)
    return counts, usage


def _end_status(job: JobRecord, stop: str | None) -> str:
    if job.status == "cancelled":
        return stop or "cancelled"          # also a job cancelled from the CLI
    return job.status                       # completed or failed
