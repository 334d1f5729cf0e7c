"""The fp8 KV cache through the engine (CPU: the torch references with a float8_e4m3fn cache, the numerics the
GPU kernels run): logits and greedy tokens near the compute-dtype cache's, and the capacity it buys."""
import json
import logging
import os
from collections import defaultdict

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.config import EngineConfig
from test_engine_vs_hf import mixed_prompts

MAX_NEW = 16
# Relative L2 of the fp8-cache logits against the fp32-cache logits of the same step, on the tiny llama with
# weights of std 0.05 (measured: max 0.053, mean 0.027): K and V are each rounded to 3 mantissa bits (up to
# 6.25%, ~3.6% rms), and with two layers little dilutes that. (The suite's usual std 0.3 makes attention so sharp
# that a K rounding flips which key wins: that model measures the tie-breaking, not the cache.)
LOGITS_MAX_ERROR, LOGITS_MEAN_ERROR = 0.08, 0.04


def greedy_with_logits(llm: LLM, prompts) -> tuple[list[list[int]], dict[tuple, list[torch.Tensor]]]:
    """Greedy outputs and, per prompt, the logits each of its tokens was sampled from (the runner's output rows,
    recorded as the engine hands them to the sampler)."""
    logits = defaultdict(list)
    runner = llm.engine.runner
    execute = runner.execute

    def recording_execute(inputs, pending=None):
        rows = execute(inputs, pending)
        for request, row in zip(inputs.sampling_requests, rows):
            logits[tuple(request.prompt_token_ids)].append(row.clone())
        return rows

    runner.execute = recording_execute
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    runner.execute = execute
    return [o.outputs[0].token_ids for o in outputs], logits


def test_fp8_kv_cache_logits_and_greedy_tokens_stay_near_the_fp32_cache(tiny_model_dir, caplog):
    prompts = mixed_prompts(seed=5)
    model_dir = str(tiny_model_dir("llama", initializer_range=0.05))
    with LLM(model_dir, device="cpu") as llm:
        exact_tokens, exact_logits = greedy_with_logits(llm, prompts)
    with caplog.at_level(logging.WARNING), LLM(model_dir, device="cpu", kv_cache_dtype="fp8") as llm:
        assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
        # pages of 32 tokens, V keys-contiguous (kernels/store_kv.py): the references read it through its strides
        v_cache = llm.engine.runner.model.attention_layers[0].v_cache
        assert llm.engine.config.block_size == 32 and v_cache.shape[1] == 32 and v_cache.stride(1) == 1
        fp8_tokens, fp8_logits = greedy_with_logits(llm, prompts)
    assert "no K/V scales" in caplog.text   # the tiny checkpoint has none: scale 1.0, said once
    errors, same_argmax, first_difference = [], 0, []
    for prompt, exact, fp8 in zip(prompts, exact_tokens, fp8_tokens):
        # logits of step t are comparable while both runs fed the model the same tokens before it
        first_difference.append(next((t for t, (a, b) in enumerate(zip(exact, fp8)) if a != b), MAX_NEW))
        for step in range(min(first_difference[-1] + 1, MAX_NEW)):
            want, got = exact_logits[tuple(prompt)][step], fp8_logits[tuple(prompt)][step]
            errors.append(float((got - want).norm() / want.norm()))
            same_argmax += int(got.argmax() == want.argmax())
    print(f"\nfp8 KV vs fp32 KV: logits relative L2 max {max(errors):.4f} mean {sum(errors) / len(errors):.4f}, "
          f"same argmax {same_argmax}/{len(errors)} over the comparable steps; first differing greedy token per "
          f"prompt: {sorted(first_difference)}")
    assert max(errors) < LOGITS_MAX_ERROR and sum(errors) / len(errors) < LOGITS_MEAN_ERROR
    assert same_argmax >= 0.85 * len(errors)   # measured 122/134


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_kv_cache_holds_one_token_per_byte_more(tiny_model_dir, dtype):
    # the same KV budget holds itemsize times the tokens: 4x fp32's, 2x bf16's
    capacity = {}
    for kv_cache_dtype in ("auto", "fp8"):
        with LLM(str(tiny_model_dir("llama")), device="cpu", dtype=dtype, kv_cache_bytes=1 << 22,
                 kv_cache_dtype=kv_cache_dtype) as llm:
            capacity[kv_cache_dtype] = llm.engine.kv_capacity_tokens
            runner = llm.engine.runner
            assert runner.kv_cache.numel() * runner.kv_cache.element_size() <= 1 << 22
    assert capacity["fp8"] == capacity["auto"] * getattr(torch, dtype).itemsize


@pytest.mark.parametrize("command", ["run", "worker"])
def test_cli_kv_cache_dtype_reaches_the_engine_config(command, tmp_path, monkeypatch):
    """`--kv-cache-dtype fp8` becomes EngineConfig(kv_cache_dtype="fp8"): what `run` hands LLM, what `worker`
    hands its executor (recorded where the model would load, which then stops the command)."""
    import batchgen
    from click.testing import CliRunner

    from batchgen.cli import main
    from batchgen.workers import tasks

    seen = {}

    def stop_loading(model="default", **engine_args):
        seen.update(engine_args or json.loads(os.environ["BATCHGEN_ENGINE_ARGS"]))
        raise ValueError("recorded")

    monkeypatch.setattr(batchgen, "LLM", stop_loading)
    monkeypatch.setattr(tasks, "load_executor", stop_loading)
    monkeypatch.setenv("BATCHGEN_ENGINE_ARGS", "{}")   # restored after the worker command sets it
    monkeypatch.setenv("BATCHGEN_MODEL", "default")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    arguments = {"run": ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out")], "worker": ["worker"]}
    result = CliRunner().invoke(main, [*arguments[command], "--kv-cache-dtype", "fp8", "--device", "cpu"])
    assert "recorded" in result.output
    assert seen["kv_cache_dtype"] == "fp8" and EngineConfig(model="m", **seen).kv_cache_dtype == "fp8"
