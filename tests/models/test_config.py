"""ModelConfig parsing, against transformers' own reading of the same config.json content."""
import json

import pytest
import torch
import transformers

from batchgen.models.config import ModelConfig

CONFIG_CLASSES = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config, "Qwen3ForCausalLM": transformers.Qwen3Config}

# as real hub checkpoints write them (transformers 4 layout)
LLAMA31_HUB_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}
QWEN25_HUB_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
}
MISTRAL_V01_HUB_CONFIG = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000, "bos_token_id": 1,
    "eos_token_id": 2,
}
ROPE_VARIANTS = {
    "default-old": {"rope_theta": 5000.0},
    "linear-old-type-key": {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama3-old": {"rope_theta": 500000.0, "rope_scaling": LLAMA31_HUB_CONFIG["rope_scaling"]},
    "yarn-old": {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32768}},
    "llama3-new": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}},
    "default-new": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
}


def hf_config_dict(architecture: str, **fields) -> dict:
    """config.json content as this transformers version writes it."""
    return CONFIG_CLASSES[architecture](architectures=[architecture], **fields).to_dict()


@pytest.mark.parametrize("hub_config", [LLAMA31_HUB_CONFIG, QWEN25_HUB_CONFIG, MISTRAL_V01_HUB_CONFIG],
                         ids=["llama3.1", "qwen2.5", "mistral-v0.1"])
def test_hub_configs_parse_like_transformers_reads_them(hub_config):
    ours = ModelConfig.from_dict(hub_config)
    theirs = CONFIG_CLASSES[hub_config["architectures"][0]](**hub_config)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)
    assert ours.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_parameters_match_transformers_standardised_form(variant):
    base = {key: value for key, value in LLAMA31_HUB_CONFIG.items() if key not in ("rope_theta", "rope_scaling")}
    config = {**base, **json.loads(json.dumps(ROPE_VARIANTS[variant]))}
    theirs = dict(transformers.LlamaConfig(**json.loads(json.dumps(config))).rope_parameters)
    theirs.pop("type", None)  # transformers keeps the legacy key beside rope_type
    assert ModelConfig.from_dict(config).rope_parameters == theirs


def test_old_and_new_rope_layouts_give_the_same_config():
    new_style = hf_config_dict("LlamaForCausalLM", rope_parameters=dict(ROPE_VARIANTS["llama3-new"]["rope_parameters"]))
    old_style = {key: value for key, value in new_style.items() if key != "rope_parameters"}
    old_style.update(ROPE_VARIANTS["llama3-old"])
    assert ModelConfig.from_dict(old_style) == ModelConfig.from_dict(new_style)


def test_eos_ids_are_the_union_of_config_and_generation_config():
    config = ModelConfig.from_dict(LLAMA31_HUB_CONFIG, {"bos_token_id": 128000, "eos_token_id": [128009, 7]})
    assert config.eos_token_ids == (128001, 128008, 128009, 7)
    assert config.bos_token_id == 128000
    assert ModelConfig.from_dict({**QWEN25_HUB_CONFIG, "eos_token_id": None}, {"eos_token_id": 5}).eos_token_ids == (5,)


def test_architecture_flags():
    qwen2 = ModelConfig.from_dict(QWEN25_HUB_CONFIG)
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = ModelConfig.from_dict(hf_config_dict("Qwen3ForCausalLM", head_dim=128, hidden_size=1024,
                                                 num_attention_heads=16))
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 128)
    llama_bias = ModelConfig.from_dict({**LLAMA31_HUB_CONFIG, "attention_bias": True, "mlp_bias": True})
    assert (llama_bias.attention_bias, llama_bias.o_proj_bias, llama_bias.mlp_bias) == (True, True, True)
    mistral = ModelConfig.from_dict({**MISTRAL_V01_HUB_CONFIG, "head_dim": None})
    assert (mistral.attention_bias, mistral.o_proj_bias, mistral.head_dim) == (False, False, 128)


def test_sliding_window_layers_as_transformers_runs_them_and_no_context_cap():
    mistral = ModelConfig.from_dict(MISTRAL_V01_HUB_CONFIG)
    assert (mistral.sliding_window, mistral.max_model_len) == (4096, 32768)
    assert [mistral.layer_window(i) for i in (0, 31)] == [4096, 4096]
    assert ModelConfig.from_dict({**MISTRAL_V01_HUB_CONFIG, "sliding_window": None}).layer_window(0) is None
    qwen25 = ModelConfig.from_dict(QWEN25_HUB_CONFIG)  # window switched off by use_sliding_window
    assert (qwen25.sliding_window, qwen25.max_model_len, qwen25.layer_window(23)) == (None, 32768, None)
    # transformers' own layer_types: sliding from max_window_layers on
    qwen_on = {**QWEN25_HUB_CONFIG, "use_sliding_window": True, "sliding_window": 4096}
    expected = transformers.Qwen2Config(**qwen_on).layer_types
    ours = ModelConfig.from_dict(qwen_on)
    assert list(ours.layer_types) == expected and ours.max_model_len == 32768
    assert [ours.layer_window(i) for i in (20, 21)] == [None, 4096]
    all_full = hf_config_dict("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4096,
                              max_window_layers=28, num_hidden_layers=28)
    assert "sliding_attention" not in all_full["layer_types"]
    assert ModelConfig.from_dict(all_full).sliding_window is None


# google/gemma-3-4b-it's config.json: the text config names only what differs from transformers' defaults
GEMMA3_4B_HUB_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}


def test_gemma3_multimodal_hub_config_reads_the_text_model_with_transformers_defaults():
    ours = ModelConfig.from_dict(GEMMA3_4B_HUB_CONFIG)
    theirs = transformers.Gemma3Config(**GEMMA3_4B_HUB_CONFIG).text_config
    assert (ours.vocab_size, ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (
        theirs.vocab_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim)
    assert list(ours.layer_types) == theirs.layer_types and ours.layer_types[:6].count("sliding_attention") == 5
    assert ours.rope_parameters["rope_type"] == "linear" and ours.rope_parameters["rope_theta"] == 1e6
    assert ours.sliding_rope_parameters["rope_type"] == "default"
    assert ours.sliding_rope_parameters["rope_theta"] == 10000.0
    assert ours.attention_scale == theirs.query_pre_attn_scalar ** -0.5
    assert ours.embedding_scale == 2560 ** 0.5 and ours.hidden_act == "gelu_pytorch_tanh"
    assert ours.tie_word_embeddings and ours.dtype == torch.bfloat16 and set(ours.eos_token_ids) == {1, 106}


@pytest.mark.parametrize(("change", "named"), [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"layer_types": ["chunked_attention"] * 32}, "layer_types="),
])
def test_configs_batchgen_cannot_honour_fail_at_load_naming_key_and_value(change, named, tmp_path):
    from batchgen.models.llama import LlamaForCausalLM

    with pytest.raises(ValueError, match=named):
        config = ModelConfig.from_dict({**LLAMA31_HUB_CONFIG, "num_hidden_layers": 32, **change})
        with torch.device("meta"):
            LlamaForCausalLM(config)


def test_checkpoint_dtype_from_either_key():
    assert ModelConfig.from_dict({**LLAMA31_HUB_CONFIG, "torch_dtype": "float16"}).dtype == torch.float16
    new_key = {key: value for key, value in LLAMA31_HUB_CONFIG.items() if key != "torch_dtype"}
    assert ModelConfig.from_dict({**new_key, "dtype": "bfloat16"}).dtype == torch.bfloat16
    assert ModelConfig.from_dict(new_key).dtype == torch.float32


@pytest.mark.parametrize("change, message", [
    ({"architectures": []}, "names no architecture"),
    ({"hidden_size": None}, "lacks 'hidden_size'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"torch_dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn'"),
])
def test_bad_config_content_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**LLAMA31_HUB_CONFIG, **change})


def test_missing_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
