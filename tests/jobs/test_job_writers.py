"""Writers: parts round-trip through pyarrow with one stable schema, appear only when complete, and the
OpenAI output matches the Batch API output shape."""
import json
import os
from datetime import datetime, timezone

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.jobs.errors import JobOutputError
from batchgen.jobs.output_dir import (list_parts, load_spec, load_stats, part_exists, part_path, read_shard_stats,
                                     remove_temp_files, save_spec, save_stats, write_openai_output, write_part)
from batchgen.jobs.output_rows import LOGPROBS_TYPE, output_row, output_schema
from batchgen.jobs.readers import read_rows, validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.stats import merge_stats

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_round_trip_with_samples_logprobs_json_and_kept_columns(make_job, run_job):
    rows = [{"id": "a", "prompt": "one two", "source": 1, "meta": {"k": 1}},
            {"id": "b", "prompt": "three", "n": 2, "logprobs": 1, "source": 2, "meta": "plain"},
            {"id": "c", "prompt": "four five six", "temperature": -1, "source": 3},
            {"id": "d", "messages": [{"role": "user", "content": "hi there"}], "source": 4.5,
             "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, "n": 2},
            {"id": "e", "prompt": "too long", "source": None}]
    spec = make_job(rows, shard_size=2, keep_columns=["source", "meta"])
    schema = run_job(spec, fail_ids={"e"})
    table = pq.read_table(spec.output)
    assert table.schema.equals(schema)
    assert schema.field("text").type == pa.list_(pa.string())        # some row has n = 2
    assert schema.field("source").type == pa.float64()                 # ints and a float
    assert schema.field("meta").type == pa.string()                    # an object and a string: JSON text
    assert schema.field("logprobs").type == pa.list_(LOGPROBS_TYPE)
    assert [len(list_parts(spec.output))] == [3]

    got = table.to_pylist()
    assert [r["id"] for r in got] == ["a", "b", "c", "d", "e"]
    assert [r["source"] for r in got] == [1.0, 2.0, 3.0, 4.5, None]
    assert [r["meta"] for r in got] == ['{"k": 1}', "plain", None, None, None]
    assert got[0]["text"] == ["a/0"] and got[0]["finish_reason"] == ["stop"]
    assert got[1]["text"] == ["b/0", "b/1"] and got[1]["finish_reason"] == ["stop", "length"]
    assert (got[1]["prompt_tokens"], got[1]["completion_tokens"]) == (1, 3)
    assert got[1]["logprobs"][1] == [
        {"token_id": t, "logprob": -0.5 * t, "top": [{"token_id": t, "logprob": -0.5 * t},
                                                       {"token_id": t + 100, "logprob": -3.0}]} for t in range(2)]
    assert got[0]["logprobs"] is None
    assert got[2]["text"] is None and "line 3: field 'temperature'" in got[2]["error"]
    texts = got[3]["text"]
    assert got[3]["json"] == texts
    assert got[3]["json_valid"] == [jsonschema.validators.Draft202012Validator(PERSON).is_valid(json.loads(t))
                                    for t in texts] == [True, False]
    assert got[4]["error"].startswith("prompt is 9000 tokens") and got[4]["prompt_tokens"] == 9000
    assert all(r["json"] is None for r in got if r["id"] != "d")


def test_plain_schema_when_every_row_has_one_sample(make_job, run_job):
    spec = make_job([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    run_job(spec)
    table = pq.read_table(spec.output)
    assert table.schema.names == ["id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error"]
    assert table.column("text").to_pylist() == ["a/0", "b/0"]


def test_parquet_kept_columns_keep_their_types(tmp_path, run_job):
    when = [datetime(2025, 1, d, 12, tzinfo=timezone.utc) for d in (1, 2, 3)]
    schema = pa.schema([("prompt", pa.string()), pa.field("when", pa.timestamp("ms", tz="UTC"), nullable=False),
                        ("tags", pa.list_(pa.string())), ("score", pa.float32())])
    table = pa.table({"prompt": ["a", "b", None], "when": when, "tags": [["x"], [], ["y", "z"]],
                      "score": [1.5, 2.5, 3.5]}, schema=schema)
    pq.write_table(table, tmp_path / "in.parquet")
    spec = JobSpec(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                   keep_columns=["when", "tags", "score"], shard_size=2)
    spec.input_summary = validate_input(spec)
    run_job(spec)
    out = pq.read_table(spec.output)
    for name in ("when", "tags", "score"):
        assert out.schema.field(name).type == table.schema.field(name).type
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
    errors = out.column("error").to_pylist()
    assert errors[:2] == [None, None] and "row 3: field 'prompt'" in errors[2]


def test_part_becomes_visible_only_when_complete(make_job, fake_engine, monkeypatch):
    spec = make_job([{"prompt": "x"}])
    schema = output_schema(spec)
    rows = [output_row(r, fake_engine(r)) for r in read_rows(spec, 0, 1)]
    real_write_table = pq.write_table
    seen_during_write = []

    def spying_write_table(table, where, **kwargs):
        real_write_table(table, where, **kwargs)
        seen_during_write.append((part_exists(spec.output, 0), os.listdir(os.path.dirname(part_path(spec.output, 0)))))

    monkeypatch.setattr(pq, "write_table", spying_write_table)
    write_part(rows, spec.output, 0, schema)
    [(visible, names)] = seen_during_write
    assert not visible and len(names) == 1 and names[0].startswith(".shard-00000.parquet.")
    assert part_exists(spec.output, 0)
    assert os.listdir(os.path.dirname(part_path(spec.output, 0))) == ["shard-00000.parquet"]


def test_failed_write_leaves_no_part_and_no_temp(make_job, fake_engine, monkeypatch):
    spec = make_job([{"prompt": "x"}])
    rows = [output_row(r, fake_engine(r)) for r in read_rows(spec, 0, 1)]

    def disk_full(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(JobOutputError, match="shard-00000.parquet.*No space left on device"):
        write_part(rows, spec.output, 0, output_schema(spec))
    assert not part_exists(spec.output, 0)
    assert os.listdir(os.path.dirname(part_path(spec.output, 0))) == []


def test_unwritable_output_is_a_clear_error(make_job, fake_engine, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    spec = make_job([{"prompt": "x"}])
    spec.output = str(tmp_path / "a_file" / "out")
    rows = [output_row(r, fake_engine(r)) for r in read_rows(spec, 0, 1)]
    with pytest.raises(JobOutputError, match="cannot write .*a_file/out"):
        write_part(rows, spec.output, 0, output_schema(spec))


def test_parts_are_idempotent_and_temp_files_never_count(make_job, run_job, fake_engine):
    spec = make_job([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}], shard_size=1)
    run_job(spec)
    parts_dir = os.path.dirname(part_path(spec.output, 0))
    left_by_a_killed_writer = os.path.join(parts_dir, ".shard-00001.parquet.0123abcd.tmp")
    open(left_by_a_killed_writer, "wb").write(b"PAR1 half")
    rows = [output_row(r, fake_engine(r)) for r in read_rows(spec, 0, 1)]
    write_part(rows, spec.output, 0, output_schema(spec))             # a redelivered shard: same file again
    assert [i for i, _ in list_parts(spec.output)] == [0, 1]
    assert pq.read_table(spec.output).column("id").to_pylist() == ["a", "b"]
    assert remove_temp_files(spec.output) == 1
    assert sorted(os.listdir(parts_dir)) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_a_cut_short_part_does_not_count(make_job, run_job):
    spec = make_job([{"prompt": "x"}, {"prompt": "y"}], shard_size=1)
    run_job(spec)
    assert part_exists(spec.output, 0) and part_exists(spec.output, 1) and not part_exists(spec.output, 2)
    path = part_path(spec.output, 1)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 20])
    assert not part_exists(spec.output, 1)


def test_uri_output_and_metadata_files(make_job, run_job, tmp_path):
    spec = make_job([{"id": f"r{i}", "prompt": "x y"} for i in range(5)], shard_size=2)
    spec.output = "file://" + str(tmp_path / "uri-out")
    run_job(spec, worker="host-b")
    assert pq.read_table(spec.output).column("id").to_pylist() == [f"r{i}" for i in range(5)]
    save_spec(spec)
    assert load_spec(spec.output) == spec
    shard_stats = read_shard_stats(spec.output)
    assert [s.shard_index for s in shard_stats] == [0, 1, 2] and shard_stats[0].worker == "host-b"
    stats = merge_stats(shard_stats, job_id=spec.job_id, model=spec.model)
    save_stats(spec.output, stats)
    assert load_stats(spec.output) == stats
    assert sorted(os.listdir(tmp_path / "uri-out")) == [".batchgen", "parts"]


# The Batch API output line, as documented by OpenAI (https://platform.openai.com/docs/api-reference/batch).
OPENAI_OUTPUT_LINE = {
    "type": "object", "required": ["id", "custom_id", "response", "error"], "additionalProperties": False,
    "properties": {
        "id": {"type": "string"}, "custom_id": {"type": "string"}, "error": {"type": "null"},
        "response": {"type": "object", "required": ["status_code", "request_id", "body"], "properties": {
            "status_code": {"type": "integer"}, "request_id": {"type": "string"}, "body": {"oneOf": [
                {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}},
                {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                 "properties": {
                     "object": {"enum": ["chat.completion", "text_completion"]}, "created": {"type": "integer"},
                     "model": {"type": "string"},
                     "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]},
                     "choices": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["index", "finish_reason", "logprobs"],
                         "properties": {"index": {"type": "integer"}, "finish_reason": {"type": "string"},
                                        "text": {"type": "string"},
                                        "message": {"type": "object", "required": ["role", "content"],
                                                    "properties": {"role": {"const": "assistant"},
                                                                   "content": {"type": "string"}}}},
                         "oneOf": [{"required": ["message"]}, {"required": ["text"]}]}}}},
            ]}}},
    },
}


def test_openai_output_matches_the_batch_shape(make_job, run_job):
    lines = [{"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hello you"}], "n": 2}},
             {"custom_id": "comp-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "once upon"}},
             {"custom_id": "bad-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 2}}]
    spec = make_job(lines, shard_size=2, output_format="openai", model="tiny")
    run_job(spec)
    path = write_openai_output(spec)
    assert path.endswith("results.jsonl")
    out = [json.loads(line) for line in open(path)]
    for line in out:
        jsonschema.validate(line, OPENAI_OUTPUT_LINE)
    assert [line["custom_id"] for line in out] == ["chat-1", "comp-1", "bad-1"]
    chat, comp, bad = (line["response"] for line in out)
    assert chat["status_code"] == 200 and chat["body"]["object"] == "chat.completion"
    assert [c["message"]["content"] for c in chat["body"]["choices"]] == ["chat-1/0", "chat-1/1"]
    assert chat["body"]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert chat["body"]["model"] == "tiny"
    assert comp["body"]["object"] == "text_completion" and comp["body"]["choices"][0]["text"] == "comp-1/0"
    assert bad["status_code"] == 400 and "field 'body.top_p'" in bad["body"]["error"]["message"]
    assert len({line["id"] for line in out}) == 3
