"""fp8 KV-cache scales from checkpoints (every published spelling reaches the attention layers; unsupported KV
schemes are refused) and the fp8 cache's accuracy on the real default model."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen.models import load_model
from test_quant import CHAT_PROMPTS, FIXED_TEXT, write_checkpoint

CPU = torch.device("cpu")


def with_tensors(source, destination, tensors: dict[str, torch.Tensor], config_fields: dict | None = None):
    """A copy of `source` whose checkpoint also holds `tensors` (and whose config.json has `config_fields`)."""
    shutil.copytree(source, destination)
    weights = load_file(destination / "model.safetensors")
    save_file(weights | tensors, destination / "model.safetensors")
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps(config | (config_fields or {})))
    return destination


@pytest.mark.parametrize("spelling", ["self_attn.{kind}_scale", "self_attn.{kind}_proj.{kind}_scale",
                                      "self_attn.{kind}_proj.output_scale", "self_attn.qkv_proj.{kind}_scale"])
def test_kv_scales_of_every_spelling_reach_the_attention_layers(tiny_model_dir, tmp_path, spelling):
    # compressed-tensors, ModelOpt, older compressed-tensors and fused-qkv exports; distinct values per layer/kind
    scales = {(layer, kind): 0.01 * (layer + 1) + (0.5 if kind == "v" else 0.0)
              for layer in range(2) for kind in "kv"}
    model_dir = with_tensors(tiny_model_dir("llama"), tmp_path / "model", {
        f"model.layers.{layer}.{spelling.format(kind=kind)}": torch.tensor(value)
        for (layer, kind), value in scales.items()})
    model, _ = load_model(model_dir, torch.float32, CPU)
    for layer, attention in enumerate(model.attention_layers):
        assert attention.kv_scales_loaded
        assert attention.k_scale == pytest.approx(scales[layer, "k"]) and isinstance(attention.k_scale, float)
        assert attention.v_scale == pytest.approx(scales[layer, "v"])


def test_checkpoint_kv_scales_set_what_the_fp8_cache_stores(tiny_model_dir, tmp_path):
    """A scale of 1/4 stores 4 K and 4 V: every first-layer element in e4m3's normal range (2^-6 .. 448, where a
    power of two scales exactly) is 4 times what a checkpoint without scales stores (later layers' K/V follow
    attention outputs, which the finer rounding of small values moves slightly), and attention reads back the
    same."""
    from batchgen import LLM, SamplingParams

    plain = tiny_model_dir("llama")
    scaled = with_tensors(plain, tmp_path / "scaled", {
        f"model.layers.{layer}.self_attn.{kind}_scale": torch.tensor(0.25) for layer in range(2) for kind in "kv"})
    prompts = [[5, 9, 300, 7, 41, 8, 99, 3], [17, 2000, 12, 5]]
    caches, logprobs = {}, {}
    for name, model_dir in (("plain", plain), ("scaled", scaled)):
        with LLM(str(model_dir), device="cpu", kv_cache_dtype="fp8", num_kv_blocks=16) as llm:
            outputs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0))
            caches[name] = llm.engine.runner.kv_cache[0].float()   # layer 0's K and V
            logprobs[name] = torch.tensor([p.logprob for o in outputs for p in o.prompt_logprobs[1:]])
    normal = (caches["plain"].abs() >= 2.0 ** -6) & (caches["plain"].abs() <= 448 / 4)
    assert normal.sum() > 0.9 * (caches["plain"] != 0).sum()
    assert torch.equal(caches["scaled"][normal], 4 * caches["plain"][normal])
    torch.testing.assert_close(logprobs["scaled"], logprobs["plain"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["ct-tensor", "modelopt"])
def test_fp8_checkpoints_kv_scales_load_with_their_weights(tiny_model_dir, tmp_path, layout):
    fp8_dir, _ = write_checkpoint(tiny_model_dir("llama"), tmp_path, layout)   # scales of 0.1, as the tools write
    model, _ = load_model(fp8_dir, torch.float32, CPU)
    assert [(a.k_scale, a.v_scale) for a in model.attention_layers] == [(pytest.approx(0.1), pytest.approx(0.1))] * 2


def test_a_checkpoint_without_kv_scales_keeps_one(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("llama"), torch.float32, CPU)
    assert {(a.k_scale, a.v_scale, a.kv_scales_loaded) for a in model.attention_layers} == {(1.0, 1.0, False)}


@pytest.mark.parametrize("layout, scheme, match", [
    ("ct-tensor", {"type": "int", "num_bits": 8, "strategy": "tensor", "dynamic": False},
     "kv_cache_scheme other than static per-tensor fp8"),
    ("ct-tensor", {"type": "float", "num_bits": 8, "strategy": "attn_head", "dynamic": False},
     "kv_cache_scheme other than static per-tensor fp8"),
    ("modelopt", "INT8", "kv_cache_quant_algo 'INT8'"),
])
def test_unsupported_kv_cache_schemes_are_refused(tiny_model_dir, tmp_path, layout, scheme, match):
    fp8_dir, _ = write_checkpoint(tiny_model_dir("llama"), tmp_path, layout)
    if layout == "modelopt":
        path = fp8_dir / "hf_quant_config.json"
        found = json.loads(path.read_text())
        found["quantization"]["kv_cache_quant_algo"] = scheme
    else:
        path = fp8_dir / "config.json"
        found = json.loads(path.read_text())
        found["quantization_config"]["kv_cache_scheme"] = scheme
    path.write_text(json.dumps(found))
    with pytest.raises(ValueError, match=match):
        load_model(fp8_dir, torch.float32, CPU)


def test_per_head_kv_scales_are_refused(tiny_model_dir, tmp_path):
    model_dir = with_tensors(tiny_model_dir("llama"), tmp_path / "model",
                             {"model.layers.0.self_attn.k_scale": torch.ones(2)})
    with pytest.raises(ValueError, match="only per-tensor scales"):
        load_model(model_dir, torch.float32, CPU)


@pytest.mark.parametrize("value", [0.0, -0.5, math.inf])
def test_kv_scales_that_are_not_positive_are_refused(tiny_model_dir, tmp_path, value):
    model_dir = with_tensors(tiny_model_dir("llama"), tmp_path / "model",
                             {"model.layers.1.self_attn.v_scale": torch.tensor(value)})
    with pytest.raises(ValueError, match="v_scale is .*: a scale must be a positive finite number"):
        load_model(model_dir, torch.float32, CPU)


@pytest.mark.slow   # the 135M default model, twice
def test_fp8_kv_cache_of_the_default_model_keeps_its_perplexity(default_model_dir):
    """SmolLM2-135M with an fp8 KV cache (no scales in the checkpoint: 1.0) keeps perplexity on a fixed text within
    5% of the fp32 cache's; greedy agreement on 16 chat prompts is printed (docs/benchmarks.md)."""
    from batchgen import LLM, SamplingParams

    engines = {kv: LLM(str(default_model_dir), dtype="float32", device="cpu", num_kv_blocks=256, max_num_seqs=16,
                       kv_cache_dtype=kv) for kv in ("auto", "fp8")}
    tokens = engines["auto"].tokenizer.encode(FIXED_TEXT)
    ppl = {}
    for kv, llm in engines.items():
        scored = llm.generate([tokens], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs
        ppl[kv] = math.exp(-sum(position.logprob for position in scored[1:]) / (len(tokens) - 1))
    prompts = [json.loads(line)["messages"] for line in open(CHAT_PROMPTS).readlines()[:16]]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = {kv: [o.outputs[0].token_ids for o in llm.chat(prompts, greedy)] for kv, llm in engines.items()}
    first_difference = sorted(next((t for t, (a, b) in enumerate(zip(want, got)) if a != b), 32)
                              for want, got in zip(outputs["auto"], outputs["fp8"]))
    print(f"\nSmolLM2-135M perplexity fp32 KV {ppl['auto']:.3f}, fp8 KV {ppl['fp8']:.3f} "
          f"({ppl['fp8'] / ppl['auto'] - 1:+.2%}); first differing greedy token per prompt: {first_difference}")
    assert ppl["fp8"] <= 1.05 * ppl["auto"]
