"""Gemma 3, Phi-3 and sliding-window models in the engine against Hugging Face `generate` on the same weights
(fp32, CPU): greedy tokens identical and logprobs within 1e-4, under batching, preemption, chunked prefill,
prefix caching and n > 1. Prompts run past the sliding window (16) and LongRoPE's original context (64)."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from batchgen import LLM, SamplingParams

MAX_NEW = 10
ORIGINAL_CONTEXT = 64
# Phi-4-mini's shape of LongRoPE: partial rotary 0.75 (12 of 16 dims: 6 factors)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.05, 1.2, 1.4, 1.9, 2.5], "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 30.0]}
FAMILIES = {
    "gemma3-softcap-tied": ("gemma3", {"final_logit_softcapping": 3.0, "tie_word_embeddings": True}),
    "gemma3-multimodal": ("gemma3_multimodal", {}),   # ties its output embedding by default
    "phi3-sliding-partial-rotary": ("phi3", {"sliding_window": 16, "partial_rotary_factor": 0.5}),
    "phi3-longrope": ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": ORIGINAL_CONTEXT,
                               "max_position_embeddings": 256}),
    # past its window: the context used to be capped there
    "mistral-sliding": ("mistral", {"sliding_window": 16}),
}
ENGINE_VARIANTS = {
    "batched_prefix_cache_n2": ({}, 2),
    "preemption_chunked_prefill": ({"num_kv_blocks": 28, "block_size": 4, "max_num_batched_tokens": 16,
                                    "kv_admission": "greedy"}, 1),
}


def prompts_for(family: str) -> list[list[int]]:
    """Prompts longer than the window; for LongRoPE, on both sides of the original context and crossing it
    while generating (58, 63, 64 + 10 new tokens)."""
    rng = random.Random(family)
    lengths = [58, 63, 64, 65, 90, 7] if "longrope" in family else [3, 17, 33, 50, 70]
    # a shared head, so prefix caching has blocks to hit
    head = [rng.randrange(3, 2000) for _ in range(20)]
    return [(head + [rng.randrange(3, 2000) for _ in range(n)])[:n] for n in lengths]


def hf_reference(model_dir, arch: str, prompts, longrope: bool = False):
    """Greedy tokens and per-step log-softmax of HF `generate`, one prompt at a time, stopping at eos."""
    model_class = AutoModelForImageTextToText if arch == "gemma3_multimodal" else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    if longrope:
        return [hf_recomputed_greedy(model, prompt) for prompt in prompts]
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=model.generation_config.eos_token_id)
        tokens = out.sequences[0, len(prompt):].tolist()
        results.append((tokens, [torch.log_softmax(step[0].float(), -1) for step in out.logits]))
    return results


def hf_recomputed_greedy(model, prompt: list[int]):
    """What HF `generate` computes for LongRoPE: the factor follows the sequence's length, and when a sequence
    crosses the original context its cache is dropped and every position recomputed with the long factor
    (Phi3ForCausalLM.prepare_inputs_for_generation). Here each step runs the whole sequence: that computation
    without the cache. transformers 5.24's generate gives the same tokens; 5.17's (the GPU image's) gives others
    from the crossing on, so generate itself is no reference there."""
    tokens, logprobs, eos = [], [], model.generation_config.eos_token_id
    for _ in range(MAX_NEW):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
        logprobs.append(torch.log_softmax(logits, -1))
        tokens.append(int(logits.argmax()))
        if tokens[-1] == eos:
            break
    return tokens, logprobs


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_model_dir):
    arch, overrides = FAMILIES[request.param]
    model_dir = tiny_model_dir(arch, **overrides)
    prompts = prompts_for(request.param)
    return model_dir, prompts, hf_reference(model_dir, arch, prompts, longrope="longrope" in request.param)


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_tokens_and_logprobs_match_hf_generate(family, variant):
    model_dir, prompts, expected = family
    engine_args, n = ENGINE_VARIANTS[variant]
    llm = LLM(str(model_dir), dtype="float32", device="cpu", **engine_args)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=1, n=n))
    assert all(o.error is None for o in outputs)
    for output, (tokens, logprobs) in zip(outputs, expected):
        assert len(output.outputs) == n
        for completion in output.outputs:
            assert completion.token_ids == tokens[:len(completion.token_ids)]
            assert len(completion.token_ids) == len(tokens) or completion.token_ids[-1] in llm.engine.eos_token_ids
            for step, entry in enumerate(completion.logprobs):
                assert abs(entry.logprob - logprobs[step][entry.token_id].item()) < 1e-4
    if n == 1:
        assert sum(o.num_preemptions for o in outputs) > 0
    else:
        assert sum(o.num_cached_tokens for o in outputs) > 0 and llm.engine.kv_cache.num_hit_tokens > 0
