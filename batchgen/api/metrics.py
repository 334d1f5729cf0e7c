"""GET /metrics: the job service in Prometheus' text format, read from the job store and the queues at each
scrape (nothing is counted in this process, so every server of a deployment answers alike)."""
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from typing import get_args

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from batchgen.jobs.store import JobStatus, JobStore

THROUGHPUT_WINDOW_S = 60.0


class JobServiceCollector(Collector):
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        from batchgen.workers.app import queue_length, queue_name

        jobs = self.store.list_jobs()
        workers = self.store.live_workers()
        by_status = GaugeMetricFamily("batchgen_jobs", "Jobs in the store by status", labels=["status"])
        for status in get_args(JobStatus):
            by_status.add_metric([status], sum(job.status == status for job in jobs))
        yield by_status
        rows = CounterMetricFamily("batchgen_rows", "Rows finished, by outcome", labels=["outcome"])
        rows.add_metric(["ok"], sum(job.rows_done - job.rows_failed for job in jobs))
        rows.add_metric(["failed"], sum(job.rows_failed for job in jobs))
        yield rows
        yield CounterMetricFamily("batchgen_prompt_tokens", "Prompt tokens of the rows that ran",
                                  value=sum(job.prompt_tokens for job in jobs))
        yield CounterMetricFamily("batchgen_generated_tokens", "Completion tokens generated",
                                  value=sum(job.completion_tokens for job in jobs))

        models = {job.model for job in jobs if not job.finished} | {w.model for w in workers if w.model}
        queue = GaugeMetricFamily("batchgen_queue_depth", "Shard tasks waiting on a model's queue", labels=["model"])
        for model in sorted(models):
            queue.add_metric([model], queue_length(queue_name(model)))
        yield queue

        live = GaugeMetricFamily("batchgen_workers", "Live workers (a heartbeat within its TTL)", labels=["model"])
        for model, count in sorted(Counter(w.model or "" for w in workers).items()):
            live.add_metric([model], count)
        yield live
        busy = GaugeMetricFamily("batchgen_worker_busy", "1 while the worker runs a shard", labels=["worker", "model"])
        speed = GaugeMetricFamily("batchgen_worker_output_tokens_per_second",
                                  f"Tokens a worker generated over the last {THROUGHPUT_WINDOW_S:g} s of shards it "
                                  "finished", labels=["worker", "model"])
        tokens = self._recent_tokens(jobs)
        for worker in workers:
            labels = [worker.worker_id, worker.model or ""]
            busy.add_metric(labels, int(worker.job_id is not None))
            speed.add_metric(labels, tokens.get(worker.worker_id, 0) / THROUGHPUT_WINDOW_S)
        yield busy
        yield speed

    def _recent_tokens(self, jobs) -> dict[str, int]:
        """Completion tokens per worker in the shards finished within the window."""
        since = datetime.now(timezone.utc) - timedelta(seconds=THROUGHPUT_WINDOW_S)
        tokens: dict[str, int] = defaultdict(int)
        for job in jobs:
            if job.finished and (job.finished_at is None or job.finished_at < since):
                continue
            for shard in self.store.shard_records(job.job_id):
                if shard.stats is not None and shard.finished_at is not None and shard.finished_at >= since:
                    tokens[shard.worker or ""] += shard.stats.completion_tokens
        return tokens


def metrics_router(store: JobStore) -> APIRouter:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobServiceCollector(store))
    router = APIRouter()

    @router.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router

