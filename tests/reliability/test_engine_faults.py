"""The engine under stress, through the job service with real workers: a poison row that makes every step it
is in raise, a device on which every step raises, a KV cache far too small for the batch, and a cancel while
shards are generating. Every row that can be served says exactly what the model says to it in this process
(greedy decoding)."""
import json
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen import SamplingParams
from batchgen.cli import EXIT_CANCELLED, main
from batchgen.engine.engine import MAX_SOLO_FAILURES
from batchgen.jobs.output_dir import list_parts, load_stats
from batchgen.workers.app import job_store, queue_length, queue_name
from harness import every_row_once, reference_texts, wait_until, write_jsonl

pytestmark = pytest.mark.slow   # real worker processes


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def submit(path, output, model: str, *options) -> str:
    result = cli("submit", path, "-o", output, "--model", model, "--temperature", 0, *options)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_a_poison_row_is_retried_a_bounded_number_of_times_then_fails_alone(model_alias, start_worker,
                                                                           reference_llm, tmp_path):
    prompts = [f"Row {i}: describe a quiet morning" for i in range(8)]
    prompts[5] = "Row 5: describe a xylophone morning"
    tokenizer = reference_llm.tokenizer
    clean = [p for i, p in enumerate(prompts) if i != 5]
    expected = reference_llm.generate(clean, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    seen_elsewhere = {t for p in clean for t in tokenizer.encode(p)} | {
        t for o in expected for t in o.outputs[0].token_ids}
    poison = next(t for t in tokenizer.encode(prompts[5]) if t not in seen_elsewhere)
    fault_log = tmp_path / "faults.log"
    model = model_alias("poison")
    worker = start_worker(model, env={"FAULT_POISON_TOKEN": str(poison), "FAULT_LOG": str(fault_log)}).wait_ready()

    rows = [{"id": f"p{i}", "prompt": p, "ignore_eos": True} for i, p in enumerate(prompts)]
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, "--shard-size",
                    4, "--max-tokens", 12)
    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 90)
    assert waited.exit_code == 0, waited.output + worker.log_text()[-3000:]

    table = every_row_once(str(tmp_path / "out"), [r["id"] for r in rows])
    poisoned = table.pop(5)
    assert poisoned["error"].startswith(f"{tmp_path / 'in.jsonl'}: row 6: ")
    assert f"the engine failed on this request {MAX_SOLO_FAILURES} times" in poisoned["error"]
    assert f"simulated device fault on token {poison}" in poisoned["error"]
    assert [r["text"] for r in table] == [o.outputs[0].text for o in expected]      # the rest of its shard too
    assert all(r["error"] is None for r in table)
    assert (load_stats(str(tmp_path / "out")).rows_failed, job_store().get_job(job_id).rows_failed) == (1, 1)
    # the step with the whole batch, then the poison row alone until it gives up
    assert MAX_SOLO_FAILURES <= len(fault_log.read_text().splitlines()) <= MAX_SOLO_FAILURES + 1


def test_kv_cache_pressure_preempts_and_changes_no_output(model_alias, start_worker, reference_llm, tmp_path):
    # 12 blocks of 8 tokens: a ~45-token prompt and its 30 new tokens need 10 of them, and 8 rows are admitted at
    # once (greedy admission: while their prompts fit)
    model = model_alias("small-cache")
    worker = start_worker(model, "--engine-arg", "num_kv_blocks=12", "--engine-arg", "block_size=8",
                          "--engine-arg", "kv_admission=greedy").wait_ready()
    prompts = [f"Report {i}: " + " ".join(f"item{(i * 7 + j) % 23}" for j in range(16)) for i in range(8)]
    lengths = [len(reference_llm.tokenizer.encode(p)) for p in prompts]
    assert all(35 <= n <= 60 for n in lengths), lengths
    rows = [{"id": f"kv{i}", "prompt": p, "ignore_eos": True} for i, p in enumerate(prompts)]
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, "--shard-size",
                    4, "--max-tokens", 30)
    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 120)
    assert waited.exit_code == 0, waited.output + worker.log_text()[-3000:]

    table = every_row_once(str(tmp_path / "out"), [r["id"] for r in rows])
    unpressured = reference_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    assert sum(o.num_preemptions for o in unpressured) == 0
    assert [r["text"] for r in table] == [o.outputs[0].text for o in unpressured]
    assert [r["completion_tokens"] for r in table] == [30] * len(rows) and all(r["error"] is None for r in table)
    assert load_stats(str(tmp_path / "out")).preemptions > 0


def test_cancel_stops_the_running_shards_and_starts_no_more(model_alias, start_worker, reference_llm, tmp_path):
    # 20 ms a step: a shard of 1500 tokens would run for 30 s; shard 0 asks for 3 tokens and finishes at once
    model = model_alias("cancel")
    worker = start_worker(model, env={"FAULT_STEP_DELAY_S": "0.02"}).wait_ready()
    rows = [{"id": f"c{i}", "prompt": f"Count the waves, part {i}",
             **({"max_tokens": 3} if i < 2 else {"max_tokens": 1500, "ignore_eos": True})} for i in range(12)]
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, "--shard-size",
                    2)
    store = job_store()

    def generating() -> bool:
        records = {s.shard_index: s.state for s in store.shard_records(job_id)}
        return records == {0: "done", 1: "running", 2: "running"}
    wait_until(generating, 60, "shard 0 done and shards 1 and 2 generating")
    time.sleep(0.5)
    assert "cancelled" in cli("cancel", job_id).output
    cancelled_at = time.monotonic()
    wait_until(lambda: worker.log_text().count("'cancelled'") == 2, 10, "both running shards to stop")
    assert time.monotonic() - cancelled_at < 10                      # at their next steps, not after 30 s
    assert cli("wait", job_id).exit_code == EXIT_CANCELLED
    wait_until(lambda: queue_length(queue_name(model)) == 0 and worker.log_text().count("'skipped'") == 3,
               30, "the shards still queued to be dropped")

    assert [s.shard_index for s in store.shard_records(job_id)] == [0, 1, 2]     # no shard started after
    assert [index for index, _ in list_parts(str(tmp_path / "out"))] == [0]
    kept = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert [r["id"] for r in kept] == ["c0", "c1"]
    assert [r["text"] for r in kept] == reference_texts(reference_llm, [r["prompt"] for r in rows[:2]], max_tokens=3)
    record = store.get_job(job_id)
    assert (record.status, record.shards_done, record.rows_done) == ("cancelled", 1, 2)
    assert not (tmp_path / "out" / ".batchgen" / "stats.json").exists()
    assert json.loads(cli("status", job_id, "--json").output)["stalled"] is None


def test_a_broken_engine_hands_its_shard_to_another_worker_and_stops(model_alias, start_worker, reference_llm,
                                                                     tmp_path):
    model = model_alias("broken")
    broken = start_worker(model, env={"FAULT_BROKEN": "1"}).wait_ready()
    rows = [{"id": f"b{i}", "prompt": f"Name a colour, attempt {i}"} for i in range(8)]
    job_id = submit(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", model, "--shard-size", 4,
                    "--max-tokens", 4)
    assert broken.process.wait(timeout=60) == 0                 # it gave up on itself, and left cleanly
    assert "the engine is broken" in broken.log_text() and job_store().get_job(job_id).status == "running"

    healthy = start_worker(model).wait_ready()
    waited = cli("wait", job_id, "--interval", 0.2, "--timeout", 60)
    assert waited.exit_code == 0, waited.output + healthy.log_text()[-3000:]
    table = every_row_once(str(tmp_path / "out"), [r["id"] for r in rows])
    assert [r["text"] for r in table] == reference_texts(reference_llm, [r["prompt"] for r in rows], max_tokens=4)
    assert all(r["error"] is None for r in table)
