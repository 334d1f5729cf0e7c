"""The engine with tensor_parallel_size=2 (two gloo ranks on the CPU) against the same engine with one rank and
against Hugging Face `generate` on the same weights (fp32): tokens identical under chunked prefill, preemption,
prefix caching, n > 1, beam search and prompt logprobs; a rank that dies once restarts the ranks and the run ends
with the one-rank tokens; one that keeps dying, or ranks that can't start again, fail the engine with an error
naming the rank; close() leaves no rank process behind.

A process holds one tensor-parallel group at a time, and layers read it when they are built: each family's
single-rank results are made before its two-rank engine starts, and that engine is closed before the next.
BATCHGEN_TEST_TP_DEVICE=cuda runs the same tests on two GPUs (NCCL, CUDA graphs)."""
import logging
import multiprocessing
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from test_engine_vs_hf import hf_greedy, mixed_prompts
from test_families_vs_hf import FAMILIES

from batchgen import LLM, SamplingParams
from batchgen.engine.engine import MAX_TP_RESTARTS
from batchgen.engine.errors import EngineBroken

DEVICE = os.environ.get("BATCHGEN_TEST_TP_DEVICE", "cpu")
MAX_NEW = 10
# one engine shape that chunks prompts (16-token budget), preempts (30 blocks of 4 tokens for requests of up to
# 80 tokens, admitted while their prompts fit) and hits the prefix cache (prompts share a head); 8 rows of
# prompt logits at a time
ENGINE_ARGS = dict(dtype="float32", device=DEVICE, block_size=4, num_kv_blocks=30, max_num_batched_tokens=16,
                   max_num_seqs=8, kv_admission="greedy")
GEMMA = "gemma3-softcap-tied"
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=2)
BEAMS = SamplingParams(beam_width=3, n=2, max_tokens=5)
SCORING = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
HANG_GUARD_S = 120   # a failed rank must end the call long before this
KILL_ENGINE_ARGS = dict(dtype="float32", device=DEVICE, num_kv_blocks=64, max_num_batched_tokens=16)
KILL_PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def seeded(count: int) -> list[SamplingParams]:
    return [SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=5, seed=100 + i) for i in range(count)]


@dataclass
class Family:
    tp2: LLM
    prompts: list[list[int]]
    hf_tokens: list[list[int]]
    single: dict   # the single-rank engine's outputs, by test


@pytest.fixture(scope="module", params=["llama", GEMMA])
def family(request, tiny_model_dir):
    arch, overrides = FAMILIES.get(request.param, (request.param, {}))
    model_dir = tiny_model_dir(arch, **overrides)
    prompts = mixed_prompts(seed=13, count=6, shared_prefix=20)   # past Gemma's 16-token window
    hf_tokens = hf_greedy(model_dir, prompts, MAX_NEW)
    tp1 = LLM(str(model_dir), **ENGINE_ARGS)
    single = {"greedy": tp1.generate(prompts, GREEDY), "seeded": tp1.generate(prompts, seeded(len(prompts))),
              "beams": tp1.generate(prompts[:3], BEAMS), "scoring": tp1.generate(prompts, SCORING)}
    tp2 = LLM(str(model_dir), tensor_parallel_size=2, **ENGINE_ARGS)
    yield Family(tp2, prompts, hf_tokens, single)
    tp2.close()


def completions(outputs):
    assert all(o.error is None for o in outputs)
    return [[c.token_ids for c in o.outputs] for o in outputs]


def rank_processes(llm: LLM):
    return [r.process for r in llm.engine.runner.ranks.ranks]


def test_greedy_tokens_equal_one_rank_and_hf_under_chunking_preemption_and_prefix_caching(family):
    outputs = family.tp2.generate(family.prompts, GREEDY)
    assert completions(outputs) == completions(family.single["greedy"])
    for output, want in zip(outputs, family.hf_tokens):
        tokens = output.outputs[0].token_ids
        assert tokens == want[:len(tokens)]
        assert len(tokens) == len(want) or tokens[-1] in family.tp2.engine.eos_token_ids
    for output, reference in zip(outputs, family.single["greedy"]):
        for got, ref in zip(output.outputs[0].logprobs, reference.outputs[0].logprobs):
            assert got.top.keys() == ref.top.keys()
            assert max(abs(got.top[t] - ref.top[t]) for t in got.top) < 1e-4
    assert max(len(p) for p in family.prompts) > ENGINE_ARGS["max_num_batched_tokens"]   # prompts ran in chunks
    assert sum(o.num_preemptions for o in outputs) > 0
    assert sum(o.num_cached_tokens for o in outputs) > 0


def test_seeded_samples_equal_one_rank(family):
    outputs = completions(family.tp2.generate(family.prompts, seeded(len(family.prompts))))
    assert outputs == completions(family.single["seeded"])
    assert any(len({tuple(c) for c in samples}) > 1 for samples in outputs)


def test_beam_search_and_prompt_logprobs_equal_one_rank(family):
    assert completions(family.tp2.generate(family.prompts[:3], BEAMS)) == completions(family.single["beams"])
    for output, reference in zip(family.tp2.generate(family.prompts, SCORING), family.single["scoring"]):
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(reference.prompt_logprobs)
        for entry, ref in zip(output.prompt_logprobs[1:], reference.prompt_logprobs[1:]):
            assert entry.token_id == ref.token_id and abs(entry.logprob - ref.logprob) < 1e-4
            assert entry.top.keys() == ref.top.keys()


def test_close_stops_every_rank_and_then_frees_the_process_for_another_engine(family):
    processes = rank_processes(family.tp2)
    assert processes and all(p.is_alive() for p in processes)
    model_dir = str(family.tp2.engine.model_path)
    with pytest.raises(RuntimeError, match="close it"):   # it would build its layers for the running group
        LLM(model_dir, **ENGINE_ARGS)
    family.tp2.close()
    assert not any(p.is_alive() for p in processes)
    assert LLM(model_dir, **ENGINE_ARGS).generate(family.prompts[:1], GREEDY)[0].outputs[0].token_ids == \
        family.single["greedy"][0].outputs[0].token_ids


def run_in_thread(run: Callable[[], object]) -> dict:
    """`run()`'s result or exception, failing the test if it is still going after HANG_GUARD_S."""
    outcome = {}

    def target() -> None:
        try:
            outcome["result"] = run()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the engine hung after a rank died"
    return outcome


def kill_rank_1_from_step(llm: LLM, first: int, every_step: bool, killed: list) -> Callable[[], bool]:
    """A should_stop that SIGKILLs rank 1 before step `first` (and, if `every_step`, whichever rank 1 is alive
    before every later step); the processes it killed go to `killed`."""
    steps = []

    def kill() -> bool:
        steps.append(1)
        (process,) = rank_processes(llm)
        if (len(steps) == first or every_step and len(steps) > first) and process not in killed:
            os.kill(process.pid, signal.SIGKILL)
            killed.append(process)
        return False

    return kill


def test_a_killed_rank_restarts_the_ranks_and_the_run_completes_with_one_rank_tokens(tiny_model_dir, caplog):
    model_dir = str(tiny_model_dir("llama"))
    prompts = mixed_prompts(seed=2, count=6)
    tp1 = LLM(model_dir, **KILL_ENGINE_ARGS)
    want = [o.outputs[0].token_ids for o in tp1.generate_tokens(prompts, KILL_PARAMS)]
    llm = LLM(model_dir, tensor_parallel_size=2, **KILL_ENGINE_ARGS)
    killed = []
    with caplog.at_level(logging.WARNING, logger="batchgen.engine.engine"):
        outcome = run_in_thread(lambda: llm.generate_tokens(
            prompts, KILL_PARAMS, should_stop=kill_rank_1_from_step(llm, 3, every_step=False, killed=killed)))
    assert "error" not in outcome, outcome.get("error")
    assert [o.outputs[0].token_ids for o in outcome["result"]] == want
    assert llm.engine.num_tp_restarts == 1
    assert "rank 1" in caplog.text and "SIGKILL" in caplog.text and "restarting the ranks" in caplog.text
    (restarted,) = rank_processes(llm)
    assert restarted.is_alive() and len(killed) == 1 and restarted is not killed[0]
    llm.close()
    assert not restarted.is_alive()


def test_a_rank_that_keeps_dying_fails_the_engine_naming_it_and_close_stops_the_rest(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), tensor_parallel_size=2, **KILL_ENGINE_ARGS)
    killed = []
    outcome = run_in_thread(lambda: llm.generate_tokens(
        mixed_prompts(seed=2, count=6), KILL_PARAMS,
        should_stop=kill_rank_1_from_step(llm, 3, every_step=True, killed=killed)))
    error = outcome.get("error")
    assert isinstance(error, EngineBroken) and "rank 1" in str(error) and "SIGKILL" in str(error)
    assert f"gave up after {MAX_TP_RESTARTS} restarts" in str(error)
    assert llm.engine.num_tp_restarts == MAX_TP_RESTARTS and len(killed) == MAX_TP_RESTARTS + 1
    with pytest.raises(EngineBroken, match="rank 1"):   # and stays failed
        llm.generate_tokens([[5, 6, 7]], SamplingParams(max_tokens=2))
    llm.close()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("batchgen-tp-rank")]


def test_ranks_that_cant_start_again_fail_the_engine_naming_both_errors(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    llm = LLM(str(model_dir), tensor_parallel_size=2, **KILL_ENGINE_ARGS)
    for weights in model_dir.glob("*.safetensors"):   # a restarted rank finds no shard to load
        weights.unlink()
    outcome = run_in_thread(lambda: llm.generate_tokens(
        mixed_prompts(seed=2, count=6), KILL_PARAMS,
        should_stop=kill_rank_1_from_step(llm, 3, every_step=False, killed=[])))
    error = outcome.get("error")
    assert isinstance(error, EngineBroken)
    assert re.search(r"rank 1 .*SIGKILL.*restarting the ranks failed: tensor-parallel rank 1 raised", str(error))
    llm.close()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("batchgen-tp-rank")]


def test_a_rank_that_raises_at_start_fails_the_engine_naming_it_and_leaves_no_process(tiny_model_dir):
    with pytest.raises(EngineBroken, match=r"tensor-parallel rank \d raised \w+Error: .*allocate"):
        LLM(str(tiny_model_dir("llama")), tensor_parallel_size=2, dtype="float32", device=DEVICE, num_kv_blocks=10**12)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("batchgen-tp-rank")]
