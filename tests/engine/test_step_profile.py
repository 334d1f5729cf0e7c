"""The step profile (bench's `steps`) books every computed token once, and the overlapped step loop computes
exactly the tokens it must: each prompt token, and each generated token except the last of a request (a
request that a length limit ends is not scheduled for the token that ends it)."""
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
