"""The bad-input corpus (inputs/, plus the big or broken files made here: a 50 MB line, a prompt over the
context, a truncated Parquet file) submitted to a real worker. A whole-file problem refuses the job before
anything is registered or queued; a row problem becomes that row's error, naming file, line and field; every
other row comes out exactly as the model answers it."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.workers.app import job_store, queue_length, queue_name
from harness import reference_texts

INPUTS = Path(__file__).with_name("inputs")
MAX_TOKENS = 3

# file -> the rows that must fail: (1-based line, field named in the error or None, message, the row's id)
ROW_PROBLEMS = {
    "malformed_json.jsonl": [(2, None, "malformed JSON", "1")],
    "non_utf8.jsonl": [(2, None, "not valid UTF-8", "1")],
    "array_not_object.jsonl": [(2, None, "expected a JSON object, got an array", "1")],
    "wrong_types.jsonl": [(1, "prompt", "must be a string, got an integer", "t1"),
                          (2, "max_tokens", "valid integer", "t2"),
                          (4, "id", "must be a string or an integer, got an array", "3"),
                          (5, "temperature", "valid number", "t4"),
                          (6, "messages", "non-empty list", "t5")],
    "missing_prompt.jsonl": [(2, "prompt", "missing", "bad")],
    "empty_prompt.jsonl": [(1, "prompt", "empty prompt", "e1"), (3, "prompt", "empty prompt", "e2")],
    "duplicate_ids.jsonl": [(3, "id", "duplicate id 'a'", "a")],
    "negative_temperature.jsonl": [(2, "temperature", "greater than or equal to 0", "bad")],
    "top_p_over_one.jsonl": [(2, "top_p", "less than or equal to 1", "bad")],
    "n_zero.jsonl": [(2, "n", "greater than or equal to 1", "bad")],
    "max_tokens_zero.jsonl": [(2, "max_tokens", "max_tokens 0 is for scoring prompts", "bad")],
    "invalid_row_schema.jsonl": [(2, "response_format", "invalid JSON schema", "bad")],
    "unknown_fields.jsonl": [],                      # warned at submit, ignored
    "path_like_fields.jsonl": [],                    # a path in a row is text, never a file
    "huge_line.jsonl": [(2, None, "line longer than 16,777,216 bytes", "1")],
}
# engine-side problems name the file and the row (its 1-based position among the rows)
ENGINE_PROBLEMS = {"over_context.jsonl": [(2, "tokens; the context holds 2048", "long")]}


def make_generated_inputs(directory: Path) -> dict[str, Path]:
    """The corpus files too big (or too broken) to keep in the repository."""
    def good(i: int, tag: str) -> bytes:
        return json.dumps({"id": f"{tag}-ok{i}", "prompt": f"Write about {tag} case {i}"}).encode() + b"\n"

    paths = {name: directory / name for name in ("huge_line.jsonl", "over_context.jsonl", "truncated.parquet")}
    paths["huge_line.jsonl"].write_bytes(good(1, "huge") + b'{"id": "huge", "prompt": "' + b"y" * (50 << 20)
                                         + b'"}\n' + good(2, "huge"))
    paths["over_context.jsonl"].write_bytes(good(1, "long") + json.dumps(
        {"id": "long", "prompt": "word " * 2100}).encode() + b"\n" + good(2, "long"))
    whole = directory / "whole.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(2000)]}), whole)
    paths["truncated.parquet"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    generated = make_generated_inputs(tmp_path_factory.mktemp("generated-inputs"))
    return {**{path.name: path for path in INPUTS.iterdir()}, **generated}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name, options, message", [
    ("empty.jsonl", [], "empty file"),
    ("wrong_column.parquet", [], "no prompt column 'prompt' (nor 'messages') (columns: question, id)"),
    ("truncated.parquet", [], "not a readable Parquet file"),
    ("unknown_fields.jsonl", ["--schema", INPUTS / "invalid_job_schema.json"], "invalid JSON schema at /properties"),
])
def test_whole_file_problems_refuse_the_job_before_anything_is_queued(corpus, tmp_path, name, options, message):
    model = "reliability-unserved-model"
    before = (queue_length(queue_name(model)), len(job_store().list_jobs()))
    result = cli("submit", corpus[name], "--model", model, "-o", tmp_path / "out", *options)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
    named = options[1] if options else corpus[name]
    assert str(named) in result.output and "Traceback" not in result.output
    assert (queue_length(queue_name(model)), len(job_store().list_jobs())) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.slow   # a real worker process
def test_row_problems_cost_only_their_rows(corpus, model_alias, start_worker, reference_llm, tmp_path, caplog):
    model = model_alias("corpus")
    worker = start_worker(model)
    submitted = {}
    for name in [*ROW_PROBLEMS, *ENGINE_PROBLEMS]:
        result = cli("submit", corpus[name], "--model", model, "-o", tmp_path / name, "--max-tokens", MAX_TOKENS,
                     "--temperature", 0, "--shard-size", 2)
        assert result.exit_code == 0, result.output
        submitted[name] = result.stdout.strip()
    worker.wait_ready()
    warned = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert warned == [f"{corpus['unknown_fields.jsonl']}: unknown field 'colour' ignored (first at line 1)",
                      f"{corpus['unknown_fields.jsonl']}: unknown field 'priority' ignored (first at line 2)"]

    good_rows, prompts = {}, {}
    for name, job_id in submitted.items():
        assert cli("wait", job_id, "--interval", 0.2, "--timeout", 60).exit_code == 0, worker.log_text()[-3000:]
        path = corpus[name]
        table = pq.read_table(str(tmp_path / name)).to_pylist()
        lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        assert len(table) == len(lines)                            # every row once, in input order
        failing = {}
        for line_no, field, message, row_id in ROW_PROBLEMS.get(name, []):
            where = f"{path}: line {line_no}: " + (f"field '{field}': " if field else "")
            failing[line_no - 1] = (where, message, row_id)
        for row_no, message, row_id in ENGINE_PROBLEMS.get(name, []):
            failing[row_no - 1] = (f"{path}: row {row_no}: ", message, row_id)
        for index, row in enumerate(table):
            if index in failing:
                where, message, row_id = failing[index]
                assert row["error"].startswith(where) and message in row["error"], row["error"]
                assert row["id"] == row_id and row["text"] is None
            else:
                assert row["error"] is None, row["error"]
                good_rows[(name, index)] = row
                prompts[(name, index)] = json.loads(lines[index])["prompt"]
    expected = reference_texts(reference_llm, list(prompts.values()), max_tokens=MAX_TOKENS)
    for (key, prompt), text in zip(prompts.items(), expected):
        row = good_rows[key]
        assert row["text"] == text and row["prompt_tokens"] == len(reference_llm.tokenizer.encode(prompt))

    paths = pq.read_table(str(tmp_path / "path_like_fields.jsonl")).to_pylist()
    assert [r["id"] for r in paths] == ["../../escaped", "/tmp/absolute-id"]   # ids are data, never file names
    assert sorted(p.name for p in (tmp_path / "path_like_fields.jsonl").iterdir()) == [".batchgen", "parts"]
    assert not Path("/tmp/absolute-id").exists()
