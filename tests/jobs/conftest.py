"""Helpers that build job inputs in a temp dir: every test writes the exact bytes it reads back."""
import json

import pytest

from batchgen.jobs.output_dir import write_part
from batchgen.jobs.output_rows import output_row, output_schema
from batchgen.jobs.readers import read_rows, validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.stats import ShardStats
from batchgen.outputs import CompletionOutput, RequestOutput, TokenLogprobs


def jsonl_bytes(rows: list) -> bytes:
    """Rows as JSONL; bytes items are written as given (broken lines)."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@pytest.fixture
def make_job(tmp_path):
    """make_job(rows or bytes, name="in.jsonl", **JobSpec fields) -> validated JobSpec."""
    def make(content, name="in.jsonl", validate=True, **fields):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else jsonl_bytes(content))
        spec = JobSpec(input=str(path), output=str(tmp_path / "out"), **fields)
        if validate:
            spec.input_summary = validate_input(spec)
        return spec
    return make


def fake_result(row) -> RequestOutput:
    """A deterministic stand-in for the engine: sample j of row r says f"{r.id}/{j}" in j + 1 tokens."""
    params = row.params
    structured = params.structured
    completions = []
    for j in range(params.n):
        text = f"{row.id}/{j}"
        if structured is not None:   # sample 0 obeys the schema, sample 1 doesn't
            text = json.dumps({"name": row.id}) if j == 0 else json.dumps({"age": j})
        logprobs = None if params.logprobs is None else [
            TokenLogprobs(token_id=t, logprob=-0.5 * t, top={t: -0.5 * t, t + 100: -3.0}) for t in range(j + 1)]
        completions.append(CompletionOutput(index=j, text=text, token_ids=list(range(j + 1)),
                                            finish_reason="length" if j else "stop", logprobs=logprobs))
    prompt = row.prompt or " ".join(m["content"] for m in row.messages)
    return RequestOutput(request_id=row.id, prompt_token_ids=[7] * len(prompt.split()), outputs=completions,
                         num_cached_tokens=1, num_preemptions=row.index % 2)


def _run_job(spec, worker="host-a", fail_ids=()):
    """What a worker does, shard by shard. Rows whose id is in fail_ids get an engine error."""
    schema = output_schema(spec)
    for shard in range(spec.num_shards):
        rows = []
        for row in read_rows(spec, *spec.shard_rows(shard)):
            result = None
            if row.error is None:
                result = fake_result(row)
                if row.id in fail_ids:
                    result = RequestOutput(row.id, [1] * 9000, [], error="prompt is 9000 tokens, over max_model_len")
            rows.append(output_row(row, result))
        stats = ShardStats.from_rows(shard, rows, wall_seconds=2.0, worker=worker, gpu="0")
        write_part(rows, spec.output, shard, schema, stats)
    return schema


@pytest.fixture
def run_job():
    return _run_job


@pytest.fixture
def fake_engine():
    return fake_result
