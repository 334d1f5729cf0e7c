"""The step profile (bench's `steps`) books every computed token once, and the overlapped step loop computes
exactly the tokens it must: each prompt token, and each generated token except the last of a request (a
request that a length limit ends is not scheduled for the token that ends it). A run keeps the garbage collector
off the heap it found (the step loop's host time)."""
import gc

from batchgen import LLM, SamplingParams
from batchgen.bench import StepProfile


def test_profile_counts_every_computed_token_once(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", enable_prefix_caching=False,
              max_num_batched_tokens=32)
    profile = StepProfile()
    llm.engine.on_step = profile.record
    prompts = [[11 + i, 23 + i, 37 + 2 * i, 41 + i][: 2 + i % 3] * (1 + i % 4) for i in range(12)]
    max_tokens = [3 + i % 5 for i in range(12)]
    outputs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                     for n in max_tokens])
    assert [len(o.outputs[0].token_ids) for o in outputs] == max_tokens
    summary = profile.summary()
    computed = sum(map(len, prompts)) + sum(n - 1 for n in max_tokens)
    assert summary["decode"]["tokens"] + summary["mixed"]["tokens"] == computed
    assert summary["mixed"]["steps"] >= sum(map(len, prompts)) // 32        # the budget splits the prompts


def test_a_run_freezes_the_heap_it_found_and_thaws_it_after(tiny_model_dir):
    # full collections during a run skip the objects alive before it (the model's), and nothing stays frozen after
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    frozen_during_steps = []
    llm.engine.on_step = lambda launched, taken: frozen_during_steps.append(gc.get_freeze_count())
    assert gc.get_freeze_count() == 0
    outputs = llm.generate([[11, 23, 37], [41, 5]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]
    assert frozen_during_steps and min(frozen_during_steps) > 1000   # the model's modules and tensors, at least
    assert gc.get_freeze_count() == 0
