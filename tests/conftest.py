"""Shared test set-up, done before any batchgen module is imported: without a GPU, Triton kernels run in the
interpreter; the job service's tests use the real Redis on 127.0.0.1:6379 in a key namespace of this session
(BATCHGEN_PREFIX, which also prefixes Celery's queues), dropped when the session ends."""
import hashlib
import json
import os
import shutil
import sys
import uuid
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import settings


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["BATCHGEN_REDIS_URL"] = "redis://127.0.0.1:6379/0"
os.environ["BATCHGEN_PREFIX"] = f"bgtest-{uuid.uuid4().hex[:12]}"
# property tests draw the same examples on every run, so a gate's verdict does not depend on its luck;
# HYPOTHESIS_PROFILE=explore draws new ones (what they find goes into the test as an @example)
settings.register_profile("gate", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gate"))

from batchgen.default_model import ensure_default_model  # noqa: E402  (batchgen may import triton)

# Tiny models share the default model's tokenizer, so their vocabulary is its size.
TINY_VOCAB_SIZE = 49152
TINY_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                       "qwen3": "Qwen3Config", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
                       "qwen3_moe": "Qwen3MoeConfig", "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config",
                       "gemma3_multimodal": "Gemma3Config"}
TINY_FIELDS = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                   rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                   # Large weights make attention sharp and logits far apart, so fp32 summation-order noise
                   # cannot flip a greedy argmax, and greedy output depends on the whole context.
                   initializer_range=0.3)
TINY_ARCH_FIELDS = {
    "qwen3": dict(head_dim=32),  # head_dim != hidden / heads, as in real Qwen3 checkpoints
    # mixture-of-experts: 2 of 8 experts (Mixtral: of 4) per token; Qwen2-MoE's shared expert and its own sizes
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    # one sliding and one global layer (real Gemma 3: five to one), a window shorter than the test prompts,
    # scaling on the global rope only, as in Gemma 3 4B and up
    "gemma3": dict(query_pre_attn_scalar=24, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
}
# Gemma3ForConditionalGeneration: the fields above go to its text_config; a tiny vision tower beside it
TINY_VISION_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=28, patch_size=14)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="session", autouse=True)
def _clean_redis_namespace():
    """Drop every key this session wrote on the shared Redis (job store and Celery's) when it ends. Only the job
    service talks to Redis (a test that starts workers uses it too), so a session that never loaded it wrote
    nothing there, and where none answers no test wrote there either (it would have failed itself): `pytest
    tests/kernels tests/engine` runs on a machine without Redis, though some engine tests load the job service
    (through the CLI or `batchgen.bench`)."""
    yield
    if "batchgen.jobs" not in sys.modules:
        return
    import redis

    client = redis.Redis.from_url(os.environ["BATCHGEN_REDIS_URL"])
    try:
        keys = list(client.scan_iter(match=os.environ["BATCHGEN_PREFIX"] + ":*", count=1000))
    except redis.exceptions.ConnectionError:
        return
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])


# On a GPU machine the test processes (`pytest -n 8`) share the card
GPU_TEST_ENGINE = dict(kv_cache_bytes=1 << 30, max_num_seqs=64)


@pytest.fixture(scope="session", autouse=True)
def _small_gpu_engines():
    """Every CUDA engine a test builds through LLM gets a 1 GiB cache and at most 64 sequences where the test
    set neither, not 90% of the card and 1,024 (one engine would starve the other test processes, and capturing
    graphs for 1,024 sequences takes a while); the GPU benchmarks size real caches."""
    if not torch.cuda.is_available():
        yield
        return
    import batchgen.llm

    engine_config = batchgen.llm.EngineConfig

    def small_on_gpu(**engine_args):
        config = engine_config(**engine_args)
        if config.resolved_device().type != "cuda":
            return config
        return config.model_copy(update={k: v for k, v in GPU_TEST_ENGINE.items() if getattr(config, k) is None})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batchgen.llm, "EngineConfig", small_on_gpu)
        yield


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory (converted once per cache)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The default model's tokenizer files: from $BATCHGEN_TEST_TOKENIZER_DIR where the default model can't be
    installed (the GPU lease takes at most 64 MiB and its GGUF is 94 MB), else from the converted model. Tests of
    the default model's weights use `default_model_dir` and still need it."""
    override = os.environ.get("BATCHGEN_TEST_TOKENIZER_DIR")
    return Path(override) if override else ensure_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """Factory `tiny_model_dir(arch, **overrides) -> Path` for arch in TINY_CONFIG_CLASSES: a 2-layer
    random-weight Hugging Face model directory (safetensors, fp32) with the default model's tokenizer.
    `overrides` are transformers config fields (e.g. tie_word_embeddings=True, rope_parameters={...}).
    Built once per session for each distinct set of arguments."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def build(arch: str, **overrides) -> Path:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in built:
            out_dir = root / f"{arch}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
            save_tiny_model(out_dir, arch, overrides, tokenizer_dir)
            built[key] = out_dir
        return built[key]

    return build


@pytest.fixture(scope="session")
def model_dir_with_sampling(tiny_model_dir, tmp_path_factory):
    """Factory `model_dir_with_sampling(**values) -> Path`: a copy of the tiny llama model whose
    generation_config.json also holds these values (e.g. temperature=0.7)."""
    def build(**values) -> Path:
        model_dir = tmp_path_factory.mktemp("generation-config") / "model"
        shutil.copytree(tiny_model_dir("llama"), model_dir)
        generation = json.loads((model_dir / "generation_config.json").read_text())
        (model_dir / "generation_config.json").write_text(json.dumps({**generation, **values}))
        return model_dir

    return build


def save_tiny_model(out_dir: Path, arch: str, overrides: dict, tokenizer_dir: Path) -> None:
    import transformers

    if arch == "gemma3_multimodal":
        text = {**TINY_FIELDS, **TINY_ARCH_FIELDS["gemma3"], **overrides}
        config = transformers.Gemma3Config(text_config=text, vision_config=TINY_VISION_CONFIG, mm_tokens_per_image=4,
                                           image_token_index=TINY_VOCAB_SIZE - 1, boi_token_index=TINY_VOCAB_SIZE - 2,
                                           eoi_token_index=TINY_VOCAB_SIZE - 3, initializer_range=0.3)
        model_class = transformers.AutoModelForImageTextToText
    else:
        fields = {**TINY_FIELDS, **TINY_ARCH_FIELDS.get(arch, {}), **overrides}
        config = getattr(transformers, TINY_CONFIG_CLASSES[arch])(**fields)
        model_class = transformers.AutoModelForCausalLM
    torch.manual_seed(zlib.crc32(arch.encode()))
    model = model_class.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # transformers initialises norms to one and biases to zero; randomise them so a tensor mapped to the
        # wrong place shows up as a logits mismatch
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, config.initializer_range)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
