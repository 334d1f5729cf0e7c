"""The CLI without workers: submit-time refusals leave Redis untouched, the job commands on a job no worker
serves (so it stays put), user errors as one line, and `results` on an output directory."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import EXIT_CANCELLED, main
from batchgen.jobs import execute
from batchgen.jobs.output_dir import load_spec, save_spec
from batchgen.jobs.readers import validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.workers.app import job_store, queue_length, queue_name

UNSERVED_MODEL = "cli-test-model"


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def prompts_file(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(count)))
    return path


def bad_input(directory: Path, kind: str) -> Path:
    """An input that can't be a job as a whole."""
    names = {"no-prompt-column": "in.parquet", "binary": "in.bin", "missing": "gone.jsonl"}
    contents = {"empty": b"", "binary": b"\x00\x01 binary", "every-row-invalid": b'{"prompt": 5}\n[1]\n'}
    path = directory / names.get(kind, "in.jsonl")
    if kind == "no-prompt-column":
        pq.write_table(pa.table({"body": ["no prompt column here"]}), path)
    elif kind != "missing":
        path.write_bytes(contents[kind])
    return path


@pytest.mark.parametrize("kind, extra, message", [
    ("empty", [], "empty file"),
    ("no-prompt-column", [], "no prompt column 'prompt'"),
    ("no-prompt-column", ["--template", "Sum up {text}"], "template placeholder {text} is not a column"),
    ("binary", [], "unknown format"),
    ("every-row-invalid", [], "no valid rows"),
    ("missing", [], "no such file"),
])
def test_refused_file_enqueues_nothing(tmp_path, kind, extra, message):
    path = bad_input(tmp_path, kind)
    queue = queue_name(UNSERVED_MODEL)
    before_jobs, before_queue = len(job_store().list_jobs()), queue_length(queue)
    result = cli("submit", path, "--model", UNSERVED_MODEL, "--output", tmp_path / "out", *extra)
    assert result.exit_code == 1 and message in result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert queue_length(queue) == before_queue and len(job_store().list_jobs()) == before_jobs
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--temperature", "-1"], 2, "--temperature"),
    (["--schema", "{schema}", "--json"], 2, "--schema or --json"),
    (["--schema", "{bad_schema}"], 1, "invalid JSON schema"),
    (["--keep-columns", "text"], 1, "would shadow output columns"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, code, message):
    (tmp_path / "schema.json").write_text('{"type": "object"}')
    (tmp_path / "bad.json").write_text('{"type": "no-such-type"}')
    args = [a.format(schema=tmp_path / "schema.json", bad_schema=tmp_path / "bad.json") for a in args]
    result = cli("submit", prompts_file(tmp_path / "in.jsonl", 2), "--model", UNSERVED_MODEL, "-o", tmp_path / "o",
                 *args)
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output


def test_job_commands_on_a_queued_job(tmp_path):
    path = prompts_file(tmp_path / "in.jsonl", 5)
    queue = queue_name(UNSERVED_MODEL)
    before = queue_length(queue)
    result = cli("submit", path, "--model", UNSERVED_MODEL, "-o", tmp_path / "out", "--shard-size", "2",
                 "--max-tokens", "3", "--temperature", "0", "--cache-salt", "tenant-a")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert queue_length(queue) == before + 3
    spec = job_store().get_spec(job_id)
    assert spec.cache_salt == "tenant-a" and load_spec(str(tmp_path / "out")).cache_salt == "tenant-a"
    assert spec.sampling == {"max_tokens": 3, "temperature": 0.0} and spec.shard_size == 2
    assert "no worker serves model" in result.stderr

    status = cli("status", job_id)
    assert status.exit_code == 0 and "queued" in status.output and "0/5 (0 failed)" in status.output
    assert "stalled: no live worker serves model 'cli-test-model'" in status.output
    assert json.loads(cli("status", job_id, "--json").output)["status"] == "queued"
    listed = {job["job_id"]: job for job in json.loads(cli("list", "--json").output)}
    assert listed[job_id]["shards_total"] == 3
    assert any(line.startswith(job_id) and "queued" in line for line in cli("list").output.splitlines())

    again = cli("submit", path, "--model", UNSERVED_MODEL, "-o", tmp_path / "out")
    assert again.exit_code == 1 and "already holds a job's output" in again.output

    assert cli("wait", job_id, "--timeout", "0.2", "--interval", "0.1").exit_code == 4
    cancelled = cli("cancel", job_id)
    assert cancelled.exit_code == 0 and "0 of 3 shards had finished" in cancelled.output
    assert cli("wait", job_id).exit_code == EXIT_CANCELLED
    assert cli("status", job_id, "--json").output.count('"cancelled"') == 1
    assert "already cancelled" in cli("cancel", job_id).output

    resumed = cli("resume", job_id)
    assert resumed.exit_code == 0 and "3 shard(s) queued" in resumed.output
    assert queue_length(queue) == before + 6 and job_store().get_job(job_id).status == "queued"
    assert "only failed or cancelled" in cli("resume", job_id).output
    job_store().cancel_job(job_id)


def test_unknown_job_is_a_one_line_error():
    for command in ("status", "wait", "cancel", "resume", "results"):
        result = cli(command, "no-such-job-000")
        assert result.exit_code == 1 and "no job" in result.output and "Traceback" not in result.output


def test_results_of_an_output_directory(tmp_path):
    from test_execute import executor

    path = prompts_file(tmp_path / "in.jsonl", 5)
    spec = JobSpec(input=str(path), output=str(tmp_path / "out"), shard_size=2)
    spec.input_summary = validate_input(spec)
    save_spec(spec)
    execute.run_job_locally(spec, executor())
    result = cli("results", tmp_path / "out", "--show", "3", "--shards")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(spec.output).to_pylist()
    assert "rows               5 (5 ok, 0 failed)" in result.output and "(3 part(s))" in result.output
    for row in rows[:3]:
        assert f"[{row['id']}] {row['prompt_tokens']} prompt + {row['completion_tokens']} completion tokens" \
            in result.output
        assert "\n  " + row["text"] + "\n" in result.output + "\n"
    assert f"[{rows[3]['id']}]" not in result.output


def test_results_and_resume_of_an_output_written_the_old_way(tmp_path):
    """job.json and stats.json beside parts/ (before .batchgen/): `results` reads them, and `resume` brings the
    job back from that job.json when Redis no longer knows it."""
    from test_execute import executor

    path = prompts_file(tmp_path / "in.jsonl", 5)
    spec = JobSpec(input=str(path), output=str(tmp_path / "out"), shard_size=2, model=UNSERVED_MODEL)
    spec.input_summary = validate_input(spec)
    save_spec(spec)
    execute.run_job_locally(spec, executor())
    for name in ("job.json", "stats.json"):
        (tmp_path / "out" / ".batchgen" / name).rename(tmp_path / "out" / name)
    (tmp_path / "out" / ".batchgen").rmdir()
    result = cli("results", tmp_path / "out")
    assert result.exit_code == 0 and "rows               5 (5 ok, 0 failed)" in result.output, result.output
    assert "has not finished" not in result.output

    queue = queue_name(UNSERVED_MODEL)
    before = queue_length(queue)
    resumed = cli("resume", tmp_path / "out")
    assert resumed.exit_code == 0 and f"resumed {spec.job_id}: 3 shard(s) queued" in resumed.output, resumed.output
    assert queue_length(queue) == before + 3 and job_store().get_job(spec.job_id).status == "queued"
    job_store().cancel_job(spec.job_id)
