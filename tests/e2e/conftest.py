"""End-to-end set-up: real Redis on 127.0.0.1:6379 in a key namespace of this session (BATCHGEN_PREFIX, set
by tests/conftest.py before batchgen.workers is imported), and two real worker
processes serving the embedded default model, started once per session and shared by every test."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


WORKER_START_TIMEOUT_S = 240



@dataclass
class Workers:
    processes: list[subprocess.Popen]
    logs: list[Path]

    @property
    def ids(self) -> set[str]:
        """Worker ids as the shard stats name them (host:pid)."""
        import socket
        return {f"{socket.gethostname()}:{p.pid}" for p in self.processes}

    def log_text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)

    def wait_idle(self, timeout_s: float = 120) -> None:
        """Until the default model's queue is empty and no worker runs a shard."""
        from batchgen.workers.app import job_store, queue_length, queue_name

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = [w for w in job_store().live_workers() if w.job_id is not None]
            if queue_length(queue_name("default")) == 0 and not busy:
                return
            time.sleep(0.2)
        raise AssertionError("workers still busy")


@pytest.fixture(scope="session")
def workers(default_model_dir, tmp_path_factory) -> Workers:
    """Two `batchgen worker --model default` processes (one torch thread each: the CI machine has two cores)."""
    from batchgen.workers.app import job_store

    log_dir = tmp_path_factory.mktemp("worker-logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes, logs = [], []
    for i in range(2):
        logs.append(log_dir / f"worker-{i}.log")
        with open(logs[-1], "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "batchgen.cli", "worker", "--model", "default", "--concurrency", "2",
                 "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    pool = Workers(processes, logs)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while {w.worker_id for w in job_store().live_workers()} < pool.ids:
            dead = [p for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"workers did not start:\n{pool.log_text()[-4000:]}")
            time.sleep(0.5)
        yield pool
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
