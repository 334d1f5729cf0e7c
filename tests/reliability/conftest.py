"""Reliability suite set-up: real Redis (the shared server on 127.0.0.1:6379 in this session's key namespace, or
a private redis-server that a test starts, restarts and protects with a password) and real worker processes
on a tiny random-weight model, which the tests start, kill and restart (harness.py). Heartbeats expire after
2 s, so a dead worker is noticed in seconds; each test serves its own alias of the model, so it has a queue to
itself.

The namespace guard is the one in tests/workers/conftest.py: whichever directory loads first names it."""
import os
import uuid
from pathlib import Path

import pytest

os.environ["BATCHGEN_REDIS_URL"] = "redis://127.0.0.1:6379/0"
if not os.environ.get("BATCHGEN_PREFIX", "").startswith("bgtest-"):
    os.environ["BATCHGEN_PREFIX"] = f"bgtest-{uuid.uuid4().hex[:12]}"

from harness import WORKER_KV_BLOCKS, Worker, start_worker_process  # noqa: E402  (after the namespace is set)


@pytest.fixture(scope="session", autouse=True)
def _clean_redis_namespace():
    """Drop every key this session wrote on the shared Redis (job store and Celery's) when it ends."""
    yield
    import redis

    client = redis.Redis.from_url(os.environ["BATCHGEN_REDIS_URL"])
    keys = list(client.scan_iter(match=os.environ["BATCHGEN_PREFIX"] + ":*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture
def model_alias(tiny_model, tmp_path):
    """model_alias(name) -> the tiny model under a path of its own: workers serving it take only the jobs
    submitted for it (the queue is named for the model)."""
    def alias(name: str) -> str:
        path = tmp_path / "models" / name
        path.parent.mkdir(exist_ok=True)
        path.symlink_to(tiny_model, target_is_directory=True)
        return str(path)
    return alias


@pytest.fixture
def start_worker(tmp_path):
    """start_worker(model, *worker_args, redis_url=None, env=None, file_size_limit=None) -> Worker, not yet
    ready (see harness.start_worker_process). Workers still running when the test ends are stopped."""
    started: list[Worker] = []

    def start(model: str, *args: str, redis_url: str | None = None, **options) -> Worker:
        log = tmp_path / f"worker-{len(started)}.log"
        started.append(start_worker_process(model, log, redis_url or os.environ["BATCHGEN_REDIS_URL"], args,
                                            **options))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def reference_llm(tiny_model):
    """The tiny model in this process: the outputs a job's rows must have (greedy decoding)."""
    from batchgen import LLM

    return LLM(str(tiny_model), device="cpu", num_kv_blocks=WORKER_KV_BLOCKS)
