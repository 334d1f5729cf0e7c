"""The engine against Hugging Face transformers on the same weights (fp32, CPU): greedy tokens must be
identical, whatever the engine does underneath (preemption, chunked prefill, prefix caching, n > 1). On a CUDA
machine the engine also runs on the GPU (Triton kernels, CUDA graphs) against the same CPU reference."""
import random
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchgen import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
MAX_NEW = 12
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mixed_prompts(seed: int, count: int = 16, vocab: int = 2000, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.choice([1, 3, 7, 16, 17, 33, 50]))]
            for _ in range(count)]


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF `generate`, one prompt at a time (no padding), stopping at eos like the engine."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=model.generation_config.eos_token_id)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def cut_after_eos(token_ids: list[int], eos_token_ids) -> list[int]:
    """HF pads finished beams with eos: keep up to the first eos."""
    for i, token_id in enumerate(token_ids):
        if token_id in eos_token_ids:
            return token_ids[: i + 1]
    return token_ids


def engine_greedy(llm: LLM, prompts, max_new_tokens: int, n: int = 1):
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens, n=n))
    assert all(o.error is None for o in outputs)
    return outputs


ENGINE_VARIANTS = {
    "plain": {},
    # ~100 tokens of KV for 16 prompts, admitted while their prompts fit (the default admission avoids this)
    "preemption": {"num_kv_blocks": 24, "block_size": 4, "kv_admission": "greedy"},
    "chunked_prefill": {"max_num_batched_tokens": 8},
    "no_prefix_cache": {"enable_prefix_caching": False},
}


# mixture-of-experts models differ from the others only in the MLP: they skip the no-prefix-cache variant,
# which exercises nothing MLP-specific, to keep the suite fast
ARCH_VARIANTS = [(arch, variant) for arch in ARCHS for variant in ENGINE_VARIANTS] + [
    (arch, variant) for arch in MOE_ARCHS for variant in ENGINE_VARIANTS if variant != "no_prefix_cache"]


@pytest.fixture(scope="module")
def tiny_arch(request, tiny_model_dir):
    model_dir = tiny_model_dir(request.param)
    prompts = mixed_prompts(seed=zlib.crc32(request.param.encode()) % 1000)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiny_arch,variant", ARCH_VARIANTS, indirect=["tiny_arch"])
def test_greedy_matches_hf_token_for_token(tiny_arch, variant, device):
    model_dir, prompts, expected = tiny_arch
    llm = LLM(str(model_dir), dtype="float32", device=device, **ENGINE_VARIANTS[variant])
    outputs = engine_greedy(llm, prompts, MAX_NEW)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    if variant == "preemption":
        assert sum(o.num_preemptions for o in outputs) > 0


@pytest.mark.parametrize("tiny_arch", ["llama"], indirect=True)
def test_reserve_admission_under_a_small_cache_matches_hf_and_preempts_less(tiny_arch):
    # the "preemption" variant's cache (~100 tokens for 16 prompts): the default admission keeps the running
    # requests' growth in reserve, so it recomputes less than admitting while prompts fit; tokens never change
    model_dir, prompts, expected = tiny_arch
    preemptions = {}
    for admission in ("reserve", "greedy"):
        llm = LLM(str(model_dir), dtype="float32", device="cpu", num_kv_blocks=24, block_size=4,
                  kv_admission=admission)
        outputs = engine_greedy(llm, prompts, MAX_NEW)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        preemptions[admission] = sum(o.num_preemptions for o in outputs)
    assert preemptions["reserve"] < preemptions["greedy"], preemptions


@pytest.mark.parametrize("tiny_arch", ARCHS + MOE_ARCHS, indirect=True)
def test_n_samples_share_prompt_blocks_and_greedy_samples_match_hf(tiny_arch):
    model_dir, prompts, expected = tiny_arch
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4)
    outputs = engine_greedy(llm, prompts, MAX_NEW, n=3)
    for output, want in zip(outputs, expected):
        assert [c.token_ids for c in output.outputs] == [want] * 3
    long_prompts = [o for o in outputs if len(o.prompt_token_ids) >= 8]
    assert long_prompts and all(o.num_cached_tokens == 0 for o in long_prompts)
    # samples after the first reuse the prompt's full blocks
    assert llm.engine.kv_cache.num_hit_tokens >= sum((len(o.prompt_token_ids) - 1) // 4 * 4 * 2
                                                     for o in long_prompts)


@pytest.mark.slow   # the 135M default model, HF generate beside it
def test_default_model_greedy_matches_hf(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_num_batched_tokens=64)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "2+2=", "Name three colors.",
                 "Explain gravity in one sentence.", "Who wrote Hamlet?", "Translate 'cat' to Spanish.",
                 "What is photosynthesis?", "List two prime numbers.", "Say hello.", "What is Python?",
                 "Why is the sky blue?", "Define entropy.", "What day comes after Monday?", "Give me a fruit.",
                 "How many legs does a spider have?"]
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    expected = hf_greedy(default_model_dir, prompts, 24)
    outputs = engine_greedy(llm, prompts, 24)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].text.strip() for o in outputs)


def test_prefix_caching_saves_prompt_compute_and_keeps_outputs(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = mixed_prompts(seed=5, count=32, shared_prefix=96)
    runs = {}
    for caching in (False, True):
        llm = LLM(str(model_dir), dtype="float32", device="cpu", enable_prefix_caching=caching)
        runs[caching] = (engine_greedy(llm, prompts, 6), llm.engine.num_computed_prompt_tokens)
    (plain, plain_computed), (cached, cached_computed) = runs[False], runs[True]
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in cached]
    total_prompt = sum(len(p) for p in prompts)
    assert plain_computed == total_prompt
    assert cached_computed <= total_prompt - 31 * 96 + 31 * 16   # all but the first reuse the shared blocks
    assert sum(o.num_cached_tokens for o in cached) == total_prompt - cached_computed


@pytest.mark.parametrize("arch", ["qwen3", *MOE_ARCHS])
def test_logprobs_match_hf_log_softmax(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = mixed_prompts(seed=11, count=6)
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            reference = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        for step, entry in enumerate(completion.logprobs):
            row = reference[len(prompt) - 1 + step]
            assert entry.token_id == completion.token_ids[step]
            assert abs(entry.logprob - row[entry.token_id].item()) < 1e-4
            top_values, top_ids = row.topk(3)
            assert list(entry.top) == top_ids.tolist()
            assert max(abs(entry.top[i] - v) for i, v in zip(top_ids.tolist(), top_values.tolist())) < 1e-4
        assert abs(completion.cumulative_logprob - sum(e.logprob for e in completion.logprobs)) < 1e-4


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_32(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    prompts = mixed_prompts(seed=3, count=32)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1000 + i) for i in range(32)]
    together = llm.generate(prompts, params)
    for i in (0, 13, 31):
        alone = llm.generate([prompts[i]], params[i])
        assert alone[0].outputs[0].token_ids == together[i].outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in together}) > 1


def test_beam_search_matches_hf_num_beams(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = mixed_prompts(seed=21, count=4)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4)
    outputs = llm.generate(prompts, SamplingParams(beam_width=3, n=3, max_tokens=8, length_penalty=1.0))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            reference = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3,
                                       num_return_sequences=3, max_new_tokens=8, do_sample=False,
                                       pad_token_id=model.generation_config.eos_token_id)
        expected = [cut_after_eos(row[len(prompt):].tolist(), llm.engine.eos_token_ids) for row in reference]
        assert [c.token_ids for c in output.outputs] == expected


def test_bad_prompts_become_errors_without_failing_the_rest(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_model_len=64)
    outputs = llm.generate([[5, 6, 7], [], list(range(3, 80)), [10**9], [8, 9]],
                           SamplingParams(temperature=0.0, max_tokens=3))
    assert [o.error is None for o in outputs] == [True, False, False, False, True]
    assert "empty" in outputs[1].error and "context" in outputs[2].error and "vocabulary" in outputs[3].error
    assert len(outputs[0].outputs[0].token_ids) == 3 and len(outputs[4].outputs[0].token_ids) == 3
