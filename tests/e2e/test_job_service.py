"""The job service end to end: files submitted through the CLI, shards run by two real worker processes on
the embedded default model, outputs checked row by row against the input, the tokenizer and an in-process
`batchgen run` of the same file (greedy decoding, so the same rows must say the same thing)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import EXIT_CANCELLED, main
from batchgen.jobs.output_dir import list_parts, load_stats, read_shard_stats
from batchgen.workers.app import app, job_store, queue_length, queue_name

pytestmark = pytest.mark.slow   # two real worker processes on the default model

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
GREEDY = ["--temperature", "0"]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def submit_and_wait(path, output, *options, expect=0) -> str:
    submitted = cli("submit", path, "-o", output, "--model", "default", *options)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    waited = cli("wait", job_id, "--interval", "0.2", "--timeout", "180")
    assert waited.exit_code == expect, waited.output
    return job_id


def check_stats_agree(output: str, table: list[dict]) -> None:
    """stats.json against the rows themselves, and against the per-shard stats in the parts' footers."""
    stats = load_stats(output)
    ok = [r for r in table if r["error"] is None]
    assert (stats.rows_total, stats.rows_ok, stats.rows_failed) == (len(table), len(ok), len(table) - len(ok))
    assert stats.prompt_tokens == sum(r["prompt_tokens"] for r in ok)
    assert stats.completion_tokens == sum(r["completion_tokens"] for r in ok)
    shards = read_shard_stats(output)
    assert stats.shards == shards and [s.shard_index for s in shards] == list(range(len(shards)))
    assert sum(s.rows_total for s in shards) == len(table)
    assert stats.wall_seconds > 0 and stats.output_tokens_per_s == pytest.approx(
        stats.completion_tokens / stats.wall_seconds)
    assert stats.model == "default" and stats.dtype == "float32"


def test_pickle_message_is_refused_unread(workers, tmp_path):
    """A task message in pickle format never reaches the unpickler: the payload would create a directory."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    queue = queue_name("default")
    task_id = str(uuid.uuid4())
    with app.producer_or_acquire() as producer:
        producer.publish(pickle.dumps(((Payload(),), {}, {"callbacks": None})), routing_key=queue, exchange="",
                         content_type="application/x-python-serialize", content_encoding="binary",
                         headers={"lang": "py", "task": "batchgen.run_shard", "id": task_id, "root_id": task_id,
                                  "argsrepr": "()", "kwargsrepr": "{}"})
    deadline = time.monotonic() + 30
    while "Refusing to deserialize untrusted content of type pickle" not in workers.log_text():
        assert time.monotonic() < deadline, workers.log_text()[-3000:]
        time.sleep(0.2)
    workers.wait_idle()
    assert not marker.exists() and queue_length(queue) == 0


def test_two_workers_share_a_job_of_many_shards(workers, tmp_path):
    workers.wait_idle()
    rows = [{"id": f"row-{i:02d}", "prompt": f"Number {i} is"} for i in range(16)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    submit_and_wait(path, tmp_path / "out", "--shard-size", "1", "--max-tokens", "2", *GREEDY)

    table = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in rows]          # every row once, in input order
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in table)
    writers = {s.worker for s in read_shard_stats(str(tmp_path / "out"))}
    assert writers == workers.ids                                       # both workers took shards
    check_stats_agree(str(tmp_path / "out"), table)


def test_jsonl_job_matches_a_local_run(workers, tmp_path):
    options = ["--max-tokens", "4", "--shard-size", "3", *GREEDY]
    local = cli("run", SAMPLES / "chat.jsonl", "-o", tmp_path / "local", *options, "--device", "cpu")
    assert local.exit_code == 0, local.output
    assert f"output: {tmp_path / 'local'}/parts/" in local.stdout and f"stats:  {tmp_path / 'local'}/.batchgen/stats.json" \
        in local.stdout

    submit_and_wait(SAMPLES / "chat.jsonl", tmp_path / "queued", *options)
    queued = pq.read_table(str(tmp_path / "queued")).to_pylist()
    expected = pq.read_table(str(tmp_path / "local")).to_pylist()
    ids = [json.loads(line)["id"] for line in (SAMPLES / "chat.jsonl").read_text().splitlines()]
    assert [r["id"] for r in queued] == ids
    columns = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error")
    assert [{c: r[c] for c in columns} for r in queued] == [{c: r[c] for c in columns} for r in expected]
    assert all(r["text"] and r["completion_tokens"] == 4 for r in queued)
    check_stats_agree(str(tmp_path / "queued"), queued)
    check_stats_agree(str(tmp_path / "local"), expected)
    shown = cli("results", tmp_path / "local", "--show", "4")                # what `make demo` prints
    assert shown.exit_code == 0 and "rows               8 (8 ok, 0 failed)" in shown.output
    assert [f"[{r['id']}] " in shown.output for r in expected] == [True] * 4 + [False] * 4


def test_parquet_job_with_template_ids_and_kept_columns(workers, default_model_dir, tmp_path):
    from batchgen.tokenizer import Tokenizer

    template = "Title: {title}\n{text}\nSummarize in one line."
    submit_and_wait(SAMPLES / "articles.parquet", tmp_path / "out", "--template", template, "--chat",
                    "--id-column", "doc_id", "--keep-columns", "title", "--shard-size", "2", "--max-tokens", "3",
                    *GREEDY)
    source = pq.read_table(SAMPLES / "articles.parquet").to_pylist()
    table = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert [(r["id"], r["title"]) for r in table] == [(s["doc_id"], s["title"]) for s in source]
    tokenizer = Tokenizer(default_model_dir)
    for row, src in zip(table, source):
        prompt = template.format(title=src["title"], text=src["text"])
        assert row["prompt_tokens"] == len(tokenizer.encode_chat([{"role": "user", "content": prompt}]))
        assert row["error"] is None and row["text"]
        assert row["completion_tokens"] == 3 or row["finish_reason"] == "stop"
    check_stats_agree(str(tmp_path / "out"), table)
    assert len(list_parts(str(tmp_path / "out"))) == 3


def test_openai_batch_file_gets_openai_output_lines(workers, tmp_path):
    submit_and_wait(SAMPLES / "openai_batch.jsonl", tmp_path / "out", "--output-format", "openai",
                    "--shard-size", "3")
    requests = [json.loads(line) for line in (SAMPLES / "openai_batch.jsonl").read_text().splitlines()]
    table = pq.read_table(str(tmp_path / "out")).to_pylist()
    lines = [json.loads(line) for line in (tmp_path / "out" / ".batchgen" / "results.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [r["id"] for r in table] == [r["custom_id"] for r in requests]
    for request, row, line in zip(requests, table, lines):
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["model"] == "default"
        choice = body["choices"][0]
        if request["url"] == "/v1/chat/completions":
            assert body["object"] == "chat.completion" and choice["message"]["content"] == row["text"]
        else:
            assert body["object"] == "text_completion" and choice["text"] == row["text"]
        assert choice["finish_reason"] == row["finish_reason"]
        assert body["usage"]["completion_tokens"] == row["completion_tokens"] <= request["body"]["max_tokens"]
        assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]
    check_stats_agree(str(tmp_path / "out"), table)


def test_cancel_keeps_finished_parts_and_drops_the_rest(workers, tmp_path):
    workers.wait_idle()
    rows = [{"id": f"c{i}", "prompt": f"Tell me a story about the number {i}."} for i in range(24)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    submitted = cli("submit", path, "-o", tmp_path / "out", "--shard-size", "1", "--max-tokens", "12")
    job_id = submitted.stdout.strip()
    store = job_store()
    deadline = time.monotonic() + 120
    while store.get_job(job_id).shards_done < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "cancelled" in cli("cancel", job_id).output
    assert cli("wait", job_id).exit_code == EXIT_CANCELLED
    workers.wait_idle()

    record = store.get_job(job_id)
    parts = list_parts(str(tmp_path / "out"))
    assert record.status == "cancelled" and 2 <= len(parts) < 24
    assert record.shards_done == len(parts)                 # a shard that finished after the cancel counts too
    for index, path in parts:                               # every kept part is whole and holds its own row
        assert [r["id"] for r in pq.read_table(path).to_pylist()] == [f"c{index}"]
    assert not (tmp_path / "out" / ".batchgen" / "stats.json").exists()
    status = cli("status", job_id)
    assert status.exit_code == 0 and "cancelled" in status.output and "stalled" not in status.output
    assert any(line.startswith(job_id) and "cancelled" in line for line in cli("list").output.splitlines())


def test_scheduled_definition_fires_under_beat(workers, tmp_path):
    incoming, definitions = tmp_path / "incoming", tmp_path / "definitions"
    incoming.mkdir()
    definitions.mkdir()
    (incoming / "first.jsonl").write_text(json.dumps({"id": "a", "prompt": "Hello"}) + "\n")
    (definitions / "every-second.yaml").write_text(
        f"name: e2e-{uuid.uuid4().hex[:8]}\ninput: ../incoming/*.jsonl\noutput: ../results\nevery_seconds: 1\n"
        "min_file_age_s: 0\njob: {sampling: {max_tokens: 2, temperature: 0}}\n")
    beat = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "beat", "--definitions", definitions,
                             "--schedule-file", tmp_path / "beat.schedule", "--loglevel", "INFO"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    store = job_store()

    def jobs_for(name: str) -> list:
        return [j for j in store.list_jobs() if j.input == str(incoming / name)]

    def wait_completed(name: str) -> None:
        deadline = time.monotonic() + 90
        while not (found := jobs_for(name)) or found[0].status != "completed":
            assert beat.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)

    try:
        wait_completed("first.jsonl")
        (incoming / "second.jsonl").write_text(json.dumps({"id": "b", "prompt": "Goodbye"}) + "\n")
        wait_completed("second.jsonl")
        time.sleep(2.5)                                      # more firings: nothing new to submit
    finally:
        beat.send_signal(signal.SIGTERM)
        beat.wait(timeout=30)
    assert len(jobs_for("first.jsonl")) == len(jobs_for("second.jsonl")) == 1
    for name, row_id in (("first.jsonl", "a"), ("second.jsonl", "b")):
        [job] = jobs_for(name)
        assert job.output == str(tmp_path / "results" / job.job_id)
        [row] = pq.read_table(job.output).to_pylist()
        assert row["id"] == row_id and row["error"] is None and row["completion_tokens"] >= 1
