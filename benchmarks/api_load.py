"""Load on the Batch API: N concurrent clients (the official `openai` package, one thread each) that upload a
file, create a batch and poll it, over and over, for a fixed time; prints one JSON line with the number of
requests, errors and the latency percentiles of GET /v1/batches/{id}.

    python benchmarks/api_load.py                        # starts `batchgen serve` on a free loopback port
    python benchmarks/api_load.py --url http://127.0.0.1:8000 --key sk-...

Started by the script, the server uses its own Redis key prefix (removed afterwards) on BATCHGEN_REDIS_URL,
a temporary storage root, and serves model `default` without a worker: batches validate and queue, and the
polls see them in progress, which is what a fleet of waiting clients asks about most.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--key", default="sk-load-test", help="API key (with --url: one the server knows)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--polls-per-batch", type=int, default=20)
    args = parser.parse_args()
    with (nullcontext(args.url.rstrip("/")) if args.url else started_server(args.key)) as url:
        result = run_load(url, args.key, args.clients, args.seconds, args.polls_per_batch)
    print(json.dumps(result))
    if result["errors"]:
        sys.exit(1)


def run_load(url: str, key: str, clients: int, seconds: float, polls_per_batch: int) -> dict:
    import openai

    line = json.dumps({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "default", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 4}}) + "\n"
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"uploads": 0, "creates": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
        mine = []
        try:
            while time.monotonic() < deadline:
                file_id = client.files.create(file=("load.jsonl", line.encode()), purpose="batch").id
                batch_id = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                 completion_window="24h").id
                with lock:
                    counts["uploads"] += 1
                    counts["creates"] += 1
                for _ in range(polls_per_batch):
                    if time.monotonic() >= deadline:
                        break
                    start = time.perf_counter()
                    batch = client.batches.retrieve(batch_id)
                    mine.append(time.perf_counter() - start)
                    if batch.id != batch_id or batch.status in ("failed", "expired"):
                        raise AssertionError(f"batch {batch_id}: {batch.status} {batch.errors}")
        except Exception as exc:  # counted, and the run fails
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()

    def percentile(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2) if latencies else 0

    return {"clients": clients, "seconds": round(elapsed, 1), "batches_created": counts["creates"],
            "get_batch_requests": len(latencies), "get_batch_per_s": round(len(latencies) / elapsed, 1),
            "get_batch_p50_ms": percentile(50), "get_batch_p99_ms": percentile(99),
            "get_batch_max_ms": round(1000 * latencies[-1], 2) if latencies else 0, "errors": len(errors),
            "first_errors": errors[:3]}


@contextmanager
def started_server(key: str):
    """`batchgen serve` on a free loopback port, in a Redis namespace and storage root of its own."""
    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prefix = f"apiload-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as storage:
        env = {**os.environ, "BATCHGEN_PREFIX": prefix, "BATCHGEN_API_KEYS": key, "BATCHGEN_API_STORAGE": storage,
               "BATCHGEN_API_MODELS": "default"}
        server = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "serve", "--port", str(port)], env=env)
        try:
            wait_for_port(port, server)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)
            client = redis.Redis.from_url(os.environ.get("BATCHGEN_REDIS_URL") or "redis://127.0.0.1:6379/0")
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start:start + 500])


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


if __name__ == "__main__":
    main()
