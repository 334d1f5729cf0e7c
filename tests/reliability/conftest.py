"""Reliability suite set-up: real Redis (the shared server on 127.0.0.1:6379 in this session's key namespace, or
a private redis-server that a test starts, restarts and protects with a password) and real worker processes
on a tiny random-weight model, which the tests start, kill and restart (harness.py). Heartbeats expire after
2 s and unacknowledged messages after 10 s, so a dead worker's shards come back in seconds; each test serves
its own alias of the model, so it has a queue to itself.

The session's key namespace (BATCHGEN_PREFIX) is set by tests/conftest.py, as for every suite."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest


from harness import WORKER_KV_BLOCKS, RedisServer, Worker, start_worker_process, stop_workers  # noqa: E402

PLANTED_REDIS_PASSWORD = "planted-redis-password-7f3a"     # test_security looks for it everywhere



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
    stop_workers(started)


@pytest.fixture(scope="session")
def reference_llm(tiny_model):
    """The tiny model in this process: the outputs a job's rows must have (greedy decoding)."""
    from batchgen import LLM

    return LLM(str(tiny_model), device="cpu", num_kv_blocks=WORKER_KV_BLOCKS)


@dataclass
class Deployment:
    redis: RedisServer
    worker: Worker
    model: str


@pytest.fixture(scope="session")
def deployment(tiny_model, tmp_path_factory):
    """A password-protected redis-server of the suite's own (to restart, and to look for the password in
    everything a job leaves behind) and one worker on it, slowed to ~50 ms a step so jobs span an outage."""
    root = tmp_path_factory.mktemp("deployment")
    server = RedisServer(root / "redis", password=PLANTED_REDIS_PASSWORD).start()
    model = root / "private-model"
    model.symlink_to(tiny_model, target_is_directory=True)
    worker = start_worker_process(str(model), root / "worker.log", server.url, env={"FAULT_STEP_DELAY_S": "0.05"})
    try:
        yield Deployment(server, worker.wait_ready(), str(model))
    finally:
        worker.stop()
        server.stop()
