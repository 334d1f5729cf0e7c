"""What the engine does when a step raises (a poison request, a broken device), and the thread-shared
EngineLoop: concurrent callers get exactly their own results, cancel drops only the caller's work."""
import threading

import pytest

from batchgen import LLM, SamplingParams
from batchgen.engine.errors import Cancelled, EngineBroken
from batchgen.engine.loop import EngineLoop

POISON_TOKEN = 1234
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu")


def prompts(count: int, offset: int = 0) -> list[list[int]]:
    return [[10 + offset + i, 20 + i, 30 + 2 * i, 40 + i % 3][: 2 + i % 3] for i in range(count)]


def crash_on_token(llm: LLM, token_id: int | None):
    """Make the model raise in any step whose input holds `token_id` (None: every step). Returns the undo."""
    runner = llm.engine.runner
    forward = runner.forward

    def failing_forward(input_ids, *args):
        if token_id is None or bool((input_ids == token_id).any()):
            raise RuntimeError("simulated device fault")
        return forward(input_ids, *args)

    runner.forward = failing_forward
    return lambda: setattr(runner, "forward", forward)


def test_a_poison_request_ends_with_an_error_and_the_rest_are_unaffected(llm):
    clean = llm.generate_tokens(prompts(8), GREEDY)
    poisoned_prompts = prompts(8)
    poisoned_prompts[5] = poisoned_prompts[5] + [POISON_TOKEN]
    undo = crash_on_token(llm, POISON_TOKEN)
    try:
        outputs = llm.generate_tokens(poisoned_prompts, GREEDY)
    finally:
        undo()
    assert "simulated device fault" in outputs[5].error and "3 times" in outputs[5].error
    for i, (got, want) in enumerate(zip(outputs, clean)):
        if i != 5:
            assert got.error is None and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert not llm.engine.has_unfinished() and llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    assert llm.generate_tokens(prompts(3), GREEDY)[0].outputs[0].token_ids == clean[0].outputs[0].token_ids


def test_a_broken_engine_raises_and_leaves_nothing_behind(llm):
    undo = crash_on_token(llm, None)
    try:
        with pytest.raises(EngineBroken, match="simulated device fault"):
            llm.generate_tokens(prompts(4), GREEDY)
    finally:
        undo()
    assert not llm.engine.has_unfinished() and llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    llm.engine.consecutive_failed_steps = 0


def test_engine_loop_serves_concurrent_callers_their_own_results(llm):
    loop = EngineLoop(llm)
    work = {name: prompts(6, offset=k * 100) for k, name in enumerate("abcd")}
    expected = {name: llm.generate_tokens(p, GREEDY) for name, p in work.items()}
    results = {}

    def call(name):
        results[name] = loop.generate_tokens(work[name], GREEDY)

    threads = [threading.Thread(target=call, args=(name,)) for name in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for name in work:
        assert [o.outputs[0].token_ids for o in results[name]] == [o.outputs[0].token_ids for o in expected[name]]


def test_engine_loop_cancel_drops_only_the_cancelled_call(llm):
    loop = EngineLoop(llm)
    stop = threading.Event()
    outcome = {}

    def cancelled_call():
        try:
            loop.generate_tokens(prompts(6), SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True),
                                 should_stop=stop.is_set)
        except Cancelled:
            outcome["cancelled"] = True

    thread = threading.Thread(target=cancelled_call)
    thread.start()
    other = loop.generate_tokens(prompts(3, offset=50), GREEDY)
    stop.set()
    thread.join(timeout=60)
    assert outcome == {"cancelled": True}
    assert all(o.error is None and len(o.outputs[0].token_ids) > 0 for o in other)
    assert loop.generate_tokens(prompts(2), GREEDY)[0].error is None


def test_should_stop_cancels_a_synchronous_run(llm):
    with pytest.raises(Cancelled):
        llm.generate_tokens(prompts(4), GREEDY, should_stop=lambda: True)
    assert not llm.engine.has_unfinished()
