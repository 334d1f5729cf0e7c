"""Workers that die: one SIGKILLed in the middle of a shard, or every worker of a model gone for a while. A live
worker notices the silent heartbeat and puts the running shard back on the queue; a message the dead worker
took but had not started yet comes back when its lease (the visibility timeout) runs out, since only live
workers renew theirs. Every input row comes out exactly once, saying what the model says to it; `status`
tells a stalled job while nothing serves it."""
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.jobs.output_dir import read_shard_stats
from batchgen.jobs.readers import validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.stats import ShardStats
from batchgen.jobs.store import MemoryJobStore, RedisJobStore, WorkerInfo
from batchgen.workers.app import broker_key, job_store, key_prefix, queue_name
from harness import HEARTBEAT_TTL_S, every_row_once, reference_texts, wait_until, write_jsonl

pytestmark = pytest.mark.slow   # real worker processes, killed and restarted

SLOW = {"FAULT_STEP_DELAY_S": "0.05"}        # a shard of 40 tokens takes about 2 s
MAX_TOKENS = 40


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def submit(path, output, model: str, shard_size: int) -> str:
    result = cli("submit", path, "-o", output, "--model", model, "--shard-size", shard_size, "--max-tokens",
                 MAX_TOKENS, "--temperature", 0)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def story_rows(count: int, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"A story about the number {i} and the sea", "ignore_eos": True}
            for i in range(count)]


def running_on(store, job_id: str, worker_id: str):
    return [s for s in store.shard_records(job_id) if s.state == "running" and s.worker == worker_id]


def check_outputs(table: list[dict], rows: list[dict], reference_llm) -> None:
    expected = reference_texts(reference_llm, [r["prompt"] for r in rows], max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [r["text"] for r in table] == expected
    assert all(r["error"] is None and r["completion_tokens"] == MAX_TOKENS for r in table)


def test_a_worker_killed_mid_shard_loses_no_row(model_alias, start_worker, reference_llm, tmp_path):
    model = model_alias("killed")
    # The killed worker's messages come back once the visibility timeout passes (the one it had taken but not
    # started only then, and one it was taking off the queue, held nowhere, a heartbeat requeues after that); a
    # shard it was running that is done sooner was requeued by a heartbeat (TTL 2 s): any live worker's, since
    # another test's worker may be running, so no worker's log is asserted.
    visibility_timeout_s = 30
    env = {**SLOW, "BATCHGEN_VISIBILITY_TIMEOUT": str(visibility_timeout_s)}
    doomed, survivor = start_worker(model, env=env), start_worker(model, env=env)
    doomed.wait_ready(), survivor.wait_ready()
    rows = story_rows(12, "k")
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, shard_size=2)
    store = job_store()
    lost = wait_until(lambda: running_on(store, job_id, doomed.worker_id), 60, "a shard on the doomed worker")
    killed_at = datetime.now(timezone.utc)
    doomed.kill()

    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 90)
    assert waited.exit_code == 0, f"{store.shard_records(job_id)}\n{survivor.log_text()[-4000:]}"
    table = every_row_once(str(tmp_path / "out"), [r["id"] for r in rows])
    check_outputs(table, rows, reference_llm)
    records = {s.shard_index: s for s in store.shard_records(job_id)}
    written_by = {s.shard_index: s.worker for s in read_shard_stats(str(tmp_path / "out"))}
    for shard in lost:
        assert records[shard.shard_index].attempts >= 2
        assert written_by[shard.shard_index] == survivor.worker_id
        assert records[shard.shard_index].finished_at - killed_at < timedelta(seconds=visibility_timeout_s)


def test_a_shard_whose_message_was_lost_is_queued_again(model_alias, start_worker, reference_llm, tmp_path):
    """A worker killed after taking a message off the queue (BRPOP) and before recording its hold leaves the
    shard's message nowhere, for no visibility timeout to bring back. Here one is taken off the queue by hand
    before any worker starts: the worker's heartbeat finds it missing and, once the visibility timeout has
    passed, queues the shard again. The messages that waited on the queue, or held by the worker, longer than
    that are not sent twice."""
    model = model_alias("lost-message")
    rows = story_rows(12, "m")
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, shard_size=2)
    queue, redis = broker_key(queue_name(model)), job_store().redis
    [lost] = [m for m in redis.lrange(queue, 0, -1) if json.loads(m)["headers"]["argsrepr"] == repr((job_id, 1))]
    assert redis.lrem(queue, 1, lost) == 1
    worker = start_worker(model, env={**SLOW, "BATCHGEN_VISIBILITY_TIMEOUT": "3"}).wait_ready()

    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 60)
    assert waited.exit_code == 0, f"{job_store().shard_records(job_id)}\n{worker.log_text()[-4000:]}"
    table = every_row_once(str(tmp_path / "out"), [r["id"] for r in rows])
    check_outputs(table, rows, reference_llm)
    assert [s.attempts for s in job_store().shard_records(job_id)] == [1] * 6
    assert worker.log_text().count(" received") == 6
    assert f"job {job_id} shard 1: its message was lost; queued again" in worker.log_text()


def test_a_job_without_live_workers_is_stalled_until_one_comes_back(model_alias, start_worker, reference_llm,
                                                                    tmp_path):
    model = model_alias("stalled")
    only = start_worker(model, env=SLOW).wait_ready()
    rows = story_rows(8, "s")
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, shard_size=2)
    store = job_store()
    lost = wait_until(lambda: running_on(store, job_id, only.worker_id), 60, "a shard on the only worker")
    only.kill()

    def stalled() -> bool:
        return json.loads(cli("status", job_id, "--json").output)["stalled"] == \
            f"stalled: no live worker serves model {model!r}"
    wait_until(stalled, 3 * HEARTBEAT_TTL_S, "status to say no live worker serves the job")
    assert f"running  (stalled: no live worker serves model {model!r})" in cli("status", job_id).output
    before = store.get_job(job_id)
    time.sleep(1.0)                                     # nothing moves while nobody serves the job
    assert store.get_job(job_id).rows_done == before.rows_done and before.status == "running"

    back = start_worker(model, env=SLOW).wait_ready()
    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 90)
    assert waited.exit_code == 0, f"{store.shard_records(job_id)}\n{back.log_text()[-4000:]}"
    table = every_row_once(str(tmp_path / "out"), [r["id"] for r in rows])
    check_outputs(table, rows, reference_llm)
    written_by = {s.shard_index: s.worker for s in read_shard_stats(str(tmp_path / "out"))}
    assert {written_by[s.shard_index] for s in lost} == {back.worker_id}
    assert cli("status", job_id, "--json").output.count('"stalled": null') == 1


# -- the rule behind it, on both stores: which shards count as lost, and that each is requeued once ----------

@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryJobStore()
    return RedisJobStore(os.environ["BATCHGEN_REDIS_URL"], prefix=f"{key_prefix()}:unit-{uuid.uuid4().hex}")


def test_lost_shards_are_those_of_silent_or_restarted_workers_and_requeue_once(store, tmp_path):
    spec = JobSpec(input=str(write_jsonl(tmp_path / "in.jsonl", story_rows(10, "u"))), output=str(tmp_path / "o"),
                   shard_size=2)
    spec.input_summary = validate_input(spec)
    store.create_job(spec)
    long_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    store.heartbeat(WorkerInfo(worker_id="alive", host="h", started_at=long_ago))
    for shard, worker in enumerate(["alive", "silent", "restarted", "alive"]):
        store.start_shard(spec.job_id, shard, worker)
    store.complete_shard(spec.job_id, 3, ShardStats(shard_index=3, rows_total=2, rows_ok=2))
    # the same id beats again from a process that started after it took shard 2: a restarted container
    store.heartbeat(WorkerInfo(worker_id="restarted", host="h", started_at=datetime.now(timezone.utc)))
    lost = store.lost_shards()
    assert sorted((job_id, s.shard_index, s.worker) for job_id, s in lost) == [
        (spec.job_id, 1, "silent"), (spec.job_id, 2, "restarted")]

    with ThreadPoolExecutor(8) as pool:          # every worker's reaper at once: each shard requeued once
        won = list(pool.map(lambda pair: store.requeue_shard(pair[0], pair[1].shard_index, pair[1]), lost * 4))
    assert sum(won) == 2 and store.lost_shards() == []
    assert {s.shard_index: s.state for s in store.shard_records(spec.job_id)} == {
        0: "running", 1: "requeued", 2: "requeued", 3: "done"}
    assert store.start_shard(spec.job_id, 1, "alive") == 2                  # taken again: a second attempt
    store.start_shard(spec.job_id, 4, "silent")
    store.cancel_job(spec.job_id)
    [(_, lost_again)] = store.lost_shards(spec.job_id)
    assert not store.requeue_shard(spec.job_id, 4, lost_again)                          # cancelled: stays put


def test_a_shard_without_a_record_is_requeued_once_per_loss(store, tmp_path):
    """A shard no worker started (its message lost on the way) is requeued by one caller; requeued again, from
    that record, by one caller too. A started or done shard is no longer what the callers saw."""
    spec = JobSpec(input=str(write_jsonl(tmp_path / "in.jsonl", story_rows(6, "r"))), output=str(tmp_path / "o"),
                   shard_size=2)
    spec.input_summary = validate_input(spec)
    store.create_job(spec)
    store.start_shard(spec.job_id, 0, "w")
    store.complete_shard(spec.job_id, 0, ShardStats(shard_index=0, rows_total=2, rows_ok=2))
    store.start_shard(spec.job_id, 1, "w")
    assert [(job.job_id, index, record and record.state) for job, index, record in store.pending_shards()] == [
        (spec.job_id, 1, "running"), (spec.job_id, 2, None)]

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda _: store.requeue_shard(spec.job_id, 2, None), range(8))) == 1
    [requeued] = [record for _, index, record in store.pending_shards() if index == 2]
    assert requeued.state == "requeued" and requeued.attempts == 0
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda _: store.requeue_shard(spec.job_id, 2, requeued), range(8))) == 1
    assert not store.requeue_shard(spec.job_id, 2, requeued)
    assert store.start_shard(spec.job_id, 2, "w") == 1 and not store.requeue_shard(spec.job_id, 2, None)
    store.cancel_job(spec.job_id)
    assert store.pending_shards() == []


def test_status_names_shards_whose_worker_is_gone(tmp_path):
    model = f"lost-{uuid.uuid4().hex[:8]}"
    spec = JobSpec(input=str(write_jsonl(tmp_path / "in.jsonl", story_rows(4, "l"))), output=str(tmp_path / "o"),
                   shard_size=2, model=model)
    spec.input_summary = validate_input(spec)
    store = job_store()
    store.create_job(spec)
    store.heartbeat(WorkerInfo(worker_id=f"{model}-alive", host="h", model=model), ttl_s=30)
    store.start_shard(spec.job_id, 1, f"{model}-gone")
    shown = cli("status", spec.job_id, "--shards").output
    assert f"shard(s) 1 lost their worker ({model}-gone); they will be run again" in shown
    assert f"shard     1  running   attempts 1  {model}-gone" in shown
    store.cancel_job(spec.job_id)


def test_a_live_worker_keeps_a_shard_longer_than_the_visibility_timeout(model_alias, start_worker, tmp_path):
    """Its heartbeats renew the messages it holds: the broker never hands the shard to its other thread."""
    model = model_alias("long-shard")
    worker = start_worker(model, env={**SLOW, "BATCHGEN_VISIBILITY_TIMEOUT": "2"}).wait_ready()
    rows = [{"id": "long", "prompt": "A very long story", "ignore_eos": True, "max_tokens": 160}]
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, shard_size=1)
    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 60)
    assert waited.exit_code == 0, worker.log_text()[-3000:]
    [shard] = job_store().shard_records(job_id)
    assert shard.attempts == 1 and shard.stats.wall_seconds > 4            # twice the timeout, never redelivered
    assert worker.log_text().count(" received") == 1
