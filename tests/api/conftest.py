"""The Batch API end to end: a real uvicorn server on a free loopback port (in this process, so its clock can
be moved on), real Redis in this session's key namespace, and one real worker process serving the embedded
default model. Shards of two rows, so a batch of a few rows runs in several shards that a cancel or an
expiry can cut between."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from api_harness import KEYS, MAX_UPLOAD_BYTES, SHARD_SIZE, free_port

WORKER_START_TIMEOUT_S = 240


class MovableClock:
    """time.time(), plus whatever a test moved it on by."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Server:
    url: str
    clock: MovableClock
    app: object

    def client(self, key: str = KEYS[0]):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def worker_process(default_model_dir, tmp_path_factory):
    """One `batchgen worker --model default` process per test module, started (see `worker` for one that is
    ready); heartbeats every second, so a stopped shard shows at once. Stopped with its module: a worker left
    running would take the shards of later tests' jobs on the same queue."""
    log = tmp_path_factory.mktemp("api-worker") / "worker.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "BATCHGEN_HEARTBEAT_TTL": "3"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "worker", "--model", "default",
                                    "--concurrency", "2", "--device", "cpu"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    yield process
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def worker(worker_process):
    """The worker, once its heartbeat says it serves the queue."""
    from batchgen.workers.app import job_store

    worker_id = f"{socket.gethostname()}:{worker_process.pid}"
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while worker_id not in {w.worker_id for w in job_store().live_workers()}:
        if worker_process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start:\n{worker_process.log.read_text()[-4000:]}")
        time.sleep(0.3)
    return worker_process


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    import uvicorn

    from batchgen.api.app import create_app
    from batchgen.api.settings import ApiSettings
    from batchgen.workers.app import job_store

    clock = MovableClock()
    settings = ApiSettings(keys=KEYS, storage=str(tmp_path_factory.mktemp("api-storage")),
                           max_upload_bytes=MAX_UPLOAD_BYTES, models=("default",), model_aliases={"gpt-4o-mini": "default"},
                           shard_size=SHARD_SIZE)
    app = create_app(settings, job_store(), clock=clock, refresh_interval_s=0.2)
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{port}", clock, app)
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
