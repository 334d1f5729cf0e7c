"""Redis going away under a running job, on the suite's own password-protected redis-server. Restarted with
its append-only file, workers and the CLI ride the outage out and the job completes. Restarted empty (a Redis
without persistence), the job is gone from the registry: `batchgen resume DIR` registers it again from its
job.json and finishes it without redoing the shards whose parts are on disk."""
import os
import subprocess
import sys
import time

import pytest

from batchgen.jobs.output_dir import read_shard_stats
from harness import cli_process, every_row_once, reference_texts, store_at, wait_until, write_jsonl

pytestmark = pytest.mark.slow   # real worker processes and a redis-server restarted

MAX_TOKENS = 30
NUM_ROWS = 12                   # 6 shards of 2 rows, about 1.7 s each on the slowed worker


def rows(tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "prompt": f"Tell me about harbour number {i}", "ignore_eos": True}
            for i in range(NUM_ROWS)]


def submit(deployment, inputs: list[dict], directory) -> str:
    result = cli_process("submit", write_jsonl(directory / "in.jsonl", inputs), "-o", directory / "out",
                         "--model", deployment.model, "--shard-size", 2, "--max-tokens", MAX_TOKENS,
                         "--temperature", 0, redis_url=deployment.redis.url)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def check_outputs(output, inputs: list[dict], reference_llm) -> None:
    table = every_row_once(str(output), [r["id"] for r in inputs])
    expected = reference_texts(reference_llm, [r["prompt"] for r in inputs], max_tokens=MAX_TOKENS,
                               ignore_eos=True)
    assert [r["text"] for r in table] == expected and all(r["error"] is None for r in table)


def test_workers_and_cli_ride_out_a_redis_restart(deployment, reference_llm, tmp_path):
    inputs = rows("a")
    job_id = submit(deployment, inputs, tmp_path)
    store = store_at(deployment.redis.url)
    wait_until(lambda: store.get_job(job_id).shards_done >= 1, 60, "a first shard")
    waiter = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "wait", job_id, "--interval", "0.2",
                               "--timeout", "120"], env={**os.environ, "BATCHGEN_REDIS_URL": deployment.redis.url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deployment.redis.stop()
    time.sleep(3)
    deployment.redis.start()
    _, err = waiter.communicate(timeout=150)
    assert waiter.returncode == 0, err + deployment.worker.log_text()[-4000:]
    assert f"job {job_id} completed: {NUM_ROWS} rows (0 failed)" in err
    check_outputs(tmp_path / "out", inputs, reference_llm)


def test_resume_brings_back_a_job_that_redis_lost(deployment, reference_llm, tmp_path):
    inputs = rows("b")
    job_id = submit(deployment, inputs, tmp_path)
    store = store_at(deployment.redis.url)
    wait_until(lambda: store.get_job(job_id).shards_done >= 2, 60, "two shards")
    deployment.redis.stop()
    deployment.redis.wipe()
    deployment.redis.start()

    status = cli_process("status", job_id, redis_url=deployment.redis.url)
    assert status.returncode == 1 and f"no job {job_id}" in status.stderr
    idle = lambda: [w for w in store.live_workers() if w.worker_id == deployment.worker.worker_id and not w.job_id]
    wait_until(idle, 60, "the worker to finish the shards it held")
    written = {s.shard_index: s for s in read_shard_stats(str(tmp_path / "out"))}
    assert 2 <= len(written) < NUM_ROWS // 2

    resumed = cli_process("resume", tmp_path / "out", redis_url=deployment.redis.url)
    assert resumed.returncode == 0 and f"resumed {job_id}: {NUM_ROWS // 2} shard(s) queued" in resumed.stdout
    waited = cli_process("wait", job_id, "--interval", 0.2, "--timeout", 90, redis_url=deployment.redis.url)
    assert waited.returncode == 0, waited.stderr + deployment.worker.log_text()[-4000:]
    check_outputs(tmp_path / "out", inputs, reference_llm)
    again = {s.shard_index: s for s in read_shard_stats(str(tmp_path / "out"))}
    assert all(again[i] == stats for i, stats in written.items())      # those parts were not written again
    assert store.get_job(job_id).shards_done == NUM_ROWS // 2
