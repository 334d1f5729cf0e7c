"""The shard path (`batchgen.jobs.execute`) with a stand-in engine: what reaches the engine, what lands in the
parts and stats, and what happens when a step is repeated or fails. The stand-in's answer to a prompt is a
function of its token ids, so every expected output below is computed from the input independently."""
import json
import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen.jobs import execute
from batchgen.jobs.errors import JobOutputError
from batchgen.jobs.output_dir import (load_spec, load_stats, part_exists, part_path, part_stats, prepare_output,
                                     read_shard_stats, save_spec)
from batchgen.jobs.readers import validate_input
from batchgen.jobs.spec import JobSpec
from batchgen.jobs.store import MemoryJobStore
from batchgen.outputs import CompletionOutput, RequestOutput

class FakeTokenizer:
    """One token per character; chats join their contents; 'no template' fails like a model without one."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if any(m["content"] == "no template" for m in messages):
            raise ValueError("this model's tokenizer has no chat template")
        return self.encode("|".join(f"{m['role']}:{m['content']}" for m in messages))


def fake_text(prompt: list[int], max_tokens: int) -> str:
    return "".join(chr(t) for t in prompt)[::-1][:max_tokens]


class FakeEngine:
    """Answers a prompt with its text reversed, cut to max_tokens characters; raises on every call when
    `broken`. Records each call's batch size and cache salt."""

    def __init__(self, broken: bool = False):
        self.broken = broken
        self.calls: list[int] = []
        self.salts: list[str | None] = []
        self.lock = threading.Lock()

    def generate_tokens(self, prompts, sampling_params, should_stop=None, cache_salt=None):
        with self.lock:
            self.calls.append(len(prompts))
            self.salts.append(cache_salt)
        if self.broken:
            raise RuntimeError("device-side assert triggered")
        outputs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            if isinstance(prompt, Exception):
                outputs.append(RequestOutput(str(i), [], [], error=f"{type(prompt).__name__}: {prompt}"))
                continue
            text = fake_text(prompt, params.max_tokens)
            outputs.append(RequestOutput(str(i), prompt, [CompletionOutput(0, text, [ord(c) for c in text],
                                                                           "length")], num_cached_tokens=1))
        return outputs


def executor(engine=None) -> execute.Executor:
    return execute.Executor(engine=engine or FakeEngine(), tokenizer=FakeTokenizer(), worker="host-a:1",
                            gpu="cpu", dtype="float32")


@pytest.fixture
def job(tmp_path):
    """job(rows, **JobSpec fields) -> a validated spec whose input is `rows` as JSONL."""
    def make(rows, **fields):
        path = tmp_path / "in.jsonl"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        spec = JobSpec(input=str(path), **{"output": str(tmp_path / "out"), "shard_size": 3, **fields})
        spec.input_summary = validate_input(spec)
        return spec
    return make


def prompts(count: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(count)]


def test_local_job_runs_every_row_once_in_order(job):
    rows = prompts(7) + ["{broken json", {"id": "chat", "messages": [{"role": "user", "content": "hi there"}]},
                         {"id": "tpl", "messages": [{"role": "user", "content": "no template"}]}]
    spec = job(rows, sampling={"max_tokens": 5}, output_format="openai")
    seen = []
    record = execute.run_job_locally(spec, executor(), progress=lambda r: seen.append(r.shards_done))
    assert record.status == "completed" and seen == [1, 2, 3, 4]

    table = pq.read_table(spec.output).to_pylist()
    assert [r["id"] for r in table] == [f"r{i}" for i in range(7)] + ["7", "chat", "tpl"]
    for i, row in enumerate(table[:7]):
        assert row["text"] == fake_text([ord(c) for c in f"prompt number {i}"], 5) and row["error"] is None
        assert row["prompt_tokens"] == len(f"prompt number {i}") and row["completion_tokens"] == 5
    assert table[8]["text"] == fake_text(FakeTokenizer().encode("user:hi there"), 5)
    assert "line 8" in table[7]["error"] and "malformed JSON" in table[7]["error"]
    assert "no chat template" in table[9]["error"]          # a tokenizer failure is that row's error

    stats = load_stats(spec.output)
    ok = [r for r in table if r["error"] is None]
    assert (stats.rows_total, stats.rows_ok, stats.rows_failed) == (10, len(ok), 10 - len(ok))
    assert stats.prompt_tokens == sum(r["prompt_tokens"] for r in ok)
    assert stats.completion_tokens == sum(r["completion_tokens"] for r in ok)
    assert stats.dtype == "float32" and stats.workers == ["host-a:1 cpu"] and len(stats.shards) == 4
    lines = [json.loads(line) for line in open(f"{spec.output}/.batchgen/results.jsonl")]
    assert [line["custom_id"] for line in lines] == [r["id"] for r in table]


def test_redelivered_shard_is_skipped_and_counted_once(job):
    spec = job(prompts(6))                                  # 2 shards
    engine = FakeEngine()
    first = MemoryJobStore()
    first.create_job(spec)
    assert execute.run_shard(spec, 0, executor(engine), first).status == "done"
    assert execute.run_shard(spec, 0, executor(engine), first).status == "skipped"
    assert engine.calls == [3] and first.get_job(spec.job_id).rows_done == 3

    # The worker died after writing part 0 but before counting it: the redelivery counts it from the footer.
    lost = MemoryJobStore()
    lost.create_job(spec)
    assert execute.run_shard(spec, 0, executor(engine), lost).status == "skipped"
    assert lost.get_job(spec.job_id).rows_done == 3 and engine.calls == [3]
    outcome = execute.run_shard(spec, 1, executor(engine), lost)
    assert outcome.finalized and lost.get_job(spec.job_id).status == "completed"
    assert load_stats(spec.output).rows_total == 6


def test_shards_of_a_finished_or_cancelled_job_do_not_run(job):
    spec = job(prompts(6))
    store = MemoryJobStore()
    store.create_job(spec)
    store.cancel_job(spec.job_id)
    engine = FakeEngine()
    assert execute.run_shard(spec, 0, executor(engine), store).status == "skipped"
    assert engine.calls == [] and not part_exists(spec.output, 0)


def test_an_engine_that_fails_on_every_row_fails_the_shard(job):
    spec = job(prompts(4), shard_size=4)
    store = MemoryJobStore()
    store.create_job(spec)
    with pytest.raises(RuntimeError, match="device-side"):
        execute.run_shard(spec, 0, executor(FakeEngine(broken=True)), store)
    assert not part_exists(spec.output, 0)


def test_input_changed_after_submit_fails_the_job(job):
    spec = job(prompts(6))
    with open(spec.input, "a") as extra:
        extra.write(json.dumps({"prompt": "late"}) + "\n")
    record = execute.run_job_locally(spec, executor())
    assert record.status == "failed" and "changed since the job was submitted" in record.error


def test_unwritable_output_fails_the_job_with_a_clear_error(job, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    spec = job(prompts(3), output=str(blocker / "out"))
    record = execute.run_job_locally(spec, executor())
    assert record.status == "failed" and "cannot write" in record.error and str(blocker) in record.error


def test_finalize_refuses_a_job_whose_part_went_missing(job):
    spec = job(prompts(6))
    store = MemoryJobStore()
    store.create_job(spec)
    execute.run_shard(spec, 0, executor(), store)
    os.remove(part_path(spec.output, 0))
    outcome = execute.run_shard(spec, 1, executor(), store)
    assert outcome.status == "failed" and "a part is missing" in outcome.error
    assert store.get_job(spec.job_id).status == "failed"


def test_shard_stats_name_worker_gpu_and_time(job):
    spec = job(prompts(3))
    execute.run_job_locally(spec, executor())
    [stats] = read_shard_stats(spec.output)
    assert stats == part_stats(spec.output, 0)
    assert (stats.worker, stats.gpu, stats.rows_total) == ("host-a:1", "cpu", 3)
    assert stats.wall_seconds > 0 and stats.started_at <= stats.finished_at
    footer = pq.read_schema(part_path(spec.output, 0)).metadata
    assert b"batchgen.shard_stats" in footer


def test_prepare_output_refuses_or_replaces_an_earlier_job(job):
    spec = job(prompts(3))
    execute.run_job_locally(spec, executor())
    save_spec(spec)
    other = spec.model_copy(update={"job_id": "another-job"})
    with pytest.raises(JobOutputError, match="already holds"):
        prepare_output(other)
    keep = f"{spec.output}/notes.txt"
    open(keep, "w").write("mine")
    prepare_output(other, replace=True)
    prepare_output(other)                               # nothing of batchgen's is left
    assert open(keep).read() == "mine"
    with pytest.raises(JobOutputError):
        load_spec(spec.output)


def test_cancel_check_asks_the_store_at_most_every_interval(job):
    spec = job(prompts(3))
    store = MemoryJobStore()
    store.create_job(spec)
    asked = []
    real = store.is_cancelled
    store.is_cancelled = lambda job_id: asked.append(job_id) or real(job_id)
    should_stop = execute.cancel_check(store, spec.job_id, interval_s=3600)
    assert not should_stop() and not should_stop()
    store.cancel_job(spec.job_id)
    assert not should_stop() and len(asked) == 1                # within the interval: not asked again
    should_stop = execute.cancel_check(store, spec.job_id, interval_s=0)
    assert should_stop() and should_stop() and len(asked) == 2  # once cancelled, never asked again


def test_the_job_cache_salt_reaches_the_engine_on_every_call(job):
    salted = job(prompts(7), cache_salt="tenant-a")          # 3 shards
    engine = FakeEngine()
    assert execute.run_job_locally(salted, executor(engine)).status == "completed"
    assert engine.salts == ["tenant-a"] * 3
    save_spec(salted)
    assert load_spec(salted.output).cache_salt == "tenant-a"

    plain = job(prompts(3), output=str(Path(salted.output).parent / "plain"))
    execute.run_job_locally(plain, executor(engine))
    assert engine.salts[-1] is None


def test_jobs_share_prefix_cache_blocks_only_under_the_same_salt(job, tiny_model_dir, tmp_path):
    """The real engine, shared by four jobs in turn: a job reuses the KV blocks an earlier job left only when
    both carry the same cache salt; the text is the same either way."""
    from batchgen import LLM

    llm = LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32")
    row = {"id": "r0", "prompt": "The weather in the hills turned cold and wet before the harvest. " * 3}

    def run(name: str, salt: str | None):
        spec = job([row], output=str(tmp_path / name), cache_salt=salt, sampling={"max_tokens": 4, "temperature": 0})
        assert execute.run_job_locally(spec, execute.Executor.for_llm(llm)).status == "completed"
        [out] = pq.read_table(spec.output).to_pylist()
        return load_stats(spec.output).cached_tokens, out["text"], out["prompt_tokens"]

    first, other_salt, same_salt, unsalted = run("a1", "a"), run("b", "b"), run("a2", "a"), run("none", None)
    prompt_tokens = first[2]
    assert prompt_tokens >= 2 * llm.engine.config.block_size
    assert first[0] == other_salt[0] == unsalted[0] == 0
    assert same_salt[0] >= (prompt_tokens - 1) // llm.engine.config.block_size * llm.engine.config.block_size
    assert first[1] == other_salt[1] == same_salt[1] == unsalted[1]
