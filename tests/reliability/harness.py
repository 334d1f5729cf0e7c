"""What the reliability tests drive: worker processes, a private redis-server, the CLI as a separate process,
and the checks every scenario makes on a job's output."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_TTL_S = 2.0
VISIBILITY_TIMEOUT_S = 10.0         # a dead worker's messages that never started come back this soon
# The CPU default sizes the KV cache to a quarter of free RAM (up to the engine's CPU_KV_CACHE_CAP) in every worker
# process.
WORKER_KV_BLOCKS = 512
WORKER_START_TIMEOUT_S = 120
FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `condition()` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
    return value


def free_port() -> int:
    """A local TCP port nothing listens on (just now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def store_at(redis_url: str):
    """The job store of the workers on `redis_url` (this session's namespace)."""
    from batchgen.jobs.store import RedisJobStore
    from batchgen.workers.app import key_prefix

    return RedisJobStore(redis_url, prefix=key_prefix())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cli_process(*args, redis_url: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`batchgen ARGS` in a process of its own, talking to `redis_url`."""
    env = {**os.environ, "BATCHGEN_REDIS_URL": redis_url}
    return subprocess.run([sys.executable, "-m", "batchgen.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def every_row_once(output: str, ids: list[str]) -> list[dict]:
    """The job's output rows, checked to be the input's, each exactly once and in input order; stats.json and
    the parts' footers must count the same rows."""
    import pyarrow.parquet as pq

    from batchgen.jobs.output_dir import load_stats, read_shard_stats
    table = pq.read_table(output).to_pylist()
    assert [row["id"] for row in table] == ids
    assert load_stats(output).rows_total == sum(s.rows_total for s in read_shard_stats(output)) == len(ids)
    return table


def reference_texts(llm, prompts: list[str], **sampling) -> list[str]:
    """What greedy decoding on `llm`, in this process, says to each prompt."""
    from batchgen import SamplingParams

    return [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0.0, **sampling))]


@dataclass
class Worker:
    """One `batchgen worker` process (through fault_worker.py, which adds no fault unless asked)."""
    process: subprocess.Popen
    log: Path
    redis_url: str

    @property
    def worker_id(self) -> str:
        """As heartbeats, shard records and shard stats name it."""
        return f"{socket.gethostname()}:{self.process.pid}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> "Worker":
        store = store_at(self.redis_url)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            return any(w.worker_id == self.worker_id for w in store.live_workers())
        wait_until(ready, timeout_s, f"worker {self.worker_id} to start", interval_s=0.2)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, its messages stay unacknowledged, its heartbeat just expires."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        stop_workers([self])


def stop_workers(workers: list[Worker]) -> None:
    """SIGTERM all (a warm shutdown each, in parallel), then wait; a worker that hangs is killed."""
    running = [worker for worker in workers if worker.process.poll() is None]
    for worker in running:
        worker.process.send_signal(signal.SIGTERM)
    for worker in running:
        try:
            worker.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


def start_worker_process(model: str, log: Path, redis_url: str, args=(), env: dict | None = None,
                         file_size_limit: int | None = None) -> Worker:
    """Start a worker serving `model` on CPU (not yet ready: start several, then wait_ready each, so their
    start-ups overlap). `file_size_limit` caps the size of any file it writes (RLIMIT_FSIZE): a full disk."""
    import resource

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "BATCHGEN_REDIS_URL": redis_url,
                   "BATCHGEN_HEARTBEAT_TTL": str(HEARTBEAT_TTL_S),
                   "BATCHGEN_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S), **(env or {})}

    def limit_file_size():
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(FAULT_WORKER), "--model", model, "--device", "cpu", "--concurrency", "2",
             "--engine-arg", f"num_kv_blocks={WORKER_KV_BLOCKS}", *args],
            env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=limit_file_size)
    return Worker(process, log, redis_url)


class RedisServer:
    """A redis-server of the test's own on a free port, to restart or to protect with a password. It keeps an
    append-only file in `directory`, as the compose file's Redis does, so a restart loses nothing; `wipe`
    removes it, as a restart of a Redis without persistence would."""

    def __init__(self, directory: Path, password: str | None = None):
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes"]
        if self.password:
            args += ["--requirepass", self.password]
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)

        def up() -> bool:
            try:
                return client.ping()
            except redis.ConnectionError:
                return False
        wait_until(up, 20, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        """SIGTERM: Redis shuts down cleanly, writing out its append-only file."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)

    def wipe(self) -> None:
        shutil.rmtree(self.directory / "appendonlydir", ignore_errors=True)
