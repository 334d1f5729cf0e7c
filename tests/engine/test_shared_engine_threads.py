"""One engine and one tokenizer shared by threads, as a worker's shard threads share them through EngineLoop:
the callers encode and decode while the loop thread decodes stop-string windows and grammar masks fill; and
the engine's threads stop when it closes."""
import threading

import pytest

from batchgen import LLM, SamplingParams
from batchgen.engine.loop import EngineLoop
from batchgen.sampling_params import StructuredOutput

NUM_THREADS = 4
ROUNDS = 2


def rows(thread: int) -> list[tuple[str | list[dict], SamplingParams]]:
    """Mixed rows: plain and chat prompts, stop strings, a choice and a JSON schema constraint (greedy)."""
    greedy = dict(temperature=0.0, max_tokens=12)
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    return [
        (f"Thread {thread} says hello", SamplingParams(**greedy)),
        ([{"role": "user", "content": f"Count to {thread + 3}."}], SamplingParams(**greedy, stop=["e", "a"])),
        (f"Pick one for row {thread}:", SamplingParams(**greedy, structured=StructuredOutput(choice=["yes", "no"]))),
        ([{"role": "user", "content": f"Give n={thread}"}],
         SamplingParams(temperature=0.0, max_tokens=40, structured=StructuredOutput(json_schema=schema))),
        (f"{thread} {thread} {thread}", SamplingParams(**greedy, stop=[" ", "o"], include_stop_str_in_output=True)),
    ]


def encode(llm: LLM, prompt) -> list[int]:
    return llm.tokenizer.encode(prompt) if isinstance(prompt, str) else llm.tokenizer.encode_chat(prompt)


def summary(outputs) -> list[tuple]:
    return [(o.error, o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
             o.outputs[0].stop_reason) for o in outputs]


@pytest.fixture
def new_grammar_threads():
    """The grammar threads started since the test began (engines other tests keep alive hold their own)."""
    def grammar_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith(("grammar-compile", "grammar-mask"))}

    before = grammar_threads()
    return lambda: grammar_threads() - before


@pytest.fixture
def llm(tiny_model_dir):
    # a tiny random model behind the default model's tokenizer and chat template
    return LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu")


def test_four_threads_through_one_loop_match_a_single_threaded_run(llm, new_grammar_threads):
    expected = {}
    for thread in range(NUM_THREADS):
        work = rows(thread)
        expected[thread] = summary(llm.generate_tokens([encode(llm, p) for p, _ in work], [s for _, s in work]))
    assert [error for outputs in expected.values() for error, *_ in outputs if error] == []
    assert any(reason in ("e", "a", " ", "o") for outputs in expected.values() for *_, reason in outputs)

    loop = EngineLoop(llm)
    results: dict[int, list] = {thread: [] for thread in range(NUM_THREADS)}
    failures: list[BaseException] = []
    start = threading.Barrier(NUM_THREADS)

    def shard(thread: int) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                work = rows(thread)
                prompts = [encode(llm, p) for p, _ in work]   # encoding while other threads' rows run
                results[thread].append(summary(loop.generate_tokens(prompts, [s for _, s in work])))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=shard, args=(t,)) for t in range(NUM_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for thread in range(NUM_THREADS):
        assert results[thread] == [expected[thread]] * ROUNDS
    loop.close()
    assert not new_grammar_threads()


def test_close_stops_the_grammar_threads(llm, new_grammar_threads):
    with llm:
        choice = SamplingParams(temperature=0.0, max_tokens=4, structured=StructuredOutput(choice=["yes", "no"]))
        output = llm.generate("Answer:", choice)[0]
        assert output.outputs[0].text in ("yes", "no")
        assert new_grammar_threads()
    assert not new_grammar_threads()


def test_a_closed_loop_fails_new_calls_instead_of_hanging(llm):
    loop = EngineLoop(llm)
    assert loop.generate_tokens([[11, 12, 13]], SamplingParams(temperature=0.0, max_tokens=2))[0].error is None
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.generate_tokens([[11, 12, 13]], SamplingParams(temperature=0.0, max_tokens=2))
