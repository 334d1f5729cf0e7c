"""The job registry: the same test functions run against real Redis (127.0.0.1:6379, a fresh key prefix per
test) and the in-memory twin. Exactly-once rules are raced from threads."""
import socket
import subprocess
import threading
import time
import uuid

import pytest
import redis

from batchgen.jobs.spec import InputSummary, JobSpec
from batchgen.jobs.stats import ShardStats
from batchgen.jobs.store import MemoryJobStore, RedisJobStore, WorkerInfo, redis_client


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryJobStore()
        return
    prefix = f"batchgen-test-{uuid.uuid4().hex}"
    store = RedisJobStore("redis://127.0.0.1:6379/0", prefix=prefix)
    yield store
    keys = list(store.redis.scan_iter(match=prefix + "*"))
    if keys:
        store.redis.delete(*keys)


def make_spec(num_rows=10, shard_size=3, **fields) -> JobSpec:
    spec = JobSpec(**{"input": "/data/in.jsonl", "output": "/data/out", "shard_size": shard_size, **fields})
    spec.input_summary = InputSummary(input_format="jsonl", num_rows=num_rows, num_invalid_rows=0, input_size=1,
                                      shard_size=shard_size)
    return spec


def shard_stats(index: int, rows=3, failed=1) -> ShardStats:
    return ShardStats(shard_index=index, rows_total=rows, rows_ok=rows - failed, rows_failed=failed,
                      prompt_tokens=10 * rows, completion_tokens=5 * rows, wall_seconds=1.0, worker=f"w{index}")


def test_job_lifecycle(store):
    spec = make_spec(num_rows=10, shard_size=3)              # 4 shards: 3 + 3 + 3 + 1
    assert store.create_job(spec) and not store.create_job(spec)
    job = store.get_job(spec.job_id)
    assert (job.status, job.shards_total, job.rows_total, job.shards_done) == ("queued", 4, 10, 0)
    assert store.get_spec(spec.job_id) == spec

    assert store.start_shard(spec.job_id, 0, "w0") == 1
    assert store.start_shard(spec.job_id, 0, "w9") == 2              # redelivered: second attempt
    job = store.get_job(spec.job_id)
    assert job.status == "running" and job.started_at is not None
    assert store.complete_shard(spec.job_id, 0, shard_stats(0))
    assert not store.complete_shard(spec.job_id, 0, shard_stats(0))  # a repeat never counts twice
    assert store.start_shard(spec.job_id, 0, "w1") is None           # done shards don't run again
    assert not store.claim_finalize(spec.job_id)

    for index, rows in ((1, 3), (2, 3), (3, 1)):
        store.start_shard(spec.job_id, index, f"w{index}")
        assert store.complete_shard(spec.job_id, index, shard_stats(index, rows=rows, failed=0))
    job = store.get_job(spec.job_id)
    assert (job.shards_done, job.rows_done, job.rows_failed) == (4, 10, 1)
    assert (job.prompt_tokens, job.completion_tokens) == (100, 50)
    records = store.shard_records(spec.job_id)
    assert [(r.shard_index, r.state, r.attempts) for r in records] == [(0, "done", 2), (1, "done", 1),
                                                                       (2, "done", 1), (3, "done", 1)]
    assert records[0].stats == shard_stats(0)

    assert store.claim_finalize(spec.job_id) and not store.claim_finalize(spec.job_id)
    assert store.finish_job(spec.job_id, "completed")
    job = store.get_job(spec.job_id)
    assert job.status == "completed" and job.finished and job.finished_at is not None
    assert not store.cancel_job(spec.job_id) and not store.finish_job(spec.job_id, "failed")
    assert [j.job_id for j in store.list_jobs()] == [spec.job_id]


def test_shards_count_exactly_once_under_races(store):
    spec = make_spec(num_rows=6, shard_size=3)
    store.create_job(spec)
    barrier = threading.Barrier(8)
    counted, claimed = [], []

    def worker(n: int) -> None:
        barrier.wait()
        for index in (0, 1):
            store.start_shard(spec.job_id, index, f"w{n}")
            counted.append(store.complete_shard(spec.job_id, index, shard_stats(index)))
            claimed.append(store.claim_finalize(spec.job_id))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counted.count(True) == 2 and claimed.count(True) == 1
    job = store.get_job(spec.job_id)
    assert (job.shards_done, job.rows_done, job.rows_failed) == (2, 6, 2)


def test_cancel_stops_new_shards_and_keeps_finished_ones(store):
    spec = make_spec(num_rows=9, shard_size=3)
    store.create_job(spec)
    store.start_shard(spec.job_id, 0, "w0")
    store.start_shard(spec.job_id, 1, "w1")
    assert store.complete_shard(spec.job_id, 0, shard_stats(0))
    assert not store.is_cancelled(spec.job_id)
    assert store.cancel_job(spec.job_id) and not store.cancel_job(spec.job_id)
    assert store.is_cancelled(spec.job_id)
    assert store.start_shard(spec.job_id, 2, "w2") is None
    assert store.complete_shard(spec.job_id, 1, shard_stats(1))        # was running: its part counts
    job = store.get_job(spec.job_id)
    assert (job.status, job.shards_done, job.cancel_requested) == ("cancelled", 2, True)
    assert not store.claim_finalize(spec.job_id) and not store.finish_job(spec.job_id, "completed")

    assert store.resume_job(spec.job_id)
    job = store.get_job(spec.job_id)
    assert (job.status, job.shards_done, job.cancel_requested, job.finished_at) == ("queued", 2, False, None)
    assert store.start_shard(spec.job_id, 1, "w1") is None             # still done
    assert store.start_shard(spec.job_id, 2, "w2") == 1
    assert store.complete_shard(spec.job_id, 2, shard_stats(2))
    assert store.claim_finalize(spec.job_id)


def test_failed_job_and_resume(store):
    spec = make_spec()
    store.create_job(spec)
    assert not store.resume_job(spec.job_id)                          # queued: nothing to resume
    assert store.finish_job(spec.job_id, "failed", "cannot write /out: No space left on device")
    job = store.get_job(spec.job_id)
    assert (job.status, job.error) == ("failed", "cannot write /out: No space left on device")
    assert store.start_shard(spec.job_id, 0, "w") is None
    assert store.resume_job(spec.job_id)
    assert store.get_job(spec.job_id).error is None
    assert store.start_shard(spec.job_id, 0, "w") == 1


def test_unknown_job(store):
    assert store.get_job("nope") is None and store.get_spec("nope") is None
    assert store.start_shard("nope", 0, "w") is None
    assert not store.complete_shard("nope", 0, shard_stats(0))
    assert not store.cancel_job("nope") and not store.claim_finalize("nope") and not store.is_cancelled("nope")
    assert store.list_jobs() == [] and store.shard_records("nope") == []


def test_jobs_list_oldest_first(store):
    specs = [make_spec() for _ in range(3)]
    for spec in reversed(specs):
        store.create_job(spec)
    assert [j.job_id for j in store.list_jobs()] == [s.job_id for s in specs]


def test_heartbeats_expire(store):
    store.heartbeat(WorkerInfo(worker_id="gpu0", host="h", gpu="0", model="m", job_id="j", shard_index=3), ttl_s=0.3)
    store.heartbeat(WorkerInfo(worker_id="gpu1", host="h", gpu="1"), ttl_s=30)
    live = store.live_workers()
    assert [(w.worker_id, w.shard_index) for w in live] == [("gpu0", 3), ("gpu1", None)]
    assert all(w.seen_at is not None for w in live)
    time.sleep(0.5)
    assert [w.worker_id for w in store.live_workers()] == ["gpu1"]


def test_scheduled_inputs_are_claimed_once(store):
    assert store.claim_input("nightly", "/in/a.jsonl:120:1700000000")
    assert not store.claim_input("nightly", "/in/a.jsonl:120:1700000000")
    assert store.claim_input("nightly", "/in/b.jsonl:99:1700000000")
    assert store.claim_input("hourly", "/in/a.jsonl:120:1700000000")


def test_records_carry_no_credentials(store):
    spec = make_spec(output="s3://AKIAKEY:very-secret@bucket/out")
    store.create_job(spec)
    job = store.get_job(spec.job_id)
    assert "very-secret" not in job.model_dump_json() and job.output == "s3://AKIAKEY:***@bucket/out"
    assert store.get_spec(spec.job_id).output == spec.output         # workers still get the real one


# -- Redis connection behaviour, on a redis-server of the test's own --------------------------------------

@pytest.fixture
def own_redis(tmp_path):
    """start(password) -> port; starts (or restarts on the same port and data dir) a private redis-server."""
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    port_holder.close()
    servers = []

    def start(password: str) -> int:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(tmp_path), "--requirepass", password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append(server)
        client = redis.Redis(port=port, password=password, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                return port
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    yield start
    for server in servers:
        server.terminate()
        server.wait()


def test_password_url_works_and_is_never_shown(own_redis):
    port = own_redis("pa55-word")
    store = RedisJobStore(f"redis://:pa55-word@127.0.0.1:{port}/0", prefix="t")
    spec = make_spec()
    assert store.create_job(spec) and store.get_job(spec.job_id).status == "queued"
    assert "pa55-word" not in repr(store)
    wrong = RedisJobStore(f"redis://:not-it@127.0.0.1:{port}/0", prefix="t")
    with pytest.raises(redis.AuthenticationError) as info:
        wrong.get_job(spec.job_id)
    assert "not-it" not in str(info.value)
    tls = redis_client("rediss://:pa55-word@redis.example:6380/0")
    assert tls.connection_pool.connection_class is redis.SSLConnection


def test_store_rides_out_a_redis_restart(own_redis):
    port = own_redis("pw")
    store = RedisJobStore(f"redis://:pw@127.0.0.1:{port}/0", prefix="t")
    spec = make_spec(num_rows=6, shard_size=3)
    store.create_job(spec)
    assert store.start_shard(spec.job_id, 0, "w0") == 1
    subprocess.run(["redis-cli", "-p", str(port), "-a", "pw", "--no-auth-warning", "shutdown"], check=False)
    restarter = threading.Timer(0.5, own_redis, args=("pw",))
    restarter.start()
    started = time.monotonic()
    assert store.complete_shard(spec.job_id, 0, shard_stats(0))      # retried until the server is back
    assert time.monotonic() - started > 0.3                          # it really waited out the outage
    restarter.join()
    job = store.get_job(spec.job_id)
    assert (job.status, job.shards_done, job.rows_done) == ("running", 1, 3)
