"""Readers on real files: every bad input kind costs exactly its own row (error naming file, line/row and
field) or refuses the whole file with JobInputError naming it; shard reads add up to the whole file."""
import json
import logging
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import SamplingParams
from batchgen.jobs.errors import JobInputError
from batchgen.jobs.readers import read_rows, validate_input
from batchgen.jobs.spec import JobSpec
GOOD = {"prompt": "fine"}

# (bad line, field named in the error or None for whole-line problems, message fragment)
BAD_LINES = [
    (b'{"id": "bad", "prompt": "x"', None, "malformed JSON"),
    (b'{"id": "bad", "prompt": "caf\xe9"}', None, "not valid UTF-8"),
    (b'[{"prompt": "in an array"}]', None, "expected a JSON object"),
    (json.dumps({"id": "bad", "prompt": 12}).encode(), "prompt", "must be a string"),
    (json.dumps({"id": "bad", "prompt": "x", "max_tokens": "ten"}).encode(), "max_tokens", "valid integer"),
    (json.dumps({"id": "bad", "text": "no prompt"}).encode(), "prompt", "missing"),
    (json.dumps({"id": "bad", "prompt": ""}).encode(), "prompt", "empty prompt"),
    (json.dumps({"id": "bad", "prompt": "x", "temperature": -1}).encode(), "temperature", "greater than or equal to 0"),
    (json.dumps({"id": "bad", "prompt": "x", "top_p": 1.01}).encode(), "top_p", "less than or equal to 1"),
    (json.dumps({"id": "bad", "prompt": "x", "n": 0}).encode(), "n", "greater than or equal to 1"),
    (json.dumps({"id": "bad", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens", "max_tokens 0 is for scoring"),
    (json.dumps({"id": "bad", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "required": "name"}}}}).encode(), "response_format", "invalid JSON schema"),
]


@pytest.mark.parametrize(("bad", "field", "message"), BAD_LINES)
def test_bad_line_costs_only_its_row(make_job, bad, field, message):
    content = [{"id": "a", **GOOD}, {"id": "b", **GOOD}, bad, {"id": "c", **GOOD}]
    spec = make_job(content, shard_size=2)
    rows = list(read_rows(spec, 0, 4))
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert [r.error for r in rows if r.index != 2] == [None, None, None]
    assert [r.id for r in rows if r.index != 2] == ["a", "b", "c"]
    error = rows[2].error
    assert error.startswith(f"{spec.input}: line 3: "), error
    if field is not None:
        assert f"field '{field}'" in error
    assert message in error
    assert spec.input_summary.num_invalid_rows == 1 and spec.input_summary.first_errors == [error]


def test_huge_line_is_skipped_unread(make_job, tmp_path):
    """A 50 MB line (over the 16 MiB default limit) is that row's error and never sits whole in memory."""
    huge = b'{"id": "huge", "prompt": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    spec = make_job([{"id": "a", **GOOD}, huge, {"id": "c", **GOOD}])
    tracemalloc.start()
    rows = list(read_rows(spec, 0, 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r.id for r in rows] == ["a", "1", "c"]
    assert rows[1].error.startswith(f"{spec.input}: line 2: line longer than 16,777,216 bytes")
    assert rows[0].error is None and rows[2].error is None
    assert peak < 20 * 1024 * 1024


def test_duplicate_ids_fail_the_later_rows_across_shards(make_job):
    ids = ["a", "b", "c", "a", "d", "b", "a"]
    spec = make_job([{"id": i, **GOOD} for i in ids], shard_size=2)
    rows = [r for i in range(spec.num_shards) for r in read_rows(spec, *spec.shard_rows(i))]
    assert spec.input_summary.duplicate_rows == [3, 5, 6]
    assert [r.id for r in rows] == ids
    for row in rows:
        if row.index in (3, 5, 6):
            assert f"line {row.index + 1}: field 'id': duplicate id '{row.id}'" in row.error
        else:
            assert row.error is None


def test_unknown_fields_are_warned_once_and_ignored(make_job, caplog):
    with caplog.at_level(logging.WARNING, logger="batchgen.jobs"):
        spec = make_job([{"prompt": "a", "colour": 1}, {"prompt": "b", "colour": 2, "size": 3}])
    assert spec.input_summary.unknown_fields == {"colour": "line 1", "size": "line 2"}
    assert sum("unknown field 'colour'" in r.message for r in caplog.records) == 1
    assert [r.error for r in read_rows(spec, 0, 2)] == [None, None]


def test_shard_reads_add_up_to_the_whole_file(make_job):
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "max_tokens": 1 + i % 5} for i in range(23)]
    content = b"\n".join(json.dumps(r).encode() + (b"\r\n\n  \n" if i % 4 == 0 else b"\n")
                         for i, r in enumerate(rows))
    spec = make_job(content, shard_size=5)
    assert spec.input_summary.num_rows == 23 and len(spec.input_summary.shard_starts) == 5
    shards = [spec.shard_rows(i) for i in range(spec.num_shards)]
    assert shards == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    read = [r for start, end in shards for r in read_rows(spec, start, end)]
    assert read == list(read_rows(spec, 0, 23))
    assert [(r.id, r.prompt, r.params) for r in read] == [
        (r["id"], r["prompt"], SamplingParams(max_tokens=r["max_tokens"])) for r in rows]
    assert [r.id for r in read_rows(spec, 7, 12)] == [f"r{i}" for i in range(7, 12)]   # unaligned range


def test_line_numbers_count_blank_lines(make_job):
    spec = make_job(b'{"prompt": "a"}\n\n\n{"prompt": "b", "n": 0}\n')
    rows = list(read_rows(spec, 0, 2))
    assert [r.id for r in rows] == ["0", "1"]
    assert rows[1].error.startswith(f"{spec.input}: line 4: field 'n'")


def test_openai_batch_file_is_detected_and_read(make_job):
    lines = [{"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}},
             {"custom_id": "x2", "method": "POST", "url": "/v1/completions",
              "body": {"model": "gpt-4o-mini", "prompt": "Once", "temperature": 0}},
             {"custom_id": "x3", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 0}}]
    spec = make_job(lines, name="batch.txt")
    assert spec.input_summary.input_format == "openai"
    rows = list(read_rows(spec, 0, 3))
    assert [r.id for r in rows] == ["x1", "x2", "x3"]
    assert rows[0].messages == [{"role": "user", "content": "Hi"}] and rows[0].params.max_tokens == 3
    assert rows[1].prompt == "Once" and rows[1].params == SamplingParams(max_tokens=256, temperature=0.0)
    assert rows[2].error.startswith(f"{spec.input}: line 3: field 'body.n'")


def _parquet(tmp_path, table: pa.Table, name="in.parquet", **kwargs) -> str:
    path = tmp_path / name
    pq.write_table(table, path, **kwargs)
    return str(path)


def test_parquet_rows_by_row_group(tmp_path):
    n = 50
    table = pa.table({"doc_id": [f"d{i}" for i in range(n)], "body": [f"text {i}" for i in range(n)],
                      "temperature": [-1.0 if i == 17 else None for i in range(n)],
                      "label": list(range(n)), "unused": [b"x"] * n})
    spec = JobSpec(input=_parquet(tmp_path, table, "data.bin", row_group_size=7), output=str(tmp_path / "o"),
                   template="Summarize: {body}", id_column="doc_id", keep_columns=["label"], shard_size=8)
    spec.input_summary = validate_input(spec)
    assert spec.input_summary.input_format == "parquet" and spec.input_summary.num_rows == n
    assert spec.input_summary.unknown_fields == {"unused": "the schema"}
    read = [r for i in range(spec.num_shards) for r in read_rows(spec, *spec.shard_rows(i))]
    assert [r.id for r in read] == [f"d{i}" for i in range(n)]
    assert [r.prompt for r in read if r.index != 17] == [f"Summarize: text {i}" for i in range(n) if i != 17]
    assert [r.columns for r in read] == [{"label": i} for i in range(n)]
    assert read[17].error.startswith(f"{spec.input}: row 18: field 'temperature': ")
    assert [r.id for r in read_rows(spec, 20, 23)] == ["d20", "d21", "d22"]


def test_parquet_messages_column(tmp_path):
    messages = pa.array([[{"role": "user", "content": "Hi"}], [{"role": "robot", "content": "x"}]],
                        type=pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    spec = JobSpec(input=_parquet(tmp_path, pa.table({"messages": messages})), output=str(tmp_path / "o"))
    spec.input_summary = validate_input(spec)
    rows = list(read_rows(spec, 0, 2))
    assert rows[0].messages == [{"role": "user", "content": "Hi"}] and rows[0].error is None
    assert "row 2: field 'messages[0].role'" in rows[1].error


def test_whole_file_problems_refuse_the_job(make_job, tmp_path):
    def refused(match, spec):
        with pytest.raises(JobInputError, match=match) as info:
            validate_input(spec)
        assert spec.input in str(info.value)

    out = str(tmp_path / "o")
    refused("no such file", JobSpec(input=str(tmp_path / "missing.jsonl"), output=out))
    refused("not a file", JobSpec(input=str(tmp_path), output=out))
    refused("empty file", make_job(b"", validate=False))
    refused("no rows", make_job(b"\n \n\n", validate=False))
    refused("unknown format", make_job(b"a,b\n1,2\n", name="data.csv", validate=False))
    refused("(?s)no valid rows.*line 1: field 'prompt'", make_job([{"text": "a"}, {"text": "b"}], validate=False))
    refused("template applies", make_job([{"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                           "body": {"prompt": "x"}}], template="{x}", validate=False))

    table = pa.table({"question": ["q1", "q2"], "n_words": [3, 4]})
    parquet = _parquet(tmp_path, table)
    refused("no prompt column 'prompt'.*columns: question, n_words", JobSpec(input=parquet, output=out))
    refused(r"template placeholder \{answer\} is not a column", JobSpec(input=parquet, output=out, template="{answer}"))
    refused("kept column 'source'",
            JobSpec(input=parquet, output=out, prompt_column="question", keep_columns=["source"]))
    refused("holds int64, not text", JobSpec(input=parquet, output=out, prompt_column="n_words"))

    whole = open(_parquet(tmp_path, pa.table({"prompt": [f"p{i}" for i in range(1000)]}), "full.parquet"), "rb").read()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(whole[: len(whole) // 2])
    refused("not a readable Parquet file", JobSpec(input=str(truncated), output=out))


def test_a_file_changed_after_submit_is_refused(make_job):
    spec = make_job([GOOD, GOOD])
    with open(spec.input, "ab") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(JobInputError, match="changed since the job was submitted"):
        list(read_rows(spec, 0, 2))


def test_memory_stays_flat_with_the_row_count(tmp_path):
    """Reading 200k rows peaks where reading 2k rows does (the read buffer, one row at a time). The
    submit-time survey grows only by its 16-byte id digest per row (plus sort scratch at the end)."""
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"prompt": "tiny prompt"}\n' * 200_000)
    spec = JobSpec(input=str(path), output=str(tmp_path / "o"), shard_size=1_000_000)
    spec.input_summary = validate_input(spec)
    assert spec.input_summary.num_rows == 200_000

    tracemalloc.start()
    peaks = {}
    for count in (2_000, 200_000):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        assert sum(1 for row in read_rows(spec, 0, count) if row.error is None) == count
        peaks[count] = tracemalloc.get_traced_memory()[1] - base
    small = JobSpec(input=str(tmp_path / "small.jsonl"), output=str(tmp_path / "o"))
    (tmp_path / "small.jsonl").write_bytes(b'{"prompt": "tiny prompt"}\n' * 20_000)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    validate_input(small)
    survey_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peaks[200_000] < peaks[2_000] + 128 * 1024, peaks
    assert peaks[200_000] < 2 * 1024 * 1024, peaks          # 200k parsed rows would be tens of MB
    assert survey_peak < 64 * 20_000 + 2 * 1024 * 1024, survey_peak
