"""Stats: shard stats read back from the parts and merged into job stats agree with sums over the output
rows; the table shows them."""
from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.jobs.output_dir import read_shard_stats
from batchgen.jobs.stats import JobStats, ShardStats, merge_stats, render_stats


def test_merged_stats_agree_with_the_rows(make_job, run_job):
    rows = [{"id": f"r{i}", "prompt": " ".join(["w"] * (1 + i % 4)), "n": 1 + i % 3} for i in range(11)]
    rows[4]["temperature"] = -1
    spec = make_job(rows, shard_size=3)
    run_job(spec, fail_ids={"r7"})
    started = datetime(2025, 1, 1, tzinfo=timezone.utc)
    stats = merge_stats(read_shard_stats(spec.output), job_id=spec.job_id, model="tiny", dtype="float32",
                        sampling=spec.sampling, started_at=started, finished_at=started + timedelta(seconds=10))

    table = pq.read_table(spec.output)
    ok = table.filter(pc.is_null(table.column("error")))
    assert stats.rows_total == table.num_rows == 11
    assert stats.rows_failed == table.num_rows - ok.num_rows == 2
    assert stats.rows_ok == ok.num_rows
    assert stats.prompt_tokens == pc.sum(ok.column("prompt_tokens")).as_py()
    assert stats.completion_tokens == pc.sum(ok.column("completion_tokens")).as_py()
    ok_indices = [i for i in range(11) if i not in (4, 7)]
    assert stats.cached_tokens == len(ok_indices)                     # the fake engine caches 1 per row
    assert stats.preemptions == sum(i % 2 for i in ok_indices)
    assert stats.wall_seconds == 10.0 and stats.shard_seconds == 4 * 2.0
    assert stats.output_tokens_per_s == stats.completion_tokens / 10.0
    assert stats.total_tokens_per_s == (stats.prompt_tokens + stats.completion_tokens) / 10.0
    assert stats.prefix_cache_hit_rate == stats.cached_tokens / stats.prompt_tokens
    assert stats.workers == ["host-a 0"] and len(stats.shards) == 4

    reloaded = JobStats.model_validate_json(stats.model_dump_json())
    assert reloaded == stats and reloaded.output_tokens_per_s == stats.output_tokens_per_s


def test_wall_time_falls_back_to_the_shards_span():
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    shards = [ShardStats(shard_index=1, completion_tokens=30, wall_seconds=3, started_at=t0 + timedelta(seconds=2),
                         finished_at=t0 + timedelta(seconds=5), worker="b", gpu="1"),
              ShardStats(shard_index=0, completion_tokens=10, wall_seconds=1, started_at=t0,
                         finished_at=t0 + timedelta(seconds=1), worker="a", gpu="0")]
    stats = merge_stats(shards, job_id="j", model="m")
    assert [s.shard_index for s in stats.shards] == [0, 1]
    assert (stats.started_at, stats.finished_at, stats.wall_seconds) == (t0, t0 + timedelta(seconds=5), 5.0)
    assert stats.output_tokens_per_s == 40 / 5.0 and stats.workers == ["a 0", "b 1"]


def test_render_shows_the_figures():
    shard = ShardStats(shard_index=0, rows_total=1200, rows_ok=1190, rows_failed=10, prompt_tokens=50_000,
                       completion_tokens=20_000, cached_tokens=12_500, wall_seconds=4.0, worker="gpu-host", gpu="0")
    stats = merge_stats([shard], job_id="job-1", model="tiny", sampling={"max_tokens": 8})
    text = render_stats(stats, per_shard=True)
    for expected in ("job-1", "tiny", "1,200 (1,190 ok, 10 failed)", "50,000", "20,000", "5,000.0",
                     "17,500.0", "25.0%", "max_tokens=8", "gpu-host 0"):
        assert expected in text, expected
