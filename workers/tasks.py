"""The worker side: one engine per worker process, shared by its task threads, and the tasks that use it.

A worker serves one model (BATCHGEN_MODEL, set by `batchgen worker --model M`) on one GPU. Celery's threads
pool runs two shard tasks at once in this process; both feed the same engine loop, so the next shard's rows
are already in the batch while the current shard's last rows finish. A heartbeat thread tells the job store
who this worker is and what it runs, so `batchgen status` can see a stall; it renews the broker's hold on the
messages this worker took, and puts the shards of workers that died, and shards whose message was lost, back
on the queue.
"""
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from celery.signals import worker_ready, worker_shutdown

from batchgen.engine.errors import EngineBroken
from batchgen.jobs import execute
from batchgen.jobs.store import WorkerInfo
from batchgen.workers.app import FIRE_SCHEDULE_TASK, SHARD_TASK, app, heartbeat_ttl_s, job_store, unacked_index_key

log = logging.getLogger("batchgen.workers")

MAX_SHARD_RETRIES = 3                # an unexpected error: the shard runs again, then the job fails
RETRY_DELAY_S = 5.0

_started_at = datetime.now(timezone.utc)
_engine_lock = threading.Lock()
_executor: execute.Executor | None = None
_running_lock = threading.Lock()
_running: dict[int, tuple[str, int]] = {}        # task thread -> (job id, shard index) it runs now
_heartbeat_stop = threading.Event()


def worker_model() -> str:
    return os.environ.get("BATCHGEN_MODEL") or "default"


def load_executor() -> execute.Executor:
    """This process's engine, loaded on first use (the `worker` command loads it before taking tasks) from
    BATCHGEN_MODEL and BATCHGEN_ENGINE_ARGS (JSON: EngineConfig fields such as dtype and device)."""
    global _executor
    with _engine_lock:
        if _executor is None:
            from batchgen import LLM
            from batchgen.engine.loop import EngineLoop

            llm = LLM(worker_model(), **json.loads(os.environ.get("BATCHGEN_ENGINE_ARGS") or "{}"))
            _executor = execute.Executor.for_llm(llm, EngineLoop(llm))
            log.info("model %s loaded on %s (%s)", worker_model(), _executor.gpu, _executor.dtype)
        return _executor


@app.task(name=SHARD_TASK, bind=True, max_retries=MAX_SHARD_RETRIES)
def run_shard(self, job_id: str, shard_index: int) -> str:
    """Run one shard of a job (idempotent: a shard whose part exists, or whose job is cancelled or finished,
    is skipped). Returns the shard's status: done, skipped, cancelled, failed, or unknown (no such job)."""
    store = job_store()
    spec = store.get_spec(job_id)
    if spec is None:
        log.warning("job %s is not registered (deleted?); shard %d dropped", job_id, shard_index)
        return "unknown"
    executor = load_executor()
    with _running_shard(job_id, shard_index):
        try:
            outcome = execute.run_shard(spec, shard_index, executor, store,
                                        should_stop=execute.cancel_check(store, job_id))
        except Exception as exc:
            attempts = self.request.retries + 1
            broken = isinstance(exc, EngineBroken)
            if broken:   # the device, not the shard: stop taking work here (a warm shutdown), let others run it
                log.error("the engine is broken (%s); this worker stops", exc)
                os.kill(os.getpid(), signal.SIGTERM)
            if attempts <= self.max_retries:
                log.exception("job %s shard %d failed (attempt %d); retrying", job_id, shard_index, attempts)
                raise self.retry(exc=exc, countdown=0 if broken else RETRY_DELAY_S * 2 ** self.request.retries)
            store.finish_job(job_id, "failed", error=f"shard {shard_index} failed {attempts} times: "
                                                     f"{type(exc).__name__}: {exc}")
            raise
    return outcome.status


@app.task(name=FIRE_SCHEDULE_TASK)
def fire_schedule(definition: dict) -> list[str]:
    """One firing of a scheduled definition (sent by beat): submit a job for each input file not seen before.
    Runs on a worker of the definition's model, which sees the same files its shards will read."""
    from batchgen.workers.schedules import ScheduleDefinition, fire

    return fire(ScheduleDefinition.model_validate(definition), job_store())


# ---------------------------------------------------------------------------------------------------------
# heartbeats

@contextmanager
def _running_shard(job_id: str, shard_index: int) -> Iterator[None]:
    with _running_lock:
        _running[threading.get_ident()] = (job_id, shard_index)
    _beat_once()
    try:
        yield
    finally:
        with _running_lock:
            _running.pop(threading.get_ident(), None)


def _worker_info() -> WorkerInfo:
    with _running_lock:
        current = next(reversed(_running.values()), (None, None))
    gpu = _executor.gpu if _executor else None
    return WorkerInfo(worker_id=execute.worker_name(), host=socket.gethostname(), pid=os.getpid(), gpu=gpu,
                      model=worker_model(), job_id=current[0], shard_index=current[1], started_at=_started_at)


def _beat_once(ttl_s: float | None = None) -> None:
    try:
        job_store().heartbeat(_worker_info(), ttl_s or heartbeat_ttl_s())
        _renew_leases()
    except Exception as exc:  # a heartbeat lost to a Redis hiccup must not stop the worker
        log.warning("heartbeat failed: %s", exc)


def _renew_leases() -> None:
    """Mark every message this worker holds (running, or taken and not yet started) as taken just now, so the
    broker never hands a live worker's shard to another, however long it runs. A dead worker's messages age
    and go back to the queue after the visibility timeout, whatever state they were in when it died."""
    from celery.worker import state

    tags = [request.message.delivery_tag for request in list(state.reserved_requests)]
    if tags:
        job_store().redis.zadd(unacked_index_key(), dict.fromkeys(tags, time.time()), xx=True)


def _heartbeats() -> None:
    """Beat every third of the TTL; once per TTL (and at start, for what this worker's previous life was
    running), requeue the shards of workers that died and those whose message was lost."""
    from batchgen.workers.submit import requeue_lost_messages, requeue_lost_shards

    ttl_s = heartbeat_ttl_s()
    next_reap = 0.0
    missing_since = {}
    while True:
        _beat_once(ttl_s)
        if time.monotonic() >= next_reap:
            next_reap = time.monotonic() + ttl_s
            try:
                requeue_lost_shards(job_store())
                requeue_lost_messages(job_store(), missing_since)
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("looking for lost shards failed: %s", exc)
        if _heartbeat_stop.wait(ttl_s / 3):
            return


@worker_ready.connect
def _start_heartbeats(**_) -> None:
    _heartbeat_stop.clear()
    threading.Thread(target=_heartbeats, name="batchgen-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _shut_down(**_) -> None:
    """After the last task: stop beating (gone from `status` at once rather than after the TTL), then stop the
    engine's loop thread and its grammar threads."""
    _heartbeat_stop.set()
    _beat_once(ttl_s=0.001)
    if _executor is not None:
        _executor.engine.close()
