"""Weight loading: formats, dtypes, dummy weights, model-path resolution and every clear error."""
import json
import shutil
from fnmatch import fnmatch

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchgen.models import load_model, loader, resolve_model_path
from batchgen.models.checkpoint import CheckpointTensor, read
from batchgen.models.config import ModelConfig
from batchgen.models.llama import LlamaForCausalLM
from paged_runner import PagedSequences

CPU = torch.device("cpu")


def copy_model(source, destination, weights=True):
    destination.mkdir()
    for file in source.iterdir():
        if weights or file.suffix != ".safetensors":
            shutil.copy(file, destination / file.name)
    return destination


def parameters(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def assert_same_parameters(model_a, model_b):
    a, b = parameters(model_a), parameters(model_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoint_tensor_reads_the_region_torch_would_select(tmp_path):
    stored = {"stacked": torch.randn(3, 4, 6), "scale": torch.tensor(0.5)}
    save_file(stored, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        lazy = {name: CheckpointTensor(checkpoint, name) for name in stored}
        region = lazy["stacked"][1].narrow(1, 2, 3).narrow(0, 1, 2).narrow(-1, 1, 1)
        assert region.shape == (2, 1) and region.numel() == 2
        assert torch.equal(region.read(), stored["stacked"][1].narrow(1, 2, 3).narrow(0, 1, 2).narrow(-1, 1, 1))
        assert torch.equal(read(lazy["stacked"]), stored["stacked"])
        assert torch.equal(read(lazy["scale"]), stored["scale"])
        with pytest.raises(IndexError, match="stacked"):
            lazy["stacked"].narrow(2, 4, 3)
        with pytest.raises(IndexError, match="stacked"):
            lazy["stacked"][3]


def test_sharded_checkpoint_loads_the_same_weights(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")
    sharded = copy_model(model_dir, tmp_path / "sharded", weights=False)
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).save_pretrained(sharded,
                                                                                        max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_parameters(load_model(sharded, torch.float32, CPU)[0], load_model(model_dir, torch.float32, CPU)[0])


def test_fused_projections_hold_the_checkpoint_tensors(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    model, config = load_model(model_dir, torch.float32, CPU)
    checkpoint = load_file(model_dir / "model.safetensors")
    attention = model.model.layers[1].self_attn
    expected = torch.cat([checkpoint[f"model.layers.1.self_attn.{name}_proj.bias"] for name in "qkv"])
    assert torch.equal(attention.qkv_proj.bias, expected)
    mlp = model.model.layers[0].mlp
    expected = torch.cat([checkpoint[f"model.layers.0.mlp.{name}_proj.weight"] for name in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, expected)


def test_bfloat16_load_casts_weights_and_keeps_the_rotary_table_fp32(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    fp32, _ = load_model(model_dir, torch.float32, CPU)
    bf16, _ = load_model(model_dir, "bfloat16", CPU)
    for name, param in parameters(bf16).items():
        assert param.dtype == torch.bfloat16 and not param.requires_grad
        assert torch.equal(param, parameters(fp32)[name].to(torch.bfloat16)), name
    assert bf16.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert torch.equal(bf16.model.rotary_emb.cos_sin_cache, fp32.model.rotary_emb.cos_sin_cache)


def test_tied_model_has_no_separate_lm_head(tiny_model_dir):
    model_dir = tiny_model_dir("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    model, config = load_model(model_dir, torch.float32, CPU)
    assert config.tie_word_embeddings and model.lm_head is None
    untied, _ = load_model(tiny_model_dir("llama"), torch.float32, CPU)
    assert untied.lm_head is not None
    hidden = torch.randn(3, config.hidden_size)
    assert torch.equal(model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.T)


def test_tied_checkpoint_that_also_stores_lm_head_loads(tiny_model_dir):
    model_dir = tiny_model_dir("llama", tie_word_embeddings=True)
    model, config = load_model(model_dir, torch.float32, CPU)
    weights = load_file(model_dir / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])   # stale: must be ignored
    model.load_weights(weights.items())
    assert model.lm_head is None
    hidden = torch.randn(3, config.hidden_size)
    assert torch.equal(model.compute_logits(hidden), hidden @ weights["model.embed_tokens.weight"].T)


def config_only_copy(model_dir, destination):
    destination.mkdir()
    shutil.copy(model_dir / "config.json", destination / "config.json")
    return destination


def test_dummy_weights_are_seeded(tiny_model_dir, tmp_path):
    config_only = config_only_copy(tiny_model_dir("qwen3"), tmp_path / "config-only")
    model, _ = load_model(config_only, torch.float32, CPU, load_format="dummy")
    assert_same_parameters(model, load_model(config_only, torch.float32, CPU, load_format="dummy")[0])
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dummy_weights_of_a_real_architecture_stay_finite_in_bf16(default_model_dir, tmp_path):
    """The GPU benchmarks' use: a real 30-layer config.json, no weight files."""
    model, config = load_model(config_only_copy(default_model_dir, tmp_path / "config-only"), torch.bfloat16, CPU,
                               load_format="dummy")
    assert config.num_hidden_layers == 30
    logits, _ = PagedSequences(model, config).step({0: list(range(3, 20)), 1: list(range(100, 104))})
    assert all(rows.dtype == torch.float32 and rows.isfinite().all() for rows in logits.values())


def test_pickled_weights_only_with_allow_pickle_weights(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    pickled = copy_model(model_dir, tmp_path / "pickled", weights=False)
    torch.save(load_file(model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    torch.save({"not": "weights"}, pickled / "training_args.bin")
    with pytest.raises(ValueError, match="only pickled weights .*pytorch_model.bin.*allow_pickle_weights=True"):
        load_model(pickled, torch.float32, CPU)
    model, _ = load_model(pickled, torch.float32, CPU, allow_pickle_weights=True)
    assert_same_parameters(model, load_model(model_dir, torch.float32, CPU)[0])


def test_load_weights_lists_missing_unexpected_and_misshapen_tensors(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    model = LlamaForCausalLM(ModelConfig.from_dir(model_dir))
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"], weights["model.layers.0.self_attn.q_norm.weight"]
    weights["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    weights["model.norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError) as error:
        model.load_weights(weights.items())
    message = str(error.value)
    assert ("missing tensors (2): model.layers.0.self_attn.q_norm.weight, "
            "model.layers.1.self_attn.k_proj.weight") in message
    assert "unexpected tensors (1): model.layers.0.self_attn.extra_proj.weight" in message
    assert "shape mismatches (1): model.norm.weight: checkpoint (5,), model expects (64,)" in message


@pytest.mark.parametrize("error, match", [
    ("no config", "no config.json"),
    ("no weights", "no weight files"),
    ("missing shard", "names shard files that are missing"),
    ("unsupported architecture", "'GPT2LMHeadModel' is not supported; batchgen runs LlamaForCausalLM, "
                                 "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ("bad dtype", "dtype torch.int8 is not supported"),
    ("bad load format", "load_format 'pickle' is not one of"),
])
def test_load_model_errors_say_what_is_wrong(tiny_model_dir, tmp_path, error, match):
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path / "model")
    dtype, load_format = torch.float32, "safetensors"
    if error == "no config":
        (model_dir / "config.json").unlink()
    elif error == "no weights":
        (model_dir / "model.safetensors").unlink()
    elif error == "missing shard":
        index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    elif error == "unsupported architecture":
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    elif error == "bad dtype":
        dtype = torch.int8
    else:
        load_format = "pickle"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_model(model_dir, dtype, CPU, load_format=load_format)


def test_resolve_model_path(default_model_dir, tmp_path, monkeypatch):
    assert resolve_model_path("default") == default_model_dir
    assert resolve_model_path(str(tmp_path)) == tmp_path

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(loader, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == tmp_path
    (repo_id, patterns), = calls
    assert repo_id == "Qwen/Qwen2.5-0.5B-Instruct"
    fetched = {name for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                                 "tokenizer.json", "tokenizer.model", "chat_template.jinja", "pytorch_model.bin",
                                 "consolidated.00.pth", "model.pt")
               if any(fnmatch(name, pattern) for pattern in patterns)}
    assert fetched == {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                       "tokenizer.json", "tokenizer.model", "chat_template.jinja"}


def test_unresolvable_model_name_says_what_was_tried(tmp_path, monkeypatch):
    def offline(repo_id, allow_patterns):
        raise ConnectionError("no network")

    monkeypatch.setattr(loader, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="'someone/model' is not 'default', not an existing directory, "
                                                "and could not be fetched .*no network"):
        resolve_model_path("someone/model")
    monkeypatch.undo()
    # a path that does not exist is no valid hub id either: refused without any network access
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        resolve_model_path(str(tmp_path / "no" / "such" / "model"))
