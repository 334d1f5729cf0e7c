"""Tensor-parallel models on two gloo ranks (CPU, fp32) against the same model on one rank and against Hugging Face
transformers on the same weights: every supported architecture, KV heads fewer than ranks, Phi-3's fused
checkpoint tensors, stacked experts, dummy weights, online and block-wise fp8, and the block-fp8 shard-alignment
refusal; and that each rank reads only its slice of each checkpoint tensor from the file.

Both ranks run the paged batch of test_logits_vs_hf (chunked prefill, then decodes); each must return the whole
vocabulary's logits, identical on both ranks. One pair of ranks serves the whole module.
"""
import math
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from batchgen.distributed import MULTICAST_OFF_ENV, all_gather, all_reduce, tensor_parallel
from batchgen.models import load_model, loader
from paged_runner import run_paged
from test_logits_vs_hf import TINY_CASES, hf_logits, random_sequences
from test_moe import save_stacked_experts
from test_quant import LOGITS_TOLERANCE, fp8_input_hooks, reference_logits, round_to_fp8, write_checkpoint
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
    # LongRoPE's table (its short factors here: the engine's scheduler offsets longer sequences into the long ones)
    "phi3-longrope": ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64,
                               "max_position_embeddings": 256}),
}


@pytest.fixture(scope="module")
def ranks():
    pair = Ranks(2)
    yield pair
    pair.close()


def paged_logits(model_dir, load_options: dict, dtype: torch.dtype = torch.float32,
                 on_gpu: bool = False) -> list[np.ndarray]:
    """Runs on each rank (and on one, in the test process): the paged batch's logits per sequence (fp32 logits
    whatever the model's dtype), on the CPU or on rank r's GPU."""
    device = torch.device("cuda", tensor_parallel().rank) if on_gpu else CPU
    model, config = load_model(model_dir, dtype, device, **load_options)
    return [rows.numpy() for rows in run_paged(model, config, random_sequences(config.vocab_size))]


def load_error(model_dir, load_options: dict) -> str:
    """Runs on each rank: the message load_model refuses the model with."""
    with pytest.raises(ValueError) as error:
        load_model(model_dir, torch.float32, CPU, **load_options)
    return str(error.value)


def assert_close(got: list[np.ndarray], want: list, tolerance: float) -> None:
    for seq, (ours, theirs) in enumerate(zip(got, want, strict=True)):
        ours, theirs = torch.from_numpy(ours), torch.as_tensor(theirs)
        assert ours.shape == theirs.shape
        error = (ours - theirs).abs().max().item()
        assert error <= tolerance * max(1.0, theirs.abs().max().item()), f"sequence {seq}: max abs error {error}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def tp2_logits(ranks, model_dir, dtype: torch.dtype = torch.float32, **load_options) -> list[np.ndarray]:
    """Rank 0's logits, after checking that rank 1 computed exactly the same (every rank samples from them)."""
    rank0, rank1 = ranks.run(paged_logits, model_dir, load_options, dtype, ranks.device_type == "cuda")
    for seq, (a, b) in enumerate(zip(rank0, rank1)):
        assert np.array_equal(a, b), f"sequence {seq}: the ranks' logits differ"
    return rank0


@pytest.mark.parametrize("case", list(TP_CASES))
def test_two_ranks_match_one_rank_and_hf(ranks, tiny_model_dir, case):
    arch, overrides = TP_CASES[case]
    model_dir = tiny_model_dir(arch, **overrides)
    tp2 = tp2_logits(ranks, model_dir)
    assert_close(tp2, paged_logits(model_dir, {}), TP_TOLERANCE)
    assert_close(tp2, hf_logits(model_dir, random_sequences(tp2[0].shape[-1])), HF_TOLERANCE)


def test_phi3_checkpoint_stores_fused_projections(tiny_model_dir):
    """The premise of the phi3 cases above: their checkpoint tensors are fused, not one per projection."""
    with safe_open(tiny_model_dir("phi3", num_key_value_heads=1) / "model.safetensors", "pt") as checkpoint:
        names = set(checkpoint.keys())
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    assert not any(name.endswith(("k_proj.weight", "up_proj.weight")) and "gate_up" not in name for name in names)


class CountingCheckpoint:
    """A safe_open handle that counts the elements of each tensor read through it, whole or sliced."""

    def __init__(self, checkpoint, counts: Counter):
        self.checkpoint, self.counts = checkpoint, counts

    def keys(self) -> list[str]:
        return self.checkpoint.keys()

    def get_slice(self, name: str):
        view, counted = self.checkpoint.get_slice(name), self.counted

        class CountingSlice:
            get_shape = view.get_shape

            def __getitem__(self, index):
                return counted(name, view[index])
        return CountingSlice()

    def counted(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.counts[name] += tensor.numel()
        return tensor


def elements_read(model_dir: Path) -> dict[str, int]:
    """Runs on each rank: how many elements of each checkpoint tensor loading the model read from the file."""
    counts, real_safe_open = Counter(), loader.safe_open

    @contextmanager
    def counting_safe_open(*args, **kwargs):
        with real_safe_open(*args, **kwargs) as checkpoint:
            yield CountingCheckpoint(checkpoint, counts)

    loader.safe_open = counting_safe_open
    try:
        load_model(model_dir, torch.float32, CPU)
    finally:
        loader.safe_open = real_safe_open
    return dict(counts)


@pytest.mark.parametrize("layout", ["separate", "phi3-fused", "stacked-experts"])
def test_each_rank_reads_only_its_slice_of_the_checkpoint(ranks, tiny_model_dir, tmp_path, layout):
    """Column- and row-parallel projections, the embedding and the LM head: half of each tensor per rank, whether
    stored per projection, fused (Phi-3) or with the experts stacked; norms and MoE routers whole."""
    model_dir = {"separate": lambda: tiny_model_dir("llama"), "phi3-fused": lambda: tiny_model_dir("phi3"),
                 "stacked-experts": lambda: save_stacked_experts(tiny_model_dir("qwen3_moe"), tmp_path / "stacked")
                 }[layout]()
    with safe_open(model_dir / "model.safetensors", "pt") as checkpoint:
        sizes = {name: math.prod(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys()}
    replicated = [name for name in sizes if name.endswith(("norm.weight", "mlp.gate.weight"))]
    assert replicated and len(replicated) < len(sizes)
    want = {name: size if name in replicated else size // 2 for name, size in sizes.items()}
    assert ranks.run(elements_read, model_dir) == [want, want]


def test_stacked_expert_checkpoint_matches_one_rank(ranks, tiny_model_dir, tmp_path):
    hub_dir = tiny_model_dir("qwen3_moe")
    stacked_dir = save_stacked_experts(hub_dir, tmp_path / "stacked")
    assert_close(tp2_logits(ranks, stacked_dir), paged_logits(hub_dir, {}), TP_TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_dummy_weights_are_the_one_rank_model_s_shards(ranks, tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    assert_close(tp2_logits(ranks, model_dir, load_format="dummy"), paged_logits(model_dir, {"load_format": "dummy"}),
                 TP_TOLERANCE)


@pytest.mark.parametrize("source", ["online", "checkpoint"])
def test_per_channel_fp8_matches_its_reference(ranks, tiny_model_dir, tmp_path, source):
    """Per-channel fp8, quantized as it loads or from a checkpoint's weights and per-row scales, against
    transformers on the dequantized weights with each projection's input rounded to fp8 as the ranks round it:
    per token, and per token and rank for the row-parallel o_proj and down_proj (each rank quantizes its slice
    of the input). Weight scales are those of whole rows on every rank, as on one."""
    model_dir = tiny_model_dir("qwen2")
    fp8_dir, reference_dir = write_checkpoint(model_dir, tmp_path, "ct-channel")
    hooks = {name: (lambda x: round_to_fp8(x, x.shape[-1] // 2)) if name.endswith(("o_proj", "down_proj")) else hook
             for name, hook in fp8_input_hooks(reference_dir, None, "online").items()}
    got = torch.from_numpy(np.concatenate(
        tp2_logits(ranks, model_dir, quantization="fp8") if source == "online" else tp2_logits(ranks, fp8_dir)))
    want = reference_logits(reference_dir, random_sequences(got.shape[-1]), hooks)
    assert (got - want).norm() / want.norm() < LOGITS_TOLERANCE


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


def test_kv_heads_that_do_not_divide_over_the_ranks_are_refused(ranks, tiny_model_dir):
    model_dir = tiny_model_dir("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    for message in ranks.run(load_error, model_dir, {}):
        assert "tensor_parallel_size 2" in message and "6 attention heads" in message and "3 KV heads" in message


def collectives(values: torch.Tensor) -> tuple[dict, torch.Tensor, list[torch.Tensor]]:
    """Runs on each rank: its multicast switches, all_reduce of its slice of `values` [ranks, ...], and
    all_gather of it along each dim."""
    mine = values[tensor_parallel().rank]
    return ({name: os.environ.get(name) for name in MULTICAST_OFF_ENV}, all_reduce(mine.clone()),
            [all_gather(mine, dim) for dim in range(-mine.dim(), mine.dim())])


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 0, 5)])   # no rows: a step where no sequence samples
def test_collectives_and_multicast_off(ranks, shape):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for env, reduced, gathered in ranks.run(collectives, values):
        assert env == MULTICAST_OFF_ENV
        assert torch.allclose(reduced, values[0] + values[1])
        dims = range(-values[0].dim(), values[0].dim())
        for dim, got in zip(dims, gathered, strict=True):
            assert torch.equal(got, torch.cat(list(values), dim=dim)), dim


def test_a_rank_that_raises_fails_the_job_and_the_ranks_restart(ranks, tmp_path):
    with pytest.raises(RankFailed, match="FileNotFoundError"):
        ranks.run(paged_logits, tmp_path / "missing", {})
    assert ranks.run(rank_and_size) == [(0, 2), (1, 2)]


def rank_and_size() -> tuple[int, int]:
    return tensor_parallel().rank, tensor_parallel().size


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two GPUs: NCCL, Triton kernels, bf16")
def test_two_gpus_match_one_on_a_real_shape():
    """Qwen3-0.6B's shape with dummy weights (the same on both sides): bf16 logits of two GPUs within the
    relative L2 that the single-GPU check allows against transformers, fp32 ones within fp32 rounding."""
    model_dir = Path(__file__).parents[2] / "benchmarks" / "configs" / "qwen3-0.6b"
    gpus = Ranks(2, "cuda")
    try:
        for dtype, bound in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
            tp2 = torch.from_numpy(np.concatenate(tp2_logits(gpus, model_dir, dtype, load_format="dummy")))
            tp1 = torch.from_numpy(np.concatenate(paged_logits(model_dir, {"load_format": "dummy"}, dtype, True)))
            error = ((tp2 - tp1).norm() / tp1.norm()).item()
            print(f"{dtype}: relative L2 of two GPUs' logits to one's {error:.2e}")
            assert error < bound
    finally:
        gpus.close()
