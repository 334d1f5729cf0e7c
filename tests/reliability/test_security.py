"""Security: credentials never leave the places that need them, models load only from safetensors and without
their own code, and a deployment can pin where jobs read and write. Celery's JSON-only contract (a pickle
message is refused unread) is tested end to end in tests/e2e/test_job_service.py."""
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from batchgen.cli import main
from batchgen.jobs import execute
from batchgen.jobs.errors import JobInputError, JobOutputError
from batchgen.jobs.output_dir import save_spec
from batchgen.jobs.paths import check_roots
from batchgen.jobs.readers import validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.store import MemoryJobStore
from batchgen.workers.app import SHARD_TASK, job_store, key_prefix, make_app, queue_length, queue_name
from harness import cli_process, free_port, reference_texts, store_at, write_jsonl

PLANTED_S3_SECRET = "planted-s3-secret-9c41"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def redis_contents(url: str) -> dict[str, str]:
    """Every key of a Redis database with its value as text (whatever the key's type)."""
    client = redis.Redis.from_url(url, decode_responses=False)
    read = {b"string": client.get, b"hash": client.hgetall, b"list": lambda k: client.lrange(k, 0, -1),
            b"set": client.smembers, b"zset": lambda k: client.zrange(k, 0, -1, withscores=True)}
    return {key.decode(): repr(read[client.type(key)](key)) for key in client.scan_iter(count=1000)}


@pytest.mark.slow   # a real worker process and its own redis-server
def test_no_credentials_in_anything_a_job_leaves_behind(deployment, tmp_path):
    url, closed_port = deployment.redis.url, free_port()
    rows = [{"id": "fine", "prompt": "Hello there"}, {"id": "bad", "prompt": "x", "temperature": -1}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    shown = []                      # everything the CLI printed

    def run(*args) -> str:
        result = cli_process(*args, redis_url=url)
        shown.append(result.stdout + result.stderr)
        return result.stdout.strip()

    options = ["--model", deployment.model, "--max-tokens", 3]
    done = run("submit", inputs, "-o", tmp_path / "done", *options, "--wait")
    s3_input = f"s3://AKIAPLANTED:{PLANTED_S3_SECRET}@bucket/in.jsonl?endpoint_override=127.0.0.1:{closed_port}" \
               "&scheme=http&region=us-east-1"
    run("submit", s3_input, "-o", tmp_path / "refused", *options)
    assert "cannot open" in shown[-1] and "AKIAPLANTED:***@bucket" in shown[-1]
    # Jobs that fail in the worker, registered here directly (as a submitter with access to Redis may) so that
    # they are broken before a worker can take them: one whose output can't be written, one whose input could
    # be read at submit time and no longer can (credentials revoked, object deleted).
    store = store_at(url)

    def register(output: str, input_now: str) -> JobSpec:
        spec = JobSpec(input=str(inputs), output=str(tmp_path / output), model=deployment.model)
        spec.input_summary = validate_input(spec)
        spec.input = input_now
        store.create_job(spec)
        save_spec(spec)
        return spec

    failed = register("failed", str(inputs)).job_id
    (tmp_path / "failed" / "parts").write_text("not a directory")
    spec = register("s3-job", s3_input)
    for job_id in (failed, spec.job_id):
        make_app(url).send_task(SHARD_TASK, (job_id, 0), queue=queue_name(deployment.model))
    for job_id in (failed, spec.job_id):
        run("wait", job_id, "--timeout", 60)
    for job_id in (done, failed, spec.job_id):
        run("status", job_id, "--shards")
        run("status", job_id, "--json")
        assert store.get_job(job_id).status == ("completed" if job_id == done else "failed")
    run("results", done, "--show", 2)
    run("list")
    run("list", "--json")
    assert "cannot open" in store.get_job(spec.job_id).error

    where = {f"cli output {i}": text for i, text in enumerate(shown)}
    where["worker log"] = deployment.worker.log_text()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            where[str(path)] = path.read_bytes().decode(errors="replace")
    stored = redis_contents(url)
    spec_key = f"{key_prefix()}:job:{spec.job_id}:spec"
    assert PLANTED_S3_SECRET in stored.pop(spec_key)       # the one place that keeps it: workers read with it
    where.update({f"redis key {key}": value for key, value in stored.items()})
    assert len(where) > 20 and any("job.json" in name for name in where)
    password = deployment.redis.password
    leaks = [name for name, text in where.items() if password in text or PLANTED_S3_SECRET in text]
    assert leaks == []


def _model_with_pickled_weights(tiny_model: Path, directory: Path) -> Path:
    directory.mkdir()
    for file in tiny_model.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    torch.save(load_file(tiny_model / "model.safetensors"), directory / "pytorch_model.bin")
    return directory


def test_pickled_weights_load_only_when_allowed(tiny_model, reference_llm, tmp_path, monkeypatch):
    model = _model_with_pickled_weights(tiny_model, tmp_path / "pickled")
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Once upon a time"}])
    options = ["--model", model, "--device", "cpu", "--max-tokens", 4, "--temperature", 0, "--engine-arg",
               "num_kv_blocks=64"]
    refused = cli("run", inputs, "-o", tmp_path / "refused", *options)
    assert refused.exit_code == 1 and "has only pickled weights" in refused.output and "Traceback" not in refused.output
    allowed = cli("run", inputs, "-o", tmp_path / "allowed", *options, "--allow-pickle-weights")
    assert allowed.exit_code == 0, allowed.output
    [row] = pq.read_table(str(tmp_path / "allowed")).to_pylist()
    assert row["text"] == reference_texts(reference_llm, ["Once upon a time"], max_tokens=4)[0]

    # the worker command: refused without the flag, and the flag reaches the engine (the worker loop is faked)
    from batchgen.workers import app, tasks
    for name in ("BATCHGEN_MODEL", "BATCHGEN_ENGINE_ARGS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tasks, "_executor", None)
    served = []
    monkeypatch.setattr(app.app, "worker_main", served.append)
    worker_options = ["--model", model, "--device", "cpu", "--engine-arg", "num_kv_blocks=64"]
    refused = cli("worker", *worker_options)
    assert refused.exit_code == 1 and "has only pickled weights" in refused.output and served == []
    assert cli("worker", *worker_options, "--allow-pickle-weights").exit_code == 0 and len(served) == 1
    assert json.loads(os.environ["BATCHGEN_ENGINE_ARGS"])["allow_pickle_weights"] is True


def test_a_model_s_own_code_never_runs(tiny_model, tmp_path):
    """A checkpoint that ships Python (auto_map in its configs) as remote-code models do: with the standard
    tokenizer class named, its code is ignored; with only its own class, the model is refused."""
    model = tmp_path / "custom-code"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "code-ran"
    for name, config_file, auto_map in (
            ("custom_tokenizer.py", "tokenizer_config.json", {"AutoTokenizer": ["custom_tokenizer.Custom", None]}),
            ("custom_model.py", "config.json", {"AutoConfig": "custom_model.Config",
                                                "AutoModelForCausalLM": "custom_model.Model"})):
        (model / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n")
        config = json.loads((model / config_file).read_text())
        (model / config_file).write_text(json.dumps({**config, "auto_map": auto_map}))
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    options = ["--model", model, "--device", "cpu", "--max-tokens", 2, "--engine-arg", "num_kv_blocks=64"]
    assert cli("run", inputs, "-o", tmp_path / "standard", *options).exit_code == 0
    assert not marker.exists()

    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Custom"}))
    result = cli("run", inputs, "-o", tmp_path / "custom", *options)
    assert result.exit_code == 1 and "trust_remote_code" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_job_files_outside_the_configured_roots_are_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "link-out").symlink_to(outside, target_is_directory=True)
    inputs = write_jsonl(data / "in.jsonl", [{"prompt": "hi"}])
    write_jsonl(outside / "in.jsonl", [{"prompt": "hi"}])
    monkeypatch.setenv("BATCHGEN_INPUT_ROOT", str(data))
    monkeypatch.setenv("BATCHGEN_OUTPUT_ROOT", str(data / "jobs"))
    model = f"roots-{uuid.uuid4().hex[:8]}"
    before = queue_length(queue_name(model))
    for file, output, message in (
            (inputs, data / "jobs" / ".." / ".." / "outside" / "out", "the output must lie under BATCHGEN_OUTPUT_ROOT"),
            (inputs, data / "link-out" / "out", "the output must lie under BATCHGEN_OUTPUT_ROOT"),
            (inputs, "/etc/batchgen-out", "the output must lie under BATCHGEN_OUTPUT_ROOT"),
            (data / ".." / "outside" / "in.jsonl", data / "jobs" / "a", "the input must lie under BATCHGEN_INPUT_ROOT"),
            (data / "link-out" / "in.jsonl", data / "jobs" / "b", "the input must lie under BATCHGEN_INPUT_ROOT")):
        result = cli("submit", file, "-o", output, "--model", model)
        assert result.exit_code == 1 and message in result.output, result.output
    assert queue_length(queue_name(model)) == before and list(outside.iterdir()) == [outside / "in.jsonl"]
    accepted = cli("submit", inputs, "-o", data / "jobs" / "ok", "--model", model)
    assert accepted.exit_code == 0 and queue_length(queue_name(model)) == before + 1
    job_store().cancel_job(accepted.stdout.strip())

    # A worker checks again, whoever registered the job: a spec from Redis is not trusted to be in bounds.
    spec = JobSpec(input=str(inputs), output=str(outside / "sneaky"))
    monkeypatch.delenv("BATCHGEN_OUTPUT_ROOT")
    spec.input_summary = validate_input(spec)
    monkeypatch.setenv("BATCHGEN_OUTPUT_ROOT", str(data / "jobs"))
    store = MemoryJobStore()
    store.create_job(spec)
    nothing = execute.Executor(engine=None, tokenizer=None, worker="w")     # never reached
    outcome = execute.run_shard(spec, 0, nothing, store)
    assert outcome.status == "failed" and "must lie under BATCHGEN_OUTPUT_ROOT" in store.get_job(spec.job_id).error
    assert not (outside / "sneaky").exists()

    monkeypatch.setenv("BATCHGEN_OUTPUT_ROOT", "s3://bucket/jobs")
    for output, inside in (("s3://bucket/jobs/a", True), ("s3://key:pw@bucket/jobs/b/c", True),
                           ("s3://bucket/jobs/../secrets", False), ("s3://other/jobs/a", False),
                           ("s3://bucket/jobsx", False), (str(data / "jobs" / "a"), False)):
        probe = JobSpec(input=str(inputs), output=output)
        if inside:
            check_roots(probe)
        else:
            with pytest.raises(JobOutputError, match="BATCHGEN_OUTPUT_ROOT"):
                check_roots(probe)
    with pytest.raises(JobInputError, match="BATCHGEN_INPUT_ROOT"):
        check_roots(JobSpec(input=str(outside / "in.jsonl"), output="s3://bucket/jobs/a"))
