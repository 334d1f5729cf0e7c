"""Scheduled job definitions: loading and validation, the beat entries they become, and a firing (which
submits to the real Redis queue of a model no worker serves, so the shards stay put for counting)."""
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from celery.schedules import crontab

from batchgen.jobs.output_dir import load_spec
from batchgen.workers.app import FIRE_SCHEDULE_TASK, job_store, queue_length, queue_name
from batchgen.workers.schedules import ScheduleDefinition, beat_schedule, fire, load_definition, load_definitions

REPO = Path(__file__).resolve().parents[2]
UNSERVED_MODEL = "schedule-test-model"


def write_definition(directory: Path, filename: str = "d.yaml", **fields) -> Path:
    path = directory / filename
    path.write_text(json.dumps(fields) if filename.endswith(".json") else
                    "\n".join(f"{key}: {json.dumps(value)}" for key, value in fields.items()))
    return path


def test_sample_nightly_extraction_definition():
    definition = load_definition(REPO / "samples/schedules/nightly-extraction.yaml")
    assert definition.name == "nightly-extraction" and definition.cron == "0 2 * * *"
    assert definition.input == str(REPO / "samples/extraction/incoming/*.jsonl")
    schema = json.loads((REPO / "samples/extraction/schema.json").read_text())
    assert definition.job["structured"] == {"json_schema": schema}
    entry = beat_schedule([definition])["batchgen:nightly-extraction"]
    assert entry["task"] == FIRE_SCHEDULE_TASK and entry["options"] == {"queue": queue_name("default")}
    assert entry["schedule"] == crontab(minute="0", hour="2")
    # what beat sends is JSON and comes back as the same definition
    assert ScheduleDefinition.model_validate(json.loads(json.dumps(entry["args"][0]))) == definition


@pytest.mark.parametrize("fields, message", [
    ({"cron": "0 2 * * *", "every_seconds": 60}, "exactly one of cron and every_seconds"),
    ({}, "exactly one of cron and every_seconds"),
    ({"cron": "0 2 * *"}, "five fields"),
    ({"cron": "0 25 * * *"}, "cron '0 25 * * *'"),
    ({"every_seconds": 60, "job": {"input": "x"}}, "must not set ['input']"),
    ({"every_seconds": 60, "job": {"sampling": {"temperature": -1}}}, "temperature"),
    ({"every_seconds": 60, "job": {"colour": "red"}}, "colour"),
    ({"every_seconds": 60, "retries": 3}, "retries"),
])
def test_bad_definitions_are_refused_naming_the_file(tmp_path, fields, message):
    path = write_definition(tmp_path, "bad.json", **{"name": "x", "input": "*.jsonl",
                                                                       "output": "out", **fields})
    with pytest.raises(ValueError, match="bad.json") as error:
        load_definition(path)
    assert message in str(error.value)


def test_definitions_directory(tmp_path):
    write_definition(tmp_path, "a.yaml", name="a", input="in/*.jsonl", output="out", every_seconds=5)
    write_definition(tmp_path, "b.json", name="b", input="/abs/*.parquet", output="s3://bucket/out", cron="*/5 * * * *")
    (tmp_path / "notes.txt").write_text("not a definition")
    a, b = load_definitions(tmp_path)
    assert a.input == str(tmp_path / "in/*.jsonl") and a.schedule() == timedelta(seconds=5)
    assert b.input == "/abs/*.parquet" and b.output == "s3://bucket/out"
    write_definition(tmp_path, "c.yaml", name="a", input="x", output="y", every_seconds=1)
    with pytest.raises(ValueError, match=r"more than one definition named \['a'\]"):
        load_definitions(tmp_path)


def test_each_new_or_changed_file_is_submitted_once(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "one.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    (incoming / "empty.jsonl").write_text("")
    path = write_definition(tmp_path, name=f"fire-{time.time_ns()}", input="incoming/*.jsonl", output="results",
                            model=UNSERVED_MODEL, every_seconds=1, min_file_age_s=0,
                            job={"shard_size": 2, "sampling": {"max_tokens": 3}})
    definition = load_definition(path)
    store, queue = job_store(), queue_name(UNSERVED_MODEL)
    before = queue_length(queue)

    [job_id] = fire(definition, store)                     # empty.jsonl is refused (logged), one.jsonl runs
    spec = load_spec(str(tmp_path / "results" / job_id))
    assert spec.input == str(incoming / "one.jsonl") and spec.sampling == {"max_tokens": 3}
    assert store.get_job(job_id).status == "queued" and queue_length(queue) == before + 3
    assert fire(definition, store) == []                   # nothing new

    with open(incoming / "one.jsonl", "a") as more:
        more.write(json.dumps({"prompt": "late"}) + "\n")
    settled = time.time() - 120
    os.utime(incoming / "one.jsonl", (settled, settled))
    (incoming / "two.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")   # still being written: too young
    [changed] = fire(definition.model_copy(update={"min_file_age_s": 60}), store)
    assert load_spec(str(tmp_path / "results" / changed)).input == str(incoming / "one.jsonl")
    assert store.get_job(changed).rows_total == 6
    for job in (job_id, changed):
        store.cancel_job(job)
