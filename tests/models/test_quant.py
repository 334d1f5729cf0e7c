"""fp8 weight formats: published fp8 checkpoint layouts and online quantization, against references.

Each checkpoint test quantizes a tiny random model's weights itself into one published layout (the real tensor
names and config keys), loads it, and checks (1) every Linear holds exactly the dequantized weights the test
wrote, (2) logits match transformers run on those dequantized weights with each projection's input rounded to
fp8 as the format prescribes (per token, per token per group, or a static scale), by hooks written here.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchgen.models import load_model
from batchgen.models.linear import Linear
from batchgen.models.quant import Fp8Block, Fp8PerChannel, Unquantized
from paged_runner import PagedSequences, run_paged
from test_logits_vs_hf import random_sequences

CPU = torch.device("cpu")
CHAT_PROMPTS = Path(__file__).parents[2] / "benchmarks" / "chat_prompts.jsonl"
FP8 = torch.float8_e4m3fn
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# relative L2 of logits against the reference that rounds activations the same way: summation order differs, so
# an input near an fp8 rounding boundary may round the other way
LOGITS_TOLERANCE = 2e-3


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1, keepdim=True) / 448.0
    return (weight / scale).to(FP8), scale


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().max() / 448.0
    return (weight / scale).to(FP8), scale


def quantize_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    blocks = weight.view(rows // block, block, cols // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    quantized = (blocks / scale[:, None, :, None]).to(FP8)
    return quantized.view(rows, cols), scale


def dequantize_blocks(quantized: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return quantized.float() * scale.repeat_interleave(block, 0).repeat_interleave(block, 1)


def input_amax(model_dir) -> dict[str, float]:
    """Calibration as the quantization tools do it: the largest input each projection sees on some tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    amax: dict[str, float] = {}

    def hook(name):
        return lambda module, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    for name, module in model.named_modules():
        if name.endswith(PROJECTIONS):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for tokens in random_sequences(model.config.vocab_size, seed=1):
            model(torch.tensor([tokens]))
    return amax


def write_checkpoint(source, destination, layout: str, ignore=()):
    """Quantize `source`'s projections into `layout`; returns (quantized dir, dequantized float dir)."""
    weights = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    amax = input_amax(source) if layout in ("ct-tensor", "modelopt") else {}
    quantized, dequantized = {}, dict(weights)
    for name, weight in weights.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.endswith(PROJECTIONS)) or any(p in name for p in ignore):
            quantized[name] = weight
            continue
        if layout == "ct-channel":
            q, scale = quantize_rows(weight)
            quantized |= {name: q, f"{module}.weight_scale": scale}
            dequantized[name] = q.float() * scale
        elif layout in ("ct-tensor", "modelopt"):
            q, scale = quantize_tensor(weight)
            # q, k, v calibrated apart: different input scales, all at least the calibrated one
            spread = {"k_proj": 1.25, "v_proj": 1.5}.get(module.rpartition(".")[2], 1.0)
            input_scale = torch.tensor(amax[module] / 448.0 * spread)
            shape = () if layout == "modelopt" else (1,)
            quantized |= {name: q, f"{module}.weight_scale": scale.reshape(shape),
                          f"{module}.input_scale": input_scale.reshape(shape)}
            dequantized[name] = q.float() * scale
        else:   # ct-block, qwen-block
            q, scale = quantize_blocks(weight, 32)
            scale_name = "weight_scale" if layout == "ct-block" else "weight_scale_inv"
            quantized |= {name: q, f"{module}.{scale_name}": scale}
            dequantized[name] = dequantize_blocks(q, scale, 32)
    if layout in ("ct-tensor", "modelopt"):   # fp8 KV-cache calibration, as the tools write it
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.self_attn" + (".k_proj" if layout == "modelopt" else "")
            quantized[f"{prefix}.k_scale"] = torch.tensor(0.1)
            quantized[f"{prefix.replace('k_proj', 'v_proj')}.v_scale"] = torch.tensor(0.1)

    fp8_weights = {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False}
    dynamic_tokens = {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": True, "strategy": "token"}
    quantization_config = {
        "ct-channel": {"weights": fp8_weights | {"strategy": "channel"}, "input_activations": dynamic_tokens},
        "ct-tensor": {"weights": fp8_weights | {"strategy": "tensor"},
                      "input_activations": dynamic_tokens | {"dynamic": False, "strategy": "tensor"}},
        "ct-block": {"weights": fp8_weights | {"strategy": "block", "block_structure": [32, 32]},
                     "input_activations": dynamic_tokens | {"strategy": "group", "group_size": 32}},
    }.get(layout)
    if quantization_config is not None:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head", *ignore],
            "kv_cache_scheme": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}
            if layout == "ct-tensor" else None,
            "config_groups": {"group_0": {"targets": ["Linear"], **quantization_config}}}
    elif layout == "qwen-block":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": [32, 32]}
    for directory, tensors, with_config in ((destination / "fp8", quantized, True),
                                            (destination / "dequantized", dequantized, False)):
        shutil.copytree(source, directory)
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
        written = config if with_config else {k: v for k, v in config.items() if k != "quantization_config"}
        (directory / "config.json").write_text(json.dumps(written))
    if layout == "modelopt":
        (destination / "fp8" / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    return destination / "fp8", destination / "dequantized"


def round_to_fp8(x: torch.Tensor, group: int | None = None, static_scale: float | None = None) -> torch.Tensor:
    """x [..., K] rounded to fp8 with a scale per row (per `group` columns), or one static scale, and back."""
    rows = x.reshape(-1, x.shape[-1] // (group or x.shape[-1]), group or x.shape[-1])
    scale = rows.abs().amax(-1, keepdim=True) / 448.0 if static_scale is None else torch.tensor(static_scale)
    return ((rows / scale).clamp(-448.0, 448.0).to(FP8).float() * scale).view(x.shape)


def fp8_input_hooks(reference_dir, fp8_dir, layout: str):
    """Forward pre-hooks for the transformers model rounding each projection's input as `layout` does."""
    if layout in ("ct-tensor", "modelopt"):
        checkpoint = load_file(fp8_dir / "model.safetensors")
        scale = {name.removesuffix(".input_scale"): tensor.item() for name, tensor in checkpoint.items()
                 if name.endswith(".input_scale")}
        fused = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
        for name in list(scale):   # parts of one fused layer share the largest of their scales
            prefix, _, short = name.rpartition(".")
            group = next((g for g in fused if short in g), (short,))
            scale[name] = max(scale[f"{prefix}.{part}"] for part in group)
        return {name: lambda x, s=s: round_to_fp8(x, static_scale=s) for name, s in scale.items()}
    group = 32 if layout in ("ct-block", "qwen-block") else None
    return {name: lambda x: round_to_fp8(x, group) for name, tensor in load_file(
        reference_dir / "model.safetensors").items() if name.removesuffix(".weight").endswith(PROJECTIONS)
        for name in [name.removesuffix(".weight")]}


def reference_logits(reference_dir, sequences, input_hooks=None) -> torch.Tensor:
    """transformers' logits of `sequences`, concatenated, each projection's input rounded by its hook."""
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    for name, round_input in (input_hooks or {}).items():
        reference.get_submodule(name).register_forward_pre_hook(lambda module, args, f=round_input: (f(args[0]),))
    with torch.no_grad():
        return torch.cat([reference(torch.tensor([tokens])).logits[0] for tokens in sequences])


def logits_error(model, config, reference_dir, input_hooks=None) -> float:
    sequences = random_sequences(config.vocab_size)
    ours = torch.cat(run_paged(model, config, sequences))
    want = reference_logits(reference_dir, sequences, input_hooks)
    return ((ours - want).norm() / want.norm()).item()


def assert_holds_weights(model, reference_dir):
    """Every Linear's dequantized weight is exactly the checkpoint's dequantized parts, stacked."""
    reference = load_file(reference_dir / "model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            parent = name.rpartition(".")[0]
            parts = [name] if None in module.part_rows else [f"{parent}.{part}" for part in module.part_rows]
            expected = torch.cat([reference[f"{part}.weight"] for part in parts])
            assert torch.equal(module.dequantized_weight(), expected), name


@pytest.mark.parametrize("arch, layout, weight_format", [
    ("llama", "ct-channel", Fp8PerChannel),
    ("llama", "ct-tensor", Fp8PerChannel),
    ("llama", "ct-block", Fp8Block),
    ("qwen3", "qwen-block", Fp8Block),
    ("qwen2", "modelopt", Fp8PerChannel),
])
def test_fp8_checkpoint_loads_and_matches_its_dequantized_reference(tiny_model_dir, tmp_path, arch, layout,
                                                                    weight_format):
    fp8_dir, reference_dir = write_checkpoint(tiny_model_dir(arch), tmp_path, layout)
    model, config = load_model(fp8_dir, torch.float32, CPU)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.weight_format, weight_format) and qkv.weight.dtype == FP8
    assert isinstance(model.lm_head.weight_format, Unquantized)   # every layout here ignores lm_head
    assert_holds_weights(model, reference_dir)
    if layout in ("ct-tensor", "modelopt"):
        # one static input scale for q/k/v: the largest of the three
        checkpoint = load_file(fp8_dir / "model.safetensors")
        scales = [checkpoint[f"model.layers.0.self_attn.{p}_proj.input_scale"].item() for p in "qkv"]
        assert qkv.input_scale.max().item() == pytest.approx(max(scales))
        assert len(set(scales)) == 3
    assert logits_error(model, config, reference_dir, fp8_input_hooks(reference_dir, fp8_dir, layout)) \
        < LOGITS_TOLERANCE


def test_ignored_modules_stay_in_the_compute_dtype(tiny_model_dir, tmp_path):
    fp8_dir, reference_dir = write_checkpoint(tiny_model_dir("llama"), tmp_path, "ct-channel",
                                              ignore=("layers.1.mlp.down_proj",))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    model, _ = load_model(fp8_dir, torch.float32, CPU)
    assert isinstance(model.model.layers[1].mlp.down_proj.weight_format, Unquantized)
    assert isinstance(model.model.layers[0].mlp.down_proj.weight_format, Fp8PerChannel)
    assert_holds_weights(model, reference_dir)


def test_online_fp8_quantizes_each_weight_per_output_channel(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")   # biases on q/k/v stay in the compute dtype
    model, config = load_model(model_dir, torch.float32, CPU, quantization="fp8")
    checkpoint = load_file(model_dir / "model.safetensors")
    layer = model.model.layers[1].mlp.gate_up_proj
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (layer.out_features,)
    for part, (start, size) in layer.part_rows.items():
        q, scale = quantize_rows(checkpoint[f"model.layers.1.mlp.{part}.weight"])
        assert torch.equal(layer.weight[start:start + size].float(), q.float())
        assert torch.allclose(layer.weight_scale[start:start + size], scale.squeeze(1), rtol=1e-6, atol=0)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.bias.dtype == torch.float32
    assert torch.equal(qkv.bias, torch.cat([checkpoint[f"model.layers.0.self_attn.{p}_proj.bias"] for p in "qkv"]))
    assert isinstance(model.lm_head.weight_format, Unquantized)
    reference_dir = tmp_path / "dequantized"
    shutil.copytree(model_dir, reference_dir)
    save_file({name: quantize_rows(w)[0].float() * quantize_rows(w)[1]
               if name.removesuffix(".weight").endswith(PROJECTIONS) else w for name, w in checkpoint.items()},
              reference_dir / "model.safetensors")
    assert logits_error(model, config, reference_dir, fp8_input_hooks(reference_dir, None, "online")) \
        < LOGITS_TOLERANCE


def test_online_fp8_dummy_weights_are_the_float_draws_quantized(tiny_model_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", config_only / "config.json")
    fp8, _ = load_model(config_only, torch.bfloat16, CPU, load_format="dummy", quantization="fp8")
    float_model, _ = load_model(config_only, torch.bfloat16, CPU, load_format="dummy")
    for name, module in fp8.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            reference = float_model.get_submodule(name).weight
            q, scale = quantize_rows(reference.float())
            assert torch.equal(module.weight.float(), q.float()), name
            assert torch.equal(module.dequantized_weight(), (q.float() * scale).to(torch.bfloat16)), name


def test_linear_holds_expert_weights_part_by_part():
    layer = Linear(32, {"gate_proj": 16, "up_proj": 16}, bias=False, num_experts=3)
    layer.set_format(Fp8PerChannel(torch.float32, checkpoint_scale=None))
    weights = torch.randn(3, 2, 16, 32)
    for expert in range(3):
        for index, part in enumerate(("gate_proj", "up_proj")):
            layer.load("weight", part, weights[expert, index], expert=expert)
    assert layer.weight.shape == (3, 32, 32) and layer.weight_scale.shape == (3, 32)
    expected = torch.stack([torch.cat([quantize_rows(w)[0].float() * quantize_rows(w)[1] for w in expert])
                            for expert in weights])
    assert torch.allclose(layer.dequantized_weight(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout, block", [("per-channel", None), ("block", (16, 16))])
def test_fp8_linear_is_the_product_of_its_quantized_operands(layout, block):
    """forward = (per-token fp8 rounding of x) @ dequantized W, summed in fp32."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 64, generator=generator), torch.randn(48, 64, generator=generator)
    layer = Linear(64, 48, bias=True)
    layer.set_format(Fp8PerChannel(torch.float32, None) if block is None else Fp8Block(torch.float32, block,
                                                                                       "weight_scale_inv"))
    if block is None:
        layer.load("weight", None, weight)
    else:
        q, scale = quantize_blocks(weight, 16)
        layer.load("weight", None, q)
        layer.load("weight_scale_inv", None, scale)
    layer.load("bias", None, torch.randn(48, generator=generator))
    group = 64 if block is None else 16
    x_groups = x.view(5, -1, group)
    x_scale = x_groups.abs().amax(-1, keepdim=True) / 448.0
    x_rounded = ((x_groups / x_scale).to(FP8).float() * x_scale).view(5, 64)
    expected = x_rounded @ layer.dequantized_weight().T + layer.bias
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization_config, match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "strategy": "group"},
        "input_activations": None}}}, "compressed-tensors checkpoint: a scheme other than fp8 weights"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fp8 format 'e5m2'"),
])
def test_unsupported_quantization_config_names_what_was_found(tiny_model_dir, tmp_path, quantization_config, match):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))
    with pytest.raises(ValueError, match=match):
        load_model(model_dir, torch.float32, CPU)


def test_fused_parts_half_ignored_are_refused(tiny_model_dir, tmp_path):
    fp8_dir, _ = write_checkpoint(tiny_model_dir("llama"), tmp_path, "ct-channel")
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*k_proj"]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantizes only some of the fused projections .*unquantized: "
                                         "model.layers.0.self_attn.k_proj"):
        load_model(fp8_dir, torch.float32, CPU)


FIXED_TEXT = ("The history of the bicycle begins in the early nineteenth century, when inventors in Europe built "
              "two-wheeled machines that riders pushed along with their feet. Pedals attached to the front wheel "
              "came decades later, and the chain drive that turns the rear wheel made the modern safety bicycle "
              "possible by the 1880s. Pneumatic tyres, lighter steel frames and gears followed, and within a few "
              "years millions of people used bicycles to travel to work, to school and into the countryside.")


def perplexity(model, config, tokens: list[int]) -> float:
    logits = PagedSequences(model, config).step({0: tokens})[0][0]
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:])).exp().item()


@pytest.mark.slow   # the 135M default model, twice
def test_online_fp8_of_the_default_model_keeps_its_perplexity(default_model_dir):
    """Acceptance: SmolLM2-135M quantized online keeps perplexity on a fixed text within 5% of fp32; how many of
    16 chat prompts' first 32 greedy tokens are identical to fp32 is printed (docs/benchmarks.md)."""
    from batchgen import LLM, SamplingParams

    engines = {name: LLM(str(default_model_dir), dtype="float32", device="cpu", num_kv_blocks=128, max_num_seqs=16,
                         quantization=quantization) for name, quantization in (("fp32", None), ("fp8", "fp8"))}
    fp8_layer = engines["fp8"].engine.model.model.layers[0].mlp.down_proj
    assert fp8_layer.weight.dtype == FP8
    prompts = [json.loads(line)["messages"] for line in open(CHAT_PROMPTS).readlines()[:16]]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = {name: [o.outputs[0].token_ids for o in llm.chat(prompts, greedy)] for name, llm in engines.items()}
    # after generating: PagedSequences gives the attention layers caches of its own
    tokens = engines["fp32"].tokenizer.encode(FIXED_TEXT)
    ppl = {name: perplexity(llm.engine.model, llm.engine.model_config, tokens) for name, llm in engines.items()}
    identical = sum(a == b for a, b in zip(outputs["fp32"], outputs["fp8"]))
    print(f"\nSmolLM2-135M perplexity fp32 {ppl['fp32']:.3f}, online fp8 {ppl['fp8']:.3f} "
          f"({ppl['fp8'] / ppl['fp32'] - 1:+.2%}); first 32 greedy tokens identical to fp32: {identical}/16")
    assert ppl["fp8"] <= 1.05 * ppl["fp32"]
    assert all(len(tokens) == 32 for run in outputs.values() for tokens in run)


def test_run_cli_quantization_fp8_is_the_api_s_online_fp8(tiny_model_dir, tmp_path):
    """`batchgen run --quantization fp8` reaches the engine: its greedy outputs are the fp8 LLM's, which differ
    from the float model's (the tiny model's large weights make its fp8 rounding change tokens)."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from batchgen import LLM, SamplingParams
    from batchgen.cli import main

    model_dir, prompts = tiny_model_dir("llama"), ["The cat sat on", "Numbers: 1 2 3", "Hello"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n"
                                               for i, p in enumerate(prompts)))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out"), "--model",
                                       str(model_dir), "--quantization", "fp8", "--max-tokens", "8",
                                       "--temperature", "0", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    got = {row["id"]: row["text"] for row in rows}
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    want = {quantization: [o.outputs[0].text for o in LLM(str(model_dir), dtype="float32", device="cpu",
                                                           quantization=quantization).generate(prompts, greedy)]
            for quantization in (None, "fp8")}
    assert [got[str(i)] for i in range(len(prompts))] == want["fp8"] != want[None]


def test_online_fp8_never_holds_the_float_projections(tiny_model_dir, monkeypatch):
    """The projections' storage is fp8 from the start (built on meta, materialized in the format's dtypes) and the
    checkpoint streams one tensor at a time: no point of the load holds the model's float projections."""
    from batchgen.models.llama import LlamaForCausalLM

    real_load_weights, seen = LlamaForCausalLM.load_weights, {}

    def load_weights(model, weights):
        seen.update({name: param.dtype for name, param in model.named_parameters()})
        return real_load_weights(model, weights)

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", load_weights)
    load_model(tiny_model_dir("llama"), torch.bfloat16, CPU, quantization="fp8")
    projections = {name: dtype for name, dtype in seen.items() if name.endswith("_proj.weight")}
    assert len(projections) == 2 * 4 and set(projections.values()) == {FP8}
    assert seen["lm_head.weight"] == seen["model.norm.weight"] == torch.bfloat16
