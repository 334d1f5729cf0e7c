"""Running a job's shards: the one execution path shared by `batchgen run` (in-process, MemoryJobStore) and
the Celery task (`batchgen.workers.tasks.run_shard`, RedisJobStore).

A shard: rows [a, b) -> token ids -> engine.generate_tokens -> output rows -> parts/shard-NNNNN.parquet
(atomic) -> store counters. Every step may be repeated safely: a redelivered shard whose part exists is only
counted (once), and exactly one caller finalizes the job (stats.json, results.jsonl, status completed).
"""
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import pyarrow as pa

from batchgen.engine.errors import Cancelled
from batchgen.jobs.errors import JobInputError, JobOutputError
from batchgen.jobs.output_dir import (part_exists, part_stats, read_shard_stats, remove_temp_files, save_stats,
                                     write_openai_output, write_part)
from batchgen.jobs.output_rows import output_row, output_schema
from batchgen.jobs.paths import check_roots
from batchgen.jobs.readers import read_rows
from batchgen.jobs.rows import PromptRow
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.stats import JobStats, ShardStats, merge_stats
from batchgen.jobs.store import JobRecord, JobStore, MemoryJobStore
from batchgen.outputs import RequestOutput
from batchgen.sampling_params import SamplingParams

log = logging.getLogger("batchgen.jobs")

CANCEL_CHECK_INTERVAL_S = 0.5   # a cancel is seen within this; the engine asks every step
ShardStatus = Literal["done", "skipped", "cancelled", "failed"]


class Generator(Protocol):
    """What runs the rows: `batchgen.LLM` (local run) or `batchgen.engine.loop.EngineLoop` (worker: thread-safe,
    shared by the worker's shard threads). `should_stop` cancels mid-shard; `cache_salt` keeps a job's
    prefix-cache blocks to the jobs of the same salt."""

    def generate_tokens(self, prompts: Sequence[list[int] | Exception], sampling_params: Sequence[SamplingParams],
                        should_stop: Callable[[], bool] | None = None,
                        cache_salt: str | None = None) -> list[RequestOutput]: ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict]) -> list[int]: ...


@dataclass(frozen=True)
class Executor:
    """An engine and who runs it: the worker and GPU named in each shard's stats."""
    engine: Generator
    tokenizer: Tokenizer
    worker: str                      # "host:pid"
    gpu: str | None = None           # "cpu", or "cuda:0 NVIDIA H100 80GB HBM3" (physical indices: "cuda:2,3" under TP)
    dtype: str | None = None
    default_sampling: dict[str, Any] = field(default_factory=dict)   # the engine's, from the model's files

    @classmethod
    def for_llm(cls, llm, engine: Generator | None = None) -> "Executor":
        """An executor for a loaded `batchgen.LLM`; `engine` replaces it as the generator (an EngineLoop
        around it)."""
        return cls(engine=engine or llm, tokenizer=llm.tokenizer, worker=worker_name(),
                   gpu=device_label(llm.engine.device, llm.engine.config.tensor_parallel_size),
                   dtype=str(llm.engine.dtype).removeprefix("torch."), default_sampling=llm.engine.default_sampling)


@dataclass(frozen=True)
class ShardOutcome:
    shard_index: int
    status: ShardStatus
    stats: ShardStats | None = None  # the shard's stats when it ran (or its existing part's)
    finalized: bool = False          # this call finished the job
    error: str | None = None         # a whole-job error (status "failed")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def device_label(device, tensor_parallel_size: int = 1) -> str:
    """'cpu', or 'cuda:N <name>' with N the physical GPU (CUDA_VISIBLE_DEVICES maps the process's cuda:0); a
    tensor-parallel engine names every GPU of its group, 'cuda:2,3 <name>' (rank r runs on the r-th device
    from the engine's), or its ranks on the CPU, 'cpu x2'."""
    if device.type != "cuda":
        return device.type if tensor_parallel_size == 1 else f"{device.type} x{tensor_parallel_size}"
    import torch

    first = device.index or 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    physical = [visible[index] if index < len(visible) else str(index)
                for index in range(first, first + tensor_parallel_size)]
    return f"cuda:{','.join(physical)} {torch.cuda.get_device_name(first)}"


# ---------------------------------------------------------------------------------------------------------
# a job's lifecycle around its shards

def run_job_locally(spec: JobSpec, executor: Executor,
                    progress: Callable[[JobRecord], None] | None = None) -> JobRecord:
    """The whole job in this process, shard after shard, on an in-memory store; returns the final record.
    `progress` gets the record after each shard."""
    store = MemoryJobStore()
    store.create_job(spec)
    for shard_index in range(spec.num_shards):
        outcome = run_shard(spec, shard_index, executor, store)
        if progress is not None:
            progress(store.get_job(spec.job_id))
        if outcome.status == "failed":
            break
    return store.get_job(spec.job_id)


def run_shard(spec: JobSpec, shard_index: int, executor: Executor, store: JobStore,
              should_stop: Callable[[], bool] | None = None) -> ShardOutcome:
    """Run one shard unless its part exists or the store says not to, then finalize the job if this was the
    last one. Whole-job problems (the input changed, the output can't be written) fail the job and come back
    as status "failed"; a row's problems are that row's error. `should_stop` (see `cancel_check`) is handed
    to the engine, which raises `batchgen.engine.errors.Cancelled` when it turns true mid-shard."""
    job_id = spec.job_id
    if spec.generation_config == "model" and spec.model_sampling is None:
        # not recorded at submit (the model's files were not readable there): the loaded model's own
        spec = spec.model_copy(update={"model_sampling": executor.default_sampling})
    try:
        check_roots(spec)         # a worker enforces its roots whoever registered the job
    except (JobInputError, JobOutputError) as exc:
        return _fail(spec, store, shard_index, str(exc))
    if part_exists(spec.output, shard_index):
        # Redelivered after its part was written, perhaps before it was counted: count it (once) now.
        stats = part_stats(spec.output, shard_index)
        if stats is not None:
            store.complete_shard(job_id, shard_index, stats)
        return _maybe_finalize(spec, store, executor, ShardOutcome(shard_index, "skipped", stats))
    if store.start_shard(job_id, shard_index, executor.worker) is None:
        return ShardOutcome(shard_index, "skipped")

    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    start, end = spec.shard_rows(shard_index)
    try:
        rows = list(read_rows(spec, start, end))
    except JobInputError as exc:
        return _fail(spec, store, shard_index, str(exc))
    try:
        results = _generate_rows(rows, executor, should_stop, spec.cache_salt)
    except Cancelled:
        log.info("job %s shard %d stopped: the job was cancelled", job_id, shard_index)
        return ShardOutcome(shard_index, "cancelled")
    output_rows = [output_row(row, result) for row, result in zip(rows, results)]
    for row, output in zip(rows, output_rows):
        if output.error is not None and row.error is None:   # the tokenizer's or the engine's: say which row
            output.error = f"{spec.input_display}: row {row.index + 1}: {output.error}"
    stats = ShardStats.from_rows(shard_index, output_rows, wall_seconds=time.perf_counter() - clock,
                                 worker=executor.worker, gpu=executor.gpu, started_at=started_at,
                                 finished_at=datetime.now(timezone.utc))
    try:
        write_part(output_rows, spec.output, shard_index, output_schema(spec), stats)
    except JobOutputError as exc:
        return _fail(spec, store, shard_index, str(exc))
    store.complete_shard(job_id, shard_index, stats)
    return _maybe_finalize(spec, store, executor, ShardOutcome(shard_index, "done", stats))


def finalize_job(spec: JobSpec, store: JobStore, dtype: str | None = None) -> JobStats:
    """Write stats.json (and results.jsonl for output_format "openai") from the parts, then mark the job
    completed. Call it once, after `store.claim_finalize` said so. Raises JobOutputError when the parts don't
    hold every input row (someone removed one) or can't be written; the job is then failed."""
    try:
        remove_temp_files(spec.output)
        record = store.get_job(spec.job_id)
        sampling, sources = spec.effective_sampling()
        stats = merge_stats(read_shard_stats(spec.output), job_id=spec.job_id, model=spec.model, dtype=dtype,
                            sampling=sampling, sampling_sources=sources, row_sampling=spec.summary.row_sampling,
                            started_at=record.started_at if record else None, finished_at=datetime.now(timezone.utc))
        expected = spec.summary.num_rows
        if stats.rows_total != expected:
            raise JobOutputError(f"{spec.output_display}: the parts hold {stats.rows_total} rows, the input "
                                 f"{expected}; a part is missing")
        save_stats(spec.output, stats)
        if spec.output_format == "openai":
            write_openai_output(spec)
    except (JobOutputError, OSError, pa.ArrowException) as exc:
        store.finish_job(spec.job_id, "failed", error=f"finalizing: {exc}")
        raise JobOutputError(f"finalizing job {spec.job_id}: {exc}") from None
    store.finish_job(spec.job_id, "completed")
    return stats


def cancel_check(store: JobStore, job_id: str, interval_s: float = CANCEL_CHECK_INTERVAL_S) -> Callable[[], bool]:
    """`should_stop` for a shard: true once the job is cancelled. The engine calls it every step, so the
    store is asked at most every `interval_s`."""
    lock = threading.Lock()
    state = {"checked": float("-inf"), "cancelled": False}

    def should_stop() -> bool:
        with lock:
            now = time.monotonic()
            if not state["cancelled"] and now - state["checked"] >= interval_s:
                state["checked"] = now
                state["cancelled"] = store.is_cancelled(job_id)
            return state["cancelled"]
    return should_stop


# ---------------------------------------------------------------------------------------------------------
# rows through the engine

def encode_row(row: PromptRow, tokenizer: Tokenizer) -> list[int] | Exception:
    """Token ids of a valid row's prompt; a failure (no chat template, a template error) is returned, so the
    engine reports it as this row's error."""
    try:
        return tokenizer.encode_chat(row.messages) if row.is_chat else tokenizer.encode(row.prompt)
    except Exception as exc:  # the tokenizer's failure belongs to this row only
        return exc


def _generate_rows(rows: list[PromptRow], executor: Executor, should_stop: Callable[[], bool] | None,
                   cache_salt: str | None) -> list[RequestOutput | None]:
    """Engine results for the valid rows, None for rows that were invalid from the start. The job's cache
    salt keeps its prefix-cache blocks apart from other jobs' on a shared engine."""
    valid = [row for row in rows if row.error is None]
    prompts = [encode_row(row, executor.tokenizer) for row in valid]
    generated = executor.engine.generate_tokens(prompts, [row.params for row in valid], should_stop=should_stop,
                                                cache_salt=cache_salt) if valid else []
    by_index = {row.index: result for row, result in zip(valid, generated)}
    return [by_index.get(row.index) for row in rows]


# ---------------------------------------------------------------------------------------------------------

def _maybe_finalize(spec: JobSpec, store: JobStore, executor: Executor, outcome: ShardOutcome) -> ShardOutcome:
    if not store.claim_finalize(spec.job_id):
        return outcome
    try:
        finalize_job(spec, store, executor.dtype)
    except JobOutputError as exc:
        return ShardOutcome(outcome.shard_index, "failed", outcome.stats, error=str(exc))
    return ShardOutcome(outcome.shard_index, outcome.status, outcome.stats, finalized=True)


def _fail(spec: JobSpec, store: JobStore, shard_index: int, error: str) -> ShardOutcome:
    error = error.replace(spec.output, spec.output_display).replace(spec.input, spec.input_display)
    log.error("job %s failed at shard %d: %s", spec.job_id, shard_index, error)
    store.finish_job(spec.job_id, "failed", error=error)
    return ShardOutcome(shard_index, "failed", error=error)
