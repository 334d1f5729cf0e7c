"""Putting a job on the queue: validate the whole input first (a refused file enqueues nothing), save job.json,
register the job, then one task per shard on the model's queue."""
import logging
import time
from collections.abc import Iterable

from batchgen.generation_config import local_model_sampling
from batchgen.jobs.errors import JobInputError
from batchgen.jobs.output_dir import prepare_output, save_spec
from batchgen.jobs.readers import validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.store import JobStore, ShardRecord
from batchgen.workers.app import app, queue_name, shards_on_broker, visibility_timeout_s

log = logging.getLogger("batchgen.workers")


class JobExistsError(ValueError):
    """The job id is taken (a resubmitted spec)."""


def submit_job(spec: JobSpec, store: JobStore) -> int:
    """Validate, register and enqueue a job; returns its number of shards. The one way a job enters the queue:
    `batchgen submit`, scheduled definitions and the Batch API (`batchgen.api`) all come through here. Raises
    JobInputError (whole-file problem) or JobOutputError (the output directory holds another job) before
    anything is written or queued (a model whose generation_config.json has bad sampling values is a JobInputError
    too); `batchgen.jobs.readers.input_report` then says what validation found."""
    if spec.generation_config == "model" and spec.model_sampling is None:
        # recorded now if the model's files are readable here (else the first shard's worker supplies them),
        # so that every shard, and a resumed job, samples alike
        try:
            spec.model_sampling = local_model_sampling(spec.model)
        except ValueError as exc:
            raise JobInputError(f"model {spec.model!r}: {exc}") from None
    if spec.input_summary is None:
        spec.input_summary = validate_input(spec)
    prepare_output(spec)
    save_spec(spec)
    if not store.create_job(spec):
        raise JobExistsError(f"job {spec.job_id} already exists")
    shards = spec.num_shards
    enqueue_shards(spec, range(shards))
    log.info("job %s: %d rows in %d shards on queue %s", spec.job_id, spec.input_summary.num_rows, shards,
             queue_name(spec.model))
    return shards


def resume_job(job_id: str, store: JobStore, saved_spec: JobSpec | None = None) -> int:
    """Put a failed or cancelled job back on the queue: only shards not yet done are enqueued again (a shard
    whose part exists is counted and skipped by the worker). A job Redis no longer knows (restarted without
    persistence) is registered again from `saved_spec`, its output's job.json, with every shard enqueued: the
    workers count the parts already on disk instead of redoing them. Returns how many were enqueued; raises
    ValueError when the job is unknown or can't be resumed."""
    if store.get_job(job_id) is None and saved_spec is not None and store.create_job(saved_spec):
        shards = saved_spec.num_shards
        enqueue_shards(saved_spec, range(shards))
        log.info("job %s registered again from its job.json: %d shards on queue %s", job_id, shards,
                 queue_name(saved_spec.model))
        return shards
    spec = store.get_spec(job_id)
    record = store.get_job(job_id)
    if spec is None or record is None:
        raise ValueError(f"no job {job_id}")
    if not store.resume_job(job_id):
        raise ValueError(f"job {job_id} is {record.status}; only failed or cancelled jobs can be resumed")
    done = {shard.shard_index for shard in store.shard_records(job_id) if shard.state == "done"}
    # every shard done but never finalized: shard 0 is skipped, counted, and finalizes the job
    pending = [i for i in range(spec.num_shards) if i not in done] or [0]
    enqueue_shards(spec, pending)
    return len(pending)


def requeue_lost_shards(store: JobStore) -> list[tuple[str, int]]:
    """Put running shards whose worker died (SIGKILL, out of memory, a lost machine) back on the queue; their
    own messages would wait unacknowledged in Redis for the visibility timeout (BATCHGEN_VISIBILITY_TIMEOUT,
    5 minutes by default). Every worker runs this from its heartbeat thread: each lost shard is requeued by
    exactly one of them, and should the old message come back too, the part-exists check and the store's
    exactly-once count make the repeat harmless.
    Returns the (job id, shard index) pairs this call requeued."""
    requeued = []
    for job_id, shard in store.lost_shards():
        spec = store.get_spec(job_id)
        if spec is not None and store.requeue_shard(job_id, shard.shard_index, shard):
            enqueue_shards(spec, [shard.shard_index])
            log.warning("job %s shard %d: its worker %s is gone; queued again", job_id, shard.shard_index,
                        shard.worker)
            requeued.append((job_id, shard.shard_index))
    return requeued


def requeue_lost_messages(store: JobStore, missing_since: dict[tuple[str, int], tuple[ShardRecord | None, float]]
                          ) -> list[tuple[str, int]]:
    """Put back on the queue the shards not done whose message is gone: neither on their queue nor held
    unacknowledged, so no visibility timeout will bring it back. Kombu's Redis transport takes a message
    (BRPOP) before it records the hold, so a worker killed in between loses it; so does a `submit` killed
    between registering a job and enqueueing it. A message being taken is out of sight for a moment, so a
    shard counts as lost only when it was missing at every look, with its record unchanged, for longer than
    the visibility timeout; `missing_since` carries those looks from one call to the next. Every worker runs
    this from its heartbeat thread, beside `requeue_lost_shards`, so no other process has to; the store lets
    one of them requeue each shard, and a repeat run of a shard is harmless anyway.
    Returns the (job id, shard index) pairs this call requeued."""
    now = time.monotonic()
    by_queue: dict[str, dict[tuple[str, int], ShardRecord | None]] = {}
    for job, shard_index, record in store.pending_shards():
        by_queue.setdefault(queue_name(job.model), {})[(job.job_id, shard_index)] = record
    still_missing, requeued = {}, []
    for queue, pending in by_queue.items():
        for key in pending.keys() - shards_on_broker(queue, set(pending)):
            record, first_look = pending[key], missing_since.get(key)
            since = first_look[1] if first_look and first_look[0] == record else now
            if now - since <= visibility_timeout_s():
                still_missing[key] = (record, since)
                continue
            job_id, shard_index = key
            spec = store.get_spec(job_id)
            if spec is not None and store.requeue_shard(job_id, shard_index, record):
                enqueue_shards(spec, [shard_index])
                log.warning("job %s shard %d: its message was lost; queued again", job_id, shard_index)
                requeued.append(key)
    missing_since.clear()
    missing_since.update(still_missing)
    return requeued


def enqueue_shards(spec: JobSpec, shard_indices: Iterable[int]) -> None:
    from batchgen.workers.tasks import run_shard

    queue = queue_name(spec.model)
    with app.producer_or_acquire() as producer:
        for shard_index in shard_indices:
            run_shard.apply_async((spec.job_id, shard_index), queue=queue, producer=producer)
