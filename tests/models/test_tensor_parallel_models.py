"""Tensor-parallel models on two gloo ranks (CPU, fp32) against the same model on one rank and against Hugging Face
transformers on the same weights: every supported architecture, KV heads fewer than ranks, Phi-3's fused
checkpoint tensors, dummy weights, online and block-wise fp8, and the block-fp8 shard-alignment refusal.

Both ranks run the paged batch of test_logits_vs_hf (chunked prefill, then decodes); each must return the whole
vocabulary's logits, identical on both ranks. One pair of ranks serves the whole module.
"""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from batchgen.distributed import tensor_parallel
from batchgen.models import load_model
from paged_runner import run_paged
from test_logits_vs_hf import TINY_CASES, hf_logits, random_sequences
from test_quant import write_checkpoint
from tp_ranks import Ranks, RankFailed

CPU = torch.device("cpu")
# summation order differs between one rank and a sum of two partial products: fp32 rounding, relative to the
# largest logit
TP_TOLERANCE = 1e-5
HF_TOLERANCE = 1e-4   # test_logits_vs_hf's bound
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.05, 1.2, 1.4, 1.9, 2.5], "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 30.0]}
TP_CASES = {
    **{case: TINY_CASES[case] for case in ("llama", "mistral", "qwen2", "qwen3", "llama-tied", "mixtral",
                                           "qwen2_moe", "qwen3_moe-mlp-only-layers", "gemma3", "gemma3-multimodal",
                                           "phi3-sliding-partial-rotary", "qwen2-sliding-upper-layer")},
    # row-parallel o_proj and down_proj with biases: added once, after the all-reduce
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    # one KV head for two ranks: each keeps it whole
    "llama-one-kv-head": ("llama", {"num_key_value_heads": 1}),
    # Phi-3 stores qkv_proj and gate_up_proj fused: split per part, then per rank (with one KV head, unevenly)
    "phi3-fused-one-kv-head": ("phi3", {"num_key_value_heads": 1}),
    "phi3-longrope": ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64,
                               "max_position_embeddings": 256}),
}


@pytest.fixture(scope="module")
def ranks():
    pair = Ranks(2)
    yield pair
    pair.close()


def paged_logits(model_dir, load_options: dict) -> list[np.ndarray]:
    """Runs on each rank (and on one, in the test process): the paged batch's logits per sequence."""
    model, config = load_model(model_dir, torch.float32, CPU, **load_options)
    return [rows.numpy() for rows in run_paged(model, config, random_sequences(config.vocab_size))]


def load_error(model_dir, load_options: dict) -> str:
    """Runs on each rank: the message load_model refuses the model with."""
    with pytest.raises(ValueError) as error:
        load_model(model_dir, torch.float32, CPU, **load_options)
    return str(error.value)


def assert_close(got: list[np.ndarray], want: list, tolerance: float) -> None:
    for seq, (ours, theirs) in enumerate(zip(got, want)):
        ours, theirs = torch.from_numpy(ours), torch.as_tensor(theirs)
        assert ours.shape == theirs.shape
        error = (ours - theirs).abs().max().item()
        assert error <= tolerance * max(1.0, theirs.abs().max().item()), f"sequence {seq}: max abs error {error}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def tp2_logits(ranks, model_dir, **load_options) -> list[np.ndarray]:
    """Rank 0's logits, after checking that rank 1 computed exactly the same (every rank samples from them)."""
    rank0, rank1 = ranks.run(paged_logits, model_dir, load_options)
    for seq, (a, b) in enumerate(zip(rank0, rank1)):
        assert np.array_equal(a, b), f"sequence {seq}: the ranks' logits differ"
    return rank0


@pytest.mark.parametrize("case", list(TP_CASES))
def test_two_ranks_match_one_rank_and_hf(ranks, tiny_model_dir, case):
    arch, overrides = TP_CASES[case]
    model_dir = tiny_model_dir(arch, **overrides)
    tp2 = tp2_logits(ranks, model_dir)
    assert_close(tp2, paged_logits(model_dir, {}), TP_TOLERANCE)
    assert_close(tp2, hf_logits(model_dir, random_sequences(49152)), HF_TOLERANCE)


def test_phi3_checkpoint_stores_fused_projections(tiny_model_dir):
    """The premise of the phi3 cases above: their checkpoint tensors are fused, not one per projection."""
    with safe_open(tiny_model_dir("phi3", num_key_value_heads=1) / "model.safetensors", "pt") as checkpoint:
        names = set(checkpoint.keys())
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    assert not any(name.endswith(("k_proj.weight", "up_proj.weight")) and "gate_up" not in name for name in names)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_dummy_weights_are_the_one_rank_model_s_shards(ranks, tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    assert_close(tp2_logits(ranks, model_dir, load_format="dummy"), paged_logits(model_dir, {"load_format": "dummy"}),
                 TP_TOLERANCE)


def test_online_fp8_matches_one_rank_fp8(ranks, tiny_model_dir):
    """Weights are quantized per output channel over whole rows on every rank, as on one; the row-parallel
    layers' inputs are quantized per token over each rank's slice, a finer scale than one rank's, so the two
    differ by activation rounding only: far less than fp8 differs from fp32."""
    model_dir = tiny_model_dir("qwen2")
    tp2 = torch.from_numpy(np.concatenate(tp2_logits(ranks, model_dir, quantization="fp8")))
    tp1 = torch.from_numpy(np.concatenate(paged_logits(model_dir, {"quantization": "fp8"})))
    fp32 = torch.from_numpy(np.concatenate(paged_logits(model_dir, {})))
    assert (tp2 - tp1).norm() < 0.5 * (tp1 - fp32).norm()


def test_block_fp8_matches_one_rank_where_shards_hold_whole_blocks(ranks, tiny_model_dir, tmp_path):
    """Blocks of 32: with four KV heads of 16 every part splits into whole blocks; activations are quantized per
    32 columns, which a rank's slice never cuts, so both ranks compute one rank's products."""
    fp8_dir, _ = write_checkpoint(tiny_model_dir("llama", num_key_value_heads=4), tmp_path, "qwen-block")
    assert_close(tp2_logits(ranks, fp8_dir), paged_logits(fp8_dir, {}), TP_TOLERANCE)


def test_block_fp8_shard_that_cuts_a_block_is_refused(ranks, tiny_model_dir, tmp_path):
    """Two KV heads of 16 over two ranks: 16 rows of k_proj per rank, half a 32-row block."""
    fp8_dir, _ = write_checkpoint(tiny_model_dir("llama"), tmp_path, "qwen-block")
    paged_logits(fp8_dir, {})   # one rank loads it
    for message in ranks.run(load_error, fp8_dir, {}):
        assert "model.layers.0.self_attn.qkv_proj" in message and "k_proj" in message
        assert "tensor_parallel_size 2" in message and "32 k_proj rows" in message and "16" in message


def test_a_rank_that_raises_fails_the_job_and_the_ranks_restart(ranks, tmp_path):
    with pytest.raises(RankFailed, match="FileNotFoundError"):
        ranks.run(paged_logits, tmp_path / "missing", {})
    assert ranks.run(rank_and_size) == [(0, 2), (1, 2)]


def rank_and_size() -> tuple[int, int]:
    return tensor_parallel().rank, tensor_parallel().size
