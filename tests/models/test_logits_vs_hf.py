"""batchgen's Llama-family model against Hugging Face transformers on the same weights (fp32, CPU).

Several sequences of mixed lengths run as ONE flat batch through a paged KV cache whose blocks are scattered:
first a prefill step (some prompts only partly), then a step that continues every sequence on its cached
context (chunked prefill and single tokens mixed), then decode-only steps. Every row's logits must match
transformers' logits for the same position of the whole sequence run at once; so must each step's last row's
when the model is asked for those rows alone (the last layer then projects and runs its MLP over them only).
"""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchgen.models import load_model
from paged_runner import STEP_LENGTHS, run_paged

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
TINY_CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    # head_dim 16 and theta 1e4 put the frequencies in all three llama3 bands (wavelengths < 16, 16..64, > 64)
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 2.0}}),
    "qwen2-rope-yarn": ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 512}}),
    # mixture-of-experts: every layer sparse, then a dense layer beside a sparse one each way
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-mlp-only-layers": ("qwen3_moe", {"mlp_only_layers": [0]}),
    "qwen2_moe-sparse-step-2-norm-topk": ("qwen2_moe", {"decoder_sparse_step": 2, "norm_topk_prob": True}),
    # windows of 4 inside sequences of up to 17 tokens: decode and chunk steps reach past them
    "gemma3": ("gemma3", {"sliding_window": 4}),
    "gemma3-multimodal": ("gemma3_multimodal", {"sliding_window": 4}),
    "phi3-sliding-partial-rotary": ("phi3", {"sliding_window": 4, "partial_rotary_factor": 0.75}),
    "qwen2-sliding-upper-layer": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
}


def random_sequences(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (sum(lengths),), generator=generator).tolist() for lengths in STEP_LENGTHS]


def hf_logits(model_dir, sequences: list[list[int]]) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([tokens])).logits[0] for tokens in sequences]


def assert_logits_match(model_dir, vocab_size: int = 49152) -> None:
    model, config = load_model(model_dir, torch.float32, torch.device("cpu"))
    sequences = random_sequences(vocab_size)
    every_row = run_paged(model, config, sequences)
    last_rows = run_paged(model, config, sequences, last_rows_only=True)
    for seq, want in enumerate(hf_logits(model_dir, sequences)):
        step_ends = torch.tensor(STEP_LENGTHS[seq]).cumsum(0) - 1
        for got, expected in (every_row[seq], want), (last_rows[seq], want[step_ends]):
            assert got.shape == expected.shape and got.dtype == torch.float32
            error = (got - expected).abs().max().item()
            assert error <= 1e-4 * max(1.0, expected.abs().max().item()), f"sequence {seq}: max abs error {error}"
            assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_model_logits_match_hf(tiny_model_dir, case):
    arch, overrides = TINY_CASES[case]
    assert_logits_match(tiny_model_dir(arch, **overrides))


def test_old_style_rope_config_matches_hf(tiny_model_dir, tmp_path):
    """Hub checkpoints still write `rope_theta` + `rope_scaling` (with "type"), not `rope_parameters`."""
    model_dir = tmp_path / "old-style"
    shutil.copytree(tiny_model_dir("llama", rope_parameters=LLAMA3_ROPE), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert_logits_match(model_dir)


def test_default_model_logits_match_hf(default_model_dir):
    assert_logits_match(default_model_dir)
