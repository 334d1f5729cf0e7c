"""The dashboard: every job of the store (submitted by the CLI, by the API, by a schedule) with its progress,
and a view per job with its shards on a timeline and its throughput over time. One static page and a
script of our own (static/) draws what two JSON routes answer; the pages poll them, so they refresh live.
It is an operator's view of the whole service and needs no key: serve it where only operators reach it."""
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from batchgen.jobs.store import JobRecord, JobStore, ShardRecord, WorkerInfo

STATIC = Path(__file__).with_name("static")
THROUGHPUT_BUCKETS = 40


def pages_router(store: JobStore, not_found) -> APIRouter:
    """`not_found(job_id)` is the exception an unknown job raises."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    @router.get("/jobs/{job_id}", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html")

    @router.get("/dashboard/jobs")
    def jobs() -> list[dict]:
        workers = store.live_workers()
        return [job_summary(record, workers) for record in reversed(store.list_jobs())]

    @router.get("/dashboard/jobs/{job_id}")
    def job(job_id: str) -> dict:
        record = store.get_job(job_id)
        if record is None:
            raise not_found(job_id)
        shards = store.shard_records(job_id)
        now = datetime.now(timezone.utc)
        return {**job_summary(record, store.live_workers()), "shards": [_shard(s) for s in shards],
                "throughput": throughput_series(shards, record.started_at, record.finished_at or now),
                "now": now.isoformat()}

    return router


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)


def job_summary(record: JobRecord, workers: list[WorkerInfo]) -> dict:
    rates = record.rates()
    return {**record.model_dump(mode="json"),
            "progress": record.rows_done / record.rows_total if record.rows_total else 0.0,
            "rows_per_s": rates.rows_per_s if rates else None, "tokens_per_s": rates.tokens_per_s if rates else None,
            "eta_s": rates.eta_s if rates else None,
            "workers": sorted(w.worker_id for w in workers if w.job_id == record.job_id)}


def throughput_series(shards: list[ShardRecord], start: datetime | None, end: datetime,
                      buckets: int = THROUGHPUT_BUCKETS) -> list[dict]:
    """Output tokens/s over the job's span, in equal buckets: each finished shard's tokens are spread evenly
    over the time it ran, so overlapping shards add up."""
    finished = [s for s in shards if s.stats is not None and s.started_at and s.finished_at]
    if start is None or not finished:
        return []
    span = max((end - start).total_seconds(), 1e-6)
    width = span / buckets
    tokens = [0.0] * buckets
    for shard in finished:
        begin = (shard.started_at - start).total_seconds()
        stop = max((shard.finished_at - start).total_seconds(), begin + 1e-6)
        per_second = shard.stats.completion_tokens / (stop - begin)
        for index in range(max(int(begin // width), 0), min(int(stop // width) + 1, buckets)):
            overlap = min(stop, (index + 1) * width) - max(begin, index * width)
            if overlap > 0:
                tokens[index] += per_second * overlap
    return [{"t": (index + 0.5) * width, "tokens_per_s": amount / width}
            for index, amount in enumerate(tokens)]


def _shard(shard: ShardRecord) -> dict:
    stats = shard.stats
    return {"shard_index": shard.shard_index, "state": shard.state, "worker": shard.worker,
            "attempts": shard.attempts,
            "started_at": shard.started_at.isoformat() if shard.started_at else None,
            "finished_at": shard.finished_at.isoformat() if shard.finished_at else None,
            "rows": stats.rows_total if stats else None, "rows_failed": stats.rows_failed if stats else None,
            "completion_tokens": stats.completion_tokens if stats else None,
            "tokens_per_s": stats.output_tokens_per_s if stats else None}
