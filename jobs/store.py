"""Job registry: status, counters, per-shard records, cancel flags, worker heartbeats.

`RedisJobStore` is what the service runs on (the CLI and every worker see one state); `MemoryJobStore` is
its in-process twin for the local `batchgen run`. Both supply the same few storage primitives; every rule
(which status changes are allowed, when a shard counts, who finalizes) is written once, in `JobStore`, as
a change computed from the current state and applied atomically (Redis: WATCH/MULTI; memory: a lock).
"""
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import redis
from pydantic import BaseModel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from batchgen.jobs.paths import redact_url
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.stats import ShardStats

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "batchgen"            # namespace of every Redis key: <prefix>:job:<id>, ...
_COUNTERS = ("shards_total", "shards_done", "rows_total", "rows_done", "rows_failed", "prompt_tokens",
             "completion_tokens")


class JobRecord(BaseModel):
    """A job as `status` / `list` show it. Input and output have any credentials taken out."""
    job_id: str
    status: JobStatus
    model: str
    input: str
    output: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None          # last shard started or finished: a stall shows here
    error: str | None = None
    shards_total: int = 0
    shards_done: int = 0
    rows_total: int = 0
    rows_done: int = 0                          # ok + failed
    rows_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancel_requested: bool = False
    finalize_claimed: bool = False

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def rates(self) -> "JobRates | None":
        """Rows/s and output tokens/s since the job started (to its end, or to now), and the seconds left at
        that pace; None before it starts. What `batchgen wait` and the dashboard show."""
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(timezone.utc)
        elapsed = max((end - self.started_at).total_seconds(), 1e-9)
        rows_per_s = self.rows_done / elapsed
        eta_s = (self.rows_total - self.rows_done) / rows_per_s if not self.finished and rows_per_s > 0 else None
        return JobRates(rows_per_s, self.completion_tokens / elapsed, eta_s)


@dataclass(frozen=True)
class JobRates:
    rows_per_s: float
    tokens_per_s: float
    eta_s: float | None


class ShardRecord(BaseModel):
    shard_index: int
    # requeued: its worker or its message was lost, a new message is on the queue
    state: Literal["running", "requeued", "done"]
    worker: str | None = None
    attempts: int = 0                           # times a worker started it (redeliveries show as > 1)
    started_at: datetime | None = None
    requeued_at: datetime | None = None         # tells one requeue from the next, so each has one winner
    finished_at: datetime | None = None
    stats: ShardStats | None = None


class WorkerInfo(BaseModel):
    """What a worker says about itself on each heartbeat."""
    worker_id: str
    host: str
    pid: int | None = None
    gpu: str | None = None
    model: str | None = None
    job_id: str | None = None                   # what it is running now, if anything
    shard_index: int | None = None
    started_at: datetime | None = None          # process start: a restarted worker keeps its id (host:pid)
    seen_at: datetime | None = None             # set by heartbeat()


@dataclass
class _Change:
    """What one atomic update does: its return value, job fields to set / increment, the shard's new record."""
    result: Any
    set_job: dict[str, str] = field(default_factory=dict)
    incr_job: dict[str, int] = field(default_factory=dict)
    shard: str | None = None


_ChangeFn = Callable[[dict[str, str], str | None], _Change]


class JobStore:
    """The registry's interface and rules. Subclasses implement the storage primitives at the bottom."""

    # -- jobs ------------------------------------------------------------------------------------------
    def create_job(self, spec: JobSpec) -> bool:
        """Register a validated job as queued (False if the id is taken)."""
        summary = spec.summary
        fields = {"status": "queued", "model": spec.model, "input": spec.input_display,
                  "output": spec.output_display, "created_at": spec.created_at.isoformat(),
                  "started_at": "", "finished_at": "", "updated_at": "", "error": "", "cancel": "0",
                  "finalize_claimed": "0", **{name: "0" for name in _COUNTERS},
                  "shards_total": str(spec.num_shards), "rows_total": str(summary.num_rows)}
        return self._create(spec.job_id, fields, spec.model_dump_json(), spec.created_at.timestamp())

    def get_job(self, job_id: str) -> JobRecord | None:
        fields = self._job_fields(job_id)
        return _job_record(job_id, fields) if fields else None

    def get_spec(self, job_id: str) -> JobSpec | None:
        text = self._spec_json(job_id)
        return JobSpec.model_validate_json(text) if text else None

    def list_jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        return [record for job_id in self._job_ids() if (record := self.get_job(job_id))]

    def is_cancelled(self, job_id: str) -> bool:
        """Cheap enough to ask between engine steps."""
        return self._job_fields(job_id).get("cancel") == "1"

    def cancel_job(self, job_id: str) -> bool:
        """Cancel a job that hasn't finished: queued shards won't start, running ones stop at their next
        check, finished parts stay. False if the job is unknown or already finished."""
        def change(job: dict[str, str], _: str | None) -> _Change:
            if not job or job["status"] in TERMINAL_STATUSES:
                return _Change(False)
            return _Change(True, {"status": "cancelled", "cancel": "1", "finished_at": _now()})
        return self._transact(job_id, None, change)

    def finish_job(self, job_id: str, status: Literal["completed", "failed"], error: str | None = None) -> bool:
        """Completed (after finalizing) or failed (a whole-job error). Only a job that hasn't finished
        changes; False otherwise."""
        def change(job: dict[str, str], _: str | None) -> _Change:
            if not job or job["status"] in TERMINAL_STATUSES:
                return _Change(False)
            return _Change(True, {"status": status, "error": error or "", "finished_at": _now()})
        return self._transact(job_id, None, change)

    def resume_job(self, job_id: str) -> bool:
        """Put a failed or cancelled job back in the queue; done shards stay done (re-enqueue the others).
        False if it is unknown, still going, or completed."""
        def change(job: dict[str, str], _: str | None) -> _Change:
            if not job or job["status"] not in ("failed", "cancelled"):
                return _Change(False)
            return _Change(True, {"status": "queued", "cancel": "0", "finalize_claimed": "0", "error": "",
                                  "finished_at": ""})
        return self._transact(job_id, None, change)

    # -- shards ----------------------------------------------------------------------------------------
    def start_shard(self, job_id: str, shard_index: int, worker: str) -> int | None:
        """A worker takes a shard: returns the attempt number (1 the first time), or None when it must not
        run (job unknown, cancelled or finished; shard already done). Moves a queued job to running."""
        def change(job: dict[str, str], shard: str | None) -> _Change:
            record = ShardRecord.model_validate_json(shard) if shard else None
            if not job or job["status"] in TERMINAL_STATUSES or job["cancel"] == "1" or (
                    record is not None and record.state == "done"):
                return _Change(None)
            now = _now()
            attempts = (record.attempts if record else 0) + 1
            set_job = {"updated_at": now}
            if job["status"] == "queued":
                set_job |= {"status": "running", "started_at": job["started_at"] or now}
            running = ShardRecord(shard_index=shard_index, state="running", worker=worker, attempts=attempts,
                                  started_at=now)
            return _Change(attempts, set_job, {}, running.model_dump_json())
        return self._transact(job_id, shard_index, change)

    def complete_shard(self, job_id: str, shard_index: int, stats: ShardStats) -> bool:
        """Count a finished shard exactly once: True for the call that counted it, False for any repeat
        (a redelivered shard) or an unknown job. Counts even after a cancel: its part is on disk."""
        def change(job: dict[str, str], shard: str | None) -> _Change:
            record = ShardRecord.model_validate_json(shard) if shard else None
            if not job or (record is not None and record.state == "done"):
                return _Change(False)
            now = _now()
            done = ShardRecord(shard_index=shard_index, state="done",
                               worker=stats.worker or (record.worker if record else None),
                               attempts=record.attempts if record else 1,
                               started_at=record.started_at if record else stats.started_at,
                               finished_at=now, stats=stats)
            incr = {"shards_done": 1, "rows_done": stats.rows_total, "rows_failed": stats.rows_failed,
                    "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
            return _Change(True, {"updated_at": now}, incr, done.model_dump_json())
        return self._transact(job_id, shard_index, change)

    def claim_finalize(self, job_id: str) -> bool:
        """True exactly once, to the caller that should finalize (write stats.json, then
        finish_job(completed)): every shard is done and the job is neither finished nor claimed."""
        def change(job: dict[str, str], _: str | None) -> _Change:
            if (not job or job["status"] in TERMINAL_STATUSES or job["finalize_claimed"] == "1"
                    or int(job["shards_done"]) < int(job["shards_total"])):
                return _Change(False)
            return _Change(True, {"finalize_claimed": "1"})
        return self._transact(job_id, None, change)

    def shard_records(self, job_id: str) -> list[ShardRecord]:
        """Started and finished shards, in shard order."""
        values = self._shard_values(job_id)
        return sorted((ShardRecord.model_validate_json(v) for v in values.values()), key=lambda r: r.shard_index)

    def lost_shards(self, job_id: str | None = None) -> list[tuple[str, ShardRecord]]:
        """(job id, record) of running shards whose worker is gone: no live heartbeat, or the worker id
        beats again from a process started after the shard (a restarted container keeps host and pid).
        Of one job, or of every unfinished job. Records are read before heartbeats, so a worker that
        takes a shard meanwhile is seen alive."""
        job_ids = [job_id] if job_id else [job.job_id for job in self.list_jobs() if not job.finished]
        running = [(j, shard) for j in job_ids for shard in self.shard_records(j) if shard.state == "running"]
        if not running:
            return []
        alive = {worker.worker_id: worker for worker in self.live_workers()}
        return [(j, shard) for j, shard in running if _worker_lost(shard, alive.get(shard.worker))]

    def pending_shards(self) -> list[tuple[JobRecord, int, ShardRecord | None]]:
        """(job, shard index, its record if it has one) of every shard not done of the jobs still going (not
        finished, not cancelled): the shards that must have a message on the queue or held by a worker."""
        pending = []
        for job in self.list_jobs():
            if job.finished or job.cancel_requested:
                continue
            records = {record.shard_index: record for record in self.shard_records(job.job_id)}
            pending += [(job, index, records.get(index)) for index in range(job.shards_total)
                        if index not in records or records[index].state != "done"]
        return pending

    def requeue_shard(self, job_id: str, shard_index: int, seen: ShardRecord | None) -> bool:
        """Mark a lost shard requeued, so exactly one caller puts it back on the queue: True when this call
        did, False when the job finished or was cancelled, or the shard's record is no longer `seen` (None: it
        had none), the one the caller judged lost: it moved on (done, restarted, or requeued by another)."""
        def change(job: dict[str, str], shard: str | None) -> _Change:
            record = ShardRecord.model_validate_json(shard) if shard else None
            if not job or job["status"] in TERMINAL_STATUSES or job["cancel"] == "1" or record != seen:
                return _Change(False)
            requeued = (record or ShardRecord(shard_index=shard_index, state="requeued")).model_copy(
                update={"state": "requeued", "requeued_at": datetime.now(timezone.utc)})
            return _Change(True, {"updated_at": _now()}, {}, requeued.model_dump_json())
        return self._transact(job_id, shard_index, change)

    # -- workers and schedules -------------------------------------------------------------------------
    def heartbeat(self, worker: WorkerInfo, ttl_s: float = 30.0) -> None:
        """A worker is alive for ttl_s more seconds; beat again well before (every ttl_s / 3)."""
        seen = worker.model_copy(update={"seen_at": datetime.now(timezone.utc)})
        self._put_worker(worker.worker_id, seen.model_dump_json(), ttl_s)

    def live_workers(self) -> list[WorkerInfo]:
        workers = [WorkerInfo.model_validate_json(v) for v in self._worker_values()]
        return sorted(workers, key=lambda w: w.worker_id)

    def claim_input(self, schedule: str, input_key: str) -> bool:
        """True the first time a scheduled definition sees this input (e.g. path + size + mtime), so each
        firing processes only new files."""
        return self._add_to_set(schedule, input_key)

    # -- storage primitives ----------------------------------------------------------------------------
    def _create(self, job_id: str, fields: dict[str, str], spec_json: str, created: float) -> bool:
        raise NotImplementedError

    def _job_fields(self, job_id: str) -> dict[str, str]:
        raise NotImplementedError

    def _spec_json(self, job_id: str) -> str | None:
        raise NotImplementedError

    def _shard_values(self, job_id: str) -> dict[str, str]:
        raise NotImplementedError

    def _transact(self, job_id: str, shard_index: int | None, change: _ChangeFn) -> Any:
        """Read the job's fields (and the shard's record), compute `change`, apply it; all atomic."""
        raise NotImplementedError

    def _job_ids(self) -> list[str]:
        raise NotImplementedError

    def _put_worker(self, worker_id: str, value: str, ttl_s: float) -> None:
        raise NotImplementedError

    def _worker_values(self) -> list[str]:
        raise NotImplementedError

    def _add_to_set(self, name: str, member: str) -> bool:
        raise NotImplementedError


def redis_url() -> str:
    """The deployment's Redis: BATCHGEN_REDIS_URL, redis://[:password@]host:port/db or rediss://..."""
    return os.environ.get("BATCHGEN_REDIS_URL") or DEFAULT_REDIS_URL


def redis_client(url: str | None = None) -> redis.Redis:
    """A client for `url` (default: redis_url(); password and rediss:// included) that rides out a Redis
    restart: connection errors are retried with backoff for about half a minute before they surface."""
    return redis.Redis.from_url(url or redis_url(), decode_responses=True, socket_connect_timeout=5,
                                socket_keepalive=True, health_check_interval=15, retry=_retry(),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


class _RetryLostConnection(Retry):
    """Retries what a restarting server looks like (refused, reset, timed out), never a wrong password:
    redis-py files AuthenticationError under ConnectionError."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            return not isinstance(error, redis.AuthenticationError) and (is_retryable is None or is_retryable(error))
        return super().call_with_retry(do, fail, retryable, with_failure_count)


def _retry() -> Retry:
    return _RetryLostConnection(ExponentialBackoff(cap=2.0, base=0.05), retries=20,
                                supported_errors=(redis.ConnectionError, redis.TimeoutError))


class RedisJobStore(JobStore):
    """The shared registry. Keys live under `prefix:` (tests use their own)."""

    def __init__(self, url: str | None = None, prefix: str = DEFAULT_PREFIX, client: redis.Redis | None = None):
        self.url = url or redis_url()
        self.redis = client or redis_client(self.url)
        self.prefix = prefix
        self._retry = _retry()

    def __repr__(self) -> str:
        return f"RedisJobStore({redact_url(self.url)!r}, prefix={self.prefix!r})"

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}{part}"

    def _create(self, job_id: str, fields: dict[str, str], spec_json: str, created: float) -> bool:
        job_key = self._key(job_id)

        def body(pipe: redis.client.Pipeline) -> bool:
            if pipe.exists(job_key):
                return False
            pipe.multi()
            pipe.hset(job_key, mapping=fields)
            pipe.set(self._key(job_id, ":spec"), spec_json)
            pipe.zadd(f"{self.prefix}:jobs", {job_id: created})
            return True
        return self._retry.call_with_retry(
            lambda: self.redis.transaction(body, job_key, value_from_callable=True), lambda _: None)

    def _job_fields(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(self._key(job_id))

    def _spec_json(self, job_id: str) -> str | None:
        return self.redis.get(self._key(job_id, ":spec"))

    def _shard_values(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(self._key(job_id, ":shards"))

    def _transact(self, job_id: str, shard_index: int | None, change: _ChangeFn) -> Any:
        job_key, shards_key = self._key(job_id), self._key(job_id, ":shards")
        shard_field = None if shard_index is None else str(shard_index)

        def body(pipe: redis.client.Pipeline) -> Any:
            job = pipe.hgetall(job_key)
            shard = pipe.hget(shards_key, shard_field) if shard_field is not None else None
            planned = change(job, shard)
            pipe.multi()
            if planned.set_job:
                pipe.hset(job_key, mapping=planned.set_job)
            for name, amount in planned.incr_job.items():
                pipe.hincrby(job_key, name, amount)
            if planned.shard is not None:
                pipe.hset(shards_key, shard_field, planned.shard)
            return planned.result
        # A lost connection drops the WATCH: the whole read-decide-write runs again on the new one.
        return self._retry.call_with_retry(
            lambda: self.redis.transaction(body, job_key, shards_key, value_from_callable=True), lambda _: None)

    def _job_ids(self) -> list[str]:
        return self.redis.zrange(f"{self.prefix}:jobs", 0, -1)

    def _put_worker(self, worker_id: str, value: str, ttl_s: float) -> None:
        self.redis.set(f"{self.prefix}:worker:{worker_id}", value, px=max(1, int(ttl_s * 1000)))

    def _worker_values(self) -> list[str]:
        keys = list(self.redis.scan_iter(match=f"{self.prefix}:worker:*", count=500))
        return [v for v in self.redis.mget(keys) if v is not None] if keys else []

    def _add_to_set(self, name: str, member: str) -> bool:
        return self.redis.sadd(f"{self.prefix}:seen:{name}", member) == 1


class MemoryJobStore(JobStore):
    """The in-process twin: same rules, state in dicts behind one lock."""

    def __init__(self):
        self._lock = threading.RLock()
        self._jobs: dict[str, dict[str, str]] = {}
        self._specs: dict[str, str] = {}
        self._shards: dict[str, dict[str, str]] = {}
        self._created: dict[str, float] = {}
        self._workers: dict[str, tuple[float, str]] = {}     # id -> (monotonic expiry, info)
        self._sets: dict[str, set[str]] = {}

    def _create(self, job_id: str, fields: dict[str, str], spec_json: str, created: float) -> bool:
        with self._lock:
            if job_id in self._jobs:
                return False
            self._jobs[job_id], self._specs[job_id], self._created[job_id] = dict(fields), spec_json, created
            self._shards[job_id] = {}
            return True

    def _job_fields(self, job_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._jobs.get(job_id, {}))

    def _spec_json(self, job_id: str) -> str | None:
        with self._lock:
            return self._specs.get(job_id)

    def _shard_values(self, job_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._shards.get(job_id, {}))

    def _transact(self, job_id: str, shard_index: int | None, change: _ChangeFn) -> Any:
        with self._lock:
            job = self._jobs.get(job_id, {})
            shards = self._shards.get(job_id, {})
            planned = change(dict(job), None if shard_index is None else shards.get(str(shard_index)))
            job.update(planned.set_job)
            for name, amount in planned.incr_job.items():
                job[name] = str(int(job.get(name, "0")) + amount)
            if planned.shard is not None:
                shards[str(shard_index)] = planned.shard
            return planned.result

    def _job_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs, key=lambda job_id: (self._created[job_id], job_id))

    def _put_worker(self, worker_id: str, value: str, ttl_s: float) -> None:
        with self._lock:
            self._workers[worker_id] = (time.monotonic() + ttl_s, value)

    def _worker_values(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [value for expiry, value in self._workers.values() if expiry > now]

    def _add_to_set(self, name: str, member: str) -> bool:
        with self._lock:
            members = self._sets.setdefault(name, set())
            if member in members:
                return False
            members.add(member)
            return True


def _job_record(job_id: str, fields: dict[str, str]) -> JobRecord:
    return JobRecord(
        job_id=job_id, status=fields["status"], model=fields["model"], input=fields["input"],
        output=fields["output"], created_at=fields["created_at"], error=fields.get("error") or None,
        **{name: fields.get(name) or None for name in ("started_at", "finished_at", "updated_at")},
        **{name: int(fields.get(name, "0")) for name in _COUNTERS},
        cancel_requested=fields.get("cancel") == "1", finalize_claimed=fields.get("finalize_claimed") == "1")


def _worker_lost(shard: ShardRecord, worker: WorkerInfo | None) -> bool:
    if worker is None:
        return True
    return worker.started_at is not None and shard.started_at is not None and worker.started_at > shard.started_at


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
