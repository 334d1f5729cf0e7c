"""Memory of a million-row job on the queue: does a worker's peak RSS stay flat however many rows a job has?

Builds a 2-layer random-weight Llama (dummy weights, the default model's tokenizer), writes N tiny JSONL rows
({"id": "r17", "prompt": "hi 17"}), starts a private redis-server (no persistence) and one worker on CPU,
submits the job (max_tokens 1), waits for it, checks that the output holds every row, and prints one JSON line:
rows, wall time, the worker's peak RSS (VmHWM) and its RSS once the model was loaded, submit's peak RSS.

    python benchmarks/memory_1m_rows.py                              # 1,000,000 rows, about 40 min on 2 cores
    python benchmarks/memory_1m_rows.py --rows 20000 --kv-cache-bytes 0     # the engine's default KV budget

The KV cache is capped (--kv-cache-bytes, default 200 MB) because the CPU default, a quarter of free RAM up to
the engine's CPU_KV_CACHE_CAP, is allocated up front and would dominate the figure.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1,
              "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--kv-cache-bytes", type=int, default=200_000_000, help="0: the engine's CPU default")
    parser.add_argument("--workdir", help="where the model, input and output go (default: a temp dir, removed)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="batchgen-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps(measure(args.rows, args.kv_cache_bytes, workdir)), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def measure(num_rows: int, kv_cache_bytes: int, workdir: Path) -> dict:
    from batchgen.default_model import ensure_default_model

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()      # the code the worker loads, before anyone commits

    model = workdir / "tiny-llama"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    for name in TOKENIZER_FILES:
        shutil.copy(ensure_default_model() / name, model / name)
    rows = workdir / "rows.jsonl"
    with open(rows, "w") as out:
        for start in range(0, num_rows, 100_000):
            out.write("".join(f'{{"id": "r{i}", "prompt": "hi {i}"}}\n' for i in range(start, min(start + 100_000,
                                                                                              num_rows))))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BATCHGEN_REDIS_URL": f"redis://127.0.0.1:{port}/0", "BATCHGEN_PREFIX": "memory-bench"}
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    engine_args = ["--engine-arg", "load_format=dummy"]
    if kv_cache_bytes:
        engine_args += ["--engine-arg", f"kv_cache_bytes={kv_cache_bytes}"]
    worker = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "worker", "--model", str(model), "--device",
                               "cpu", *engine_args], env=env, stdout=open(workdir / "worker.log", "wb"),
                              stderr=subprocess.STDOUT)
    try:
        time.sleep(1)
        started = time.monotonic()
        submitted = subprocess.run([sys.executable, "-m", "batchgen.cli", "submit", str(rows), "--model", str(model),
                                    "-o", str(workdir / "out"), "--max-tokens", "1"], env=env, capture_output=True,
                                   text=True, check=True)
        submit_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        job_id = submitted.stdout.strip()
        after_load = _wait_for_worker(worker, workdir)
        status = _wait_for_job(job_id, env)
        wall = time.monotonic() - started
        worker_peak = _proc_status(worker.pid)["VmHWM"]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        redis.terminate()
        redis.wait()
    stats = json.loads((workdir / "out" / ".batchgen" / "stats.json").read_text()) if status == "completed" else {}
    return {"benchmark": "memory_1m_rows", "rows": num_rows, "status": status,
            "rows_out": stats.get("rows_total"), "rows_failed": stats.get("rows_failed"),
            "worker_peak_rss_bytes": worker_peak, "worker_rss_after_load_bytes": after_load,
            "submit_peak_rss_bytes": submit_peak, "wall_s": round(wall, 1), "rows_per_s": round(num_rows / wall, 1),
            "kv_cache_bytes": kv_cache_bytes or "default", "machine": f"{platform.node()} {os.cpu_count()} cpu",
            "commit": commit}


def _proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/PID/status, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _wait_for_worker(worker: subprocess.Popen, workdir: Path) -> int:
    """The worker's RSS once its model is loaded and it serves the queue."""
    while b" ready." not in (workdir / "worker.log").read_bytes():
        if worker.poll() is not None:
            raise RuntimeError((workdir / "worker.log").read_text()[-3000:])
        time.sleep(0.5)
    return _proc_status(worker.pid)["VmRSS"]


def _wait_for_job(job_id: str, env: dict) -> str:
    os.environ.update(BATCHGEN_REDIS_URL=env["BATCHGEN_REDIS_URL"], BATCHGEN_PREFIX=env["BATCHGEN_PREFIX"])
    from batchgen.workers.app import job_store

    store, last = job_store(), 0.0
    while not (record := store.get_job(job_id)).finished:
        if time.monotonic() - last > 60:
            print(f"{record.rows_done:,}/{record.rows_total:,} rows", file=sys.stderr, flush=True)
            last = time.monotonic()
        time.sleep(2)
    return record.status


if __name__ == "__main__":
    main()
