"""Mixture-of-experts specifics: which layers are sparse, routing flags batchgen cannot honour, and both expert
checkpoint layouts (per-expert tensors as on the hub, stacked as transformers 5 saves with
save_original_format=False). Logits against transformers: tests/models/test_logits_vs_hf.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from batchgen.kernels import ops
from batchgen.kernels import fused_moe as fused_moe_module
from batchgen.kernels.activation import silu_and_mul_fp8_ref, silu_and_mul_ref
from batchgen.kernels.fp8 import FP8, quantize_fp8_ref
from batchgen.kernels.fused_moe import fused_moe
from batchgen.kernels.testing import relative_l2
from batchgen.models import load_model
from batchgen.models.config import ModelConfig
from batchgen.models.linear import Linear
from batchgen.models.moe import Experts, SparseMoeBlock
from batchgen.models.quant import Fp8Block, Fp8PerChannel
from batchgen.models.registry import model_class
from paged_runner import run_paged
from test_logits_vs_hf import assert_logits_match, random_sequences

# as the hub's Qwen/Qwen3-30B-A3B config.json writes it
QWEN3_30B_A3B_HUB_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False,
    "sliding_window": None, "use_sliding_window": False, "max_window_layers": 48, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_qwen3_moe_hub_config():
    config = ModelConfig.from_dict(QWEN3_30B_A3B_HUB_CONFIG)
    assert (config.head_dim, config.qk_norm, config.attention_bias) == (128, True, False)
    moe = config.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.renormalize) == (128, 8, 768, True)
    assert moe.sparse_layers == tuple(range(48)) and moe.shared_expert_intermediate_size == 0


def test_sparse_layers_follow_mlp_only_layers_and_decoder_sparse_step():
    config = ModelConfig.from_dict({**QWEN3_30B_A3B_HUB_CONFIG, "num_hidden_layers": 8, "decoder_sparse_step": 2,
                                    "mlp_only_layers": [3, 5]})
    assert config.moe.sparse_layers == (1, 7)


def test_moe_layers_get_the_expert_block_and_dense_layers_the_mlp(tiny_model_dir):
    model, config = load_model(tiny_model_dir("qwen2_moe", decoder_sparse_step=2), torch.float32, "cpu")
    sparse, dense = model.model.layers[1].mlp, model.model.layers[0].mlp
    assert isinstance(sparse, SparseMoeBlock) and sparse.shared_expert is not None
    assert not isinstance(dense, SparseMoeBlock) and dense.gate_up_proj.weight.shape == (2 * 128, 64)
    experts = sparse.experts
    assert experts.gate_up_proj.weight.shape == (8, 2 * 32, 64) and experts.down_proj.weight.shape == (8, 64, 32)


@pytest.mark.parametrize("key, value", [("scoring_func", "sigmoid"), ("routed_scaling_factor", 2.5),
                                        ("topk_method", "group_limited_greedy")])
def test_routing_flag_batchgen_cannot_honour_fails_at_load(tiny_model_dir, tmp_path, key, value):
    model_dir = tmp_path / "flagged"
    shutil.copytree(tiny_model_dir("qwen3_moe"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        load_model(model_dir, torch.float32, "cpu")


def test_mixtral_without_renormalisation_is_refused():
    config = {**QWEN3_30B_A3B_HUB_CONFIG, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
              "norm_topk_prob": False}
    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        ModelConfig.from_dict(config)


def save_stacked_experts(hub_dir: Path, stacked_dir: Path) -> Path:
    """The hub-layout model of `hub_dir` saved with each layer's experts stacked, as transformers 5 saves them."""
    AutoModelForCausalLM.from_pretrained(hub_dir, dtype=torch.float32).save_pretrained(
        stacked_dir, save_original_format=False)
    shutil.copy(hub_dir / "tokenizer.json", stacked_dir / "tokenizer.json")
    return stacked_dir


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_stacked_expert_checkpoint_loads_the_same_weights(tiny_model_dir, tmp_path, arch):
    hub_dir = tiny_model_dir(arch)
    stacked_dir = save_stacked_experts(hub_dir, tmp_path / "stacked")
    with safe_open(stacked_dir / "model.safetensors", "pt") as checkpoint:
        assert "model.layers.0.mlp.experts.gate_up_proj" in checkpoint.keys()
    with safe_open(hub_dir / "model.safetensors", "pt") as checkpoint:
        assert any(".experts.3." in name for name in checkpoint.keys())
    hub, _ = load_model(hub_dir, torch.float32, "cpu")
    stacked, _ = load_model(stacked_dir, torch.float32, "cpu")
    hub_params, stacked_params = dict(hub.named_parameters()), dict(stacked.named_parameters())
    assert hub_params.keys() == stacked_params.keys()
    assert all(torch.equal(hub_params[name], stacked_params[name]) for name in hub_params)
    assert_logits_match(stacked_dir)


def test_missing_expert_tensor_is_named(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "missing"
    shutil.copytree(tiny_model_dir("mixtral"), model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        load_model(model_dir, torch.float32, "cpu")


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_benchmark_configs_build_transformers_parameter_count(model):
    """The full-size configs `batchgen bench --load-format dummy` uses: same parameters as transformers builds
    (on the meta device: no memory)."""
    config_dir = Path(__file__).parents[2] / "benchmarks" / "configs" / model
    config = ModelConfig.from_dir(config_dir)
    with torch.device("meta"):
        ours = model_class(config.architecture)(config)
        theirs = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def fake_quantized(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """x quantized to fp8 per row (per row and `group` columns) and back: what an fp8 GEMM multiplies."""
    q, scales = quantize_fp8_ref(x, group)
    return (q.float().view(x.shape[0], -1, group or x.shape[1]) * scales.view(x.shape[0], -1, 1)).view(x.shape)


def moe_with_dequantized_experts(hidden, w_gate_up, w_down, topk_weights, topk_ids, group=None):
    """Token by token and expert by expert, fp32: the experts' dequantized weights times each GEMM's input
    quantized to fp8 and back, as fp8 experts multiply."""
    out = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for weight, expert in zip(topk_weights[token].tolist(), topk_ids[token].tolist()):
            gate_up = fake_quantized(hidden[token:token + 1], group) @ w_gate_up[expert].T
            out[token] += weight * (fake_quantized(silu_and_mul_ref(gate_up), group) @ w_down[expert].T)[0]
    return out


def use_triton_fused_moe(monkeypatch):
    """The Triton launcher on CPU tensors (TRITON_INTERPRET=1), its activations quantized by torch: the
    interpreter rounds some values to fp8 wrongly (tests/kernels/test_fused_moe.py)."""
    monkeypatch.setattr(ops, "fused_moe", fused_moe)
    monkeypatch.setattr(fused_moe_module, "quantize_fp8", quantize_fp8_ref)
    monkeypatch.setattr(fused_moe_module, "silu_and_mul_fp8", silu_and_mul_fp8_ref)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_fp8_experts_multiply_their_fp8_weights_without_a_dequantized_copy(tiny_model_dir, monkeypatch, kernel):
    """Online fp8: the experts stay fp8 with per-row scales, and the fused MoE kernel (or its reference on CPU)
    takes them as they are, their inputs quantized per token; the logits match dequantized experts multiplying
    fp8-rounded inputs."""
    model, config = load_model(tiny_model_dir("qwen3_moe"), torch.float32, "cpu", quantization="fp8")
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.weight.dtype == experts.down_proj.weight.dtype == FP8
    sequences = random_sequences(config.vocab_size)

    def dequantizing_forward(self, hidden, topk_weights, topk_ids):
        return moe_with_dequantized_experts(hidden, self.gate_up_proj.dequantized_weight(),
                                            self.down_proj.dequantized_weight(), topk_weights, topk_ids)

    with monkeypatch.context() as patch:
        patch.setattr(Experts, "forward", dequantizing_forward)
        expected = run_paged(model, config, sequences)

    def refuse(layer):
        raise AssertionError("an fp8 expert layer was dequantized in forward")

    monkeypatch.setattr(Linear, "dequantized_weight", refuse)
    if kernel == "triton":
        use_triton_fused_moe(monkeypatch)
    # The kernel sums K in blocks, torch's matmul in its own order: a SiLU-and-mul value that the two round to
    # opposite sides of an fp8 step moves that sequence by ~0.007 from there on (one of these four, with triton
    # 3.9's interpreter); experts fed unquantized inputs are 0.048-0.11 away from the expected logits.
    tolerance = 1e-5 if kernel == "reference" else 2e-2
    for got, want in zip(run_paged(model, config, sequences), expected):
        assert relative_l2(got, want) < tolerance


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("weight_format", [Fp8PerChannel(torch.float32, "channel"),
                                           Fp8Block(torch.float32, (16, 32), "weight_scale_inv")],
                         ids=["channel", "block"])
def test_fp8_expert_layers_hand_their_scales_to_the_kernel(weight_format, kernel, monkeypatch):
    """Each fp8 format's scales (per-channel `weight_scale`, block-wise under the checkpoint's name) reach the
    kernel with the weights: the experts compute what their dequantized weights compute on fp8-rounded inputs
    (per token, or per token per block column group)."""
    generator = torch.Generator().manual_seed(0)
    experts = Experts(num_experts=4, hidden_size=64, intermediate_size=32)
    for layer in (experts.gate_up_proj, experts.down_proj):
        layer.set_format(weight_format)
        layer.weight.copy_((torch.randn(layer.weight.shape, generator=generator) * 100).to(FP8))
        for name, scale in layer.named_parameters():
            if name != "weight":
                scale.copy_((torch.rand(scale.shape, generator=generator) + 0.5) / 800)
    hidden = torch.randn(9, 64, generator=generator)
    topk_weights, topk_ids = torch.rand(9, 4, generator=generator).softmax(-1).topk(2, dim=-1)
    group = weight_format.block[1] if isinstance(weight_format, Fp8Block) else None
    expected = moe_with_dequantized_experts(hidden, experts.gate_up_proj.dequantized_weight(),
                                            experts.down_proj.dequantized_weight(), topk_weights, topk_ids, group)
    if kernel == "triton":
        use_triton_fused_moe(monkeypatch)
    assert relative_l2(experts(hidden, topk_weights, topk_ids), expected) < 1e-5
