"""Prompt logprobs and scoring requests against Hugging Face transformers: log-softmax of the forward logits at
each position (fp32, CPU), whatever the engine does underneath (chunked prefill splitting the prompt, the
prompt's prefix already in the prefix cache, a batch mixing scoring and generation)."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchgen import LLM, SamplingParams

TOP_K = 3


def hf_logprobs(model_dir, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[len(prompt), vocab] log-softmax of HF's logits; row p is the distribution of token p + 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), dim=-1) for p in prompts]


def assert_matches_hf(outputs, prompts, references, top_k: int = TOP_K):
    for prompt, output, reference in zip(prompts, outputs, references):
        assert output.error is None
        scored = output.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:], dtype=torch.long)]
        got = torch.tensor([entry.logprob for entry in scored[1:]], dtype=torch.float32)
        assert [entry.token_id for entry in scored[1:]] == prompt[1:]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        for position in range(1, len(prompt)):
            values, ids = reference[position - 1].topk(top_k)
            top = scored[position].top
            assert list(top) == ids.tolist()
            torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=1e-4, rtol=0)


def random_prompts(seed: int, count: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 2000) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 2000) for _ in range(rng.choice([1, 2, 9, 17, 30]))] for _ in range(count)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prompt_logprobs_match_hf_with_chunked_prefill(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = random_prompts(1, 6)
    # a 7-token budget splits most prompts over several steps, and puts several prompts in one step
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=7, block_size=4, max_num_seqs=3,
              generation_config="none")
    outputs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=TOP_K))
    assert_matches_hf(outputs, prompts, hf_logprobs(model_dir, prompts))
    for output in outputs:
        assert output.outputs[0].token_ids == [] and output.outputs[0].finish_reason == "length"


def test_prompt_logprobs_with_the_prefix_already_cached(tiny_model_dir):
    """The prefix blocks are in the cache from an earlier generation: a scoring request still gets every
    position's logprobs, and a generation request beside it still reuses the cache."""
    model_dir = tiny_model_dir("llama")
    prompts = random_prompts(2, 4, shared_prefix=24)
    llm = LLM(str(model_dir), dtype="float32", block_size=4, max_num_batched_tokens=16, generation_config="none")
    first = llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))
    assert first[0].error is None
    scored = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=TOP_K))
    assert_matches_hf(scored, prompts, hf_logprobs(model_dir, prompts))
    plain = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert plain[1].num_cached_tokens >= 24
    assert [o.outputs[0].token_ids for o in scored] == [o.outputs[0].token_ids for o in plain]


@pytest.mark.slow   # the 135M default model, HF beside it
def test_default_model_prompt_logprobs_and_mixed_batch(default_model_dir):
    """The embedded model, prompts of real text; scoring rows and generating rows in the same steps leave the
    generated tokens as they are alone."""
    llm = LLM("default", dtype="float32", max_num_batched_tokens=24, block_size=8, generation_config="none")
    texts = ["The capital of France is Paris. The capital of Italy is", "Tea is a drink made from",
             "One, two, three, four, five, six, seven"]
    prompts = [llm.tokenizer.encode(text) for text in texts]
    params = [SamplingParams(max_tokens=0, prompt_logprobs=0), SamplingParams(max_tokens=5, temperature=0),
              SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=TOP_K)]
    outputs = llm.generate(prompts, params)
    references = hf_logprobs(default_model_dir, prompts)
    assert_matches_hf(outputs[2:], prompts[2:], references[2:])
    assert all(entry.top == {} for entry in outputs[0].prompt_logprobs[1:])
    expected = references[0][torch.arange(len(prompts[0]) - 1), torch.tensor(prompts[0][1:])]
    torch.testing.assert_close(torch.tensor([e.logprob for e in outputs[0].prompt_logprobs[1:]]), expected,
                               atol=1e-4, rtol=0)
    assert outputs[1].prompt_logprobs is None
    alone = llm.generate(prompts[1:], SamplingParams(max_tokens=5, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs[1:]] == [o.outputs[0].token_ids for o in alone]


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "max_tokens 0 is for scoring"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=1, beam_width=2), "beam search"),
])
def test_bad_prompt_logprob_params_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_bench_score_mode_runs_beside_hf_forward(tiny_model_dir):
    """The GPU scoring benchmark's CPU twin: prompt tokens/s of batchgen and of HF's forward pass."""
    import json

    from click.testing import CliRunner

    from batchgen.bench import bench_command

    result = CliRunner().invoke(bench_command, ["--model", str(tiny_model_dir("llama")), "--score", "--num-requests",
                                                "6", "--input-len", "20", "--hf-static-batch", "3"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["system"] for line in lines] == ["batchgen", "hf-forward"]
    for line in lines:
        assert line["prompt_tokens"] == 120 and line["output_tokens"] == 0 and line["prompt_tok_per_s"] > 0
