"""Per-shard and per-job statistics. A shard's stats travel inside its Parquet part (footer metadata), so
the job's .batchgen/stats.json can always be rebuilt from the parts alone, whatever happened to Redis."""
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, computed_field

import batchgen


class _RowCounts(Protocol):
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    preemptions: int


class Counts(BaseModel):
    """Totals shared by a shard and a job; throughput is over wall-clock seconds."""
    rows_total: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0          # rows that ran (failed rows' tokens were never processed)
    completion_tokens: int = 0
    cached_tokens: int = 0          # prompt tokens served by the prefix cache
    preemptions: int = 0
    wall_seconds: float = 0.0

    @computed_field
    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @computed_field
    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @computed_field
    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class ShardStats(Counts):
    shard_index: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None       # host (and process) that ran it
    gpu: str | None = None

    @classmethod
    def from_rows(cls, shard_index: int, rows: Iterable[_RowCounts], *, wall_seconds: float,
                  worker: str | None = None, gpu: str | None = None, started_at: datetime | None = None,
                  finished_at: datetime | None = None) -> "ShardStats":
        """Stats of one shard from its output rows (`batchgen.jobs.output_rows.OutputRow`)."""
        stats = cls(shard_index=shard_index, wall_seconds=wall_seconds, worker=worker, gpu=gpu,
                    started_at=started_at, finished_at=finished_at)
        for row in rows:
            stats.rows_total += 1
            if row.error is not None:
                stats.rows_failed += 1
                continue
            stats.rows_ok += 1
            stats.prompt_tokens += row.prompt_tokens
            stats.completion_tokens += row.completion_tokens
            stats.cached_tokens += row.cached_tokens
            stats.preemptions += row.preemptions
        return stats


class JobStats(Counts):
    job_id: str
    model: str
    dtype: str | None = None
    sampling: dict[str, Any] = {}          # what every row started from
    sampling_sources: dict[str, str] = {}  # field -> "model" (generation_config.json), "job" or "default"
    row_sampling: dict[str, int] = {}      # field -> rows that set it themselves
    batchgen_version: str = batchgen.__version__
    started_at: datetime | None = None
    finished_at: datetime | None = None
    shard_seconds: float = 0.0      # sum of shard wall times: worker-seconds spent
    workers: list[str] = []         # "host gpu", one entry per distinct pair
    shards: list[ShardStats] = []


def merge_stats(shards: Iterable[ShardStats], *, job_id: str, model: str, dtype: str | None = None,
                sampling: dict[str, Any] | None = None, sampling_sources: dict[str, str] | None = None,
                row_sampling: dict[str, int] | None = None, started_at: datetime | None = None,
                finished_at: datetime | None = None) -> JobStats:
    """Job stats from its shards. Wall time is the job's own span (submit to finish when given, else first
    shard start to last shard end), so tok/s counts every worker together."""
    shards = sorted(shards, key=lambda s: s.shard_index)
    job = JobStats(job_id=job_id, model=model, dtype=dtype, sampling=sampling or {},
                   sampling_sources=sampling_sources or {}, row_sampling=row_sampling or {}, shards=shards,
                   started_at=started_at or min((s.started_at for s in shards if s.started_at), default=None),
                   finished_at=finished_at or max((s.finished_at for s in shards if s.finished_at), default=None))
    for name in ("rows_total", "rows_ok", "rows_failed", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "preemptions"):
        setattr(job, name, sum(getattr(s, name) for s in shards))
    job.shard_seconds = sum(s.wall_seconds for s in shards)
    if job.started_at and job.finished_at:
        job.wall_seconds = (job.finished_at - job.started_at).total_seconds()
    else:
        job.wall_seconds = job.shard_seconds
    job.workers = sorted({" ".join(filter(None, (s.worker, s.gpu))) for s in shards if s.worker or s.gpu})
    return job


def render_stats(stats: JobStats, per_shard: bool = False) -> str:
    """The job's stats as an aligned text table (what `batchgen results` prints)."""
    rows = [
        ("job", stats.job_id), ("model", stats.model), ("dtype", stats.dtype or "-"),
        ("batchgen", stats.batchgen_version),
        ("sampling", _sampling_text(stats)),
        ("started", format_time(stats.started_at)), ("finished", format_time(stats.finished_at)),
        ("wall time", f"{stats.wall_seconds:,.1f} s"), ("worker time", f"{stats.shard_seconds:,.1f} s"),
        ("rows", f"{stats.rows_total:,} ({stats.rows_ok:,} ok, {stats.rows_failed:,} failed)"),
        ("prompt tokens", f"{stats.prompt_tokens:,}"), ("completion tokens", f"{stats.completion_tokens:,}"),
        ("output tok/s", f"{stats.output_tokens_per_s:,.1f}"), ("total tok/s", f"{stats.total_tokens_per_s:,.1f}"),
        ("prefix cache hits", f"{stats.prefix_cache_hit_rate:.1%}"), ("preemptions", f"{stats.preemptions:,}"),
        ("shards", f"{len(stats.shards):,}"), ("workers", ", ".join(stats.workers) or "-"),
    ]
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    if per_shard and stats.shards:
        header = ("shard", "rows", "failed", "prompt tok", "output tok", "wall s", "out tok/s", "worker")
        lines = [header] + [
            (str(s.shard_index), f"{s.rows_total:,}", f"{s.rows_failed:,}", f"{s.prompt_tokens:,}",
             f"{s.completion_tokens:,}", f"{s.wall_seconds:,.1f}", f"{s.output_tokens_per_s:,.1f}",
             " ".join(filter(None, (s.worker, s.gpu))) or "-")
            for s in stats.shards]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text += "\n\n" + "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
    return text


def _sampling_text(stats: JobStats) -> str:
    """temperature=0.2 (model), max_tokens=256 (default), ...; then the fields rows set themselves."""
    text = ", ".join(f"{name}={value}" + (f" ({stats.sampling_sources[name]})" if name in stats.sampling_sources
                                          else "") for name, value in sorted(stats.sampling.items())) or "-"
    if stats.row_sampling:
        text += "; set by rows: " + ", ".join(f"{name} ({count:,})"
                                              for name, count in sorted(stats.row_sampling.items()))
    return text


def format_time(value: datetime | None) -> str:
    """A moment as the CLI shows it: ISO 8601 to the second, '-' for none."""
    return value.isoformat(timespec="seconds") if value else "-"
