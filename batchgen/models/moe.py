"""The mixture-of-experts feed-forward block (Qwen3-MoE, Qwen2-MoE, Mixtral): a router picks top-k experts per
token, the fused MoE kernel runs them, Qwen2-MoE adds its gated shared expert.

The experts of a layer are two `Linear` layers with an expert dimension, `experts.gate_up_proj` [E, 2I, H]
(gate rows, then up rows) and `experts.down_proj` [E, H, I], column- and row-parallel so tensor parallelism
can shard I. Checkpoints store them one tensor per expert and projection (hub layout:
`mlp.experts.{e}.gate_proj.weight`, Mixtral `block_sparse_moe.experts.{e}.w1.weight`) or stacked (what
transformers 5 saves with save_original_format=False: `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`);
`expert_checkpoint_keys` maps both.
"""
import re

import torch
from torch import nn

from batchgen.distributed import all_reduce
from batchgen.kernels import ops
from batchgen.models.checkpoint import CheckpointTensor
from batchgen.models.config import ModelConfig
from batchgen.models.linear import Linear

# per-expert checkpoint projection -> (stacked layer, its part)
_EXPERT_PROJECTIONS = {"gate_proj": ("gate_up_proj", "gate_proj"), "up_proj": ("gate_up_proj", "up_proj"),
                       "down_proj": ("down_proj", None), "w1": ("gate_up_proj", "gate_proj"),
                       "w3": ("gate_up_proj", "up_proj"), "w2": ("down_proj", None)}
_STACKED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": (None,)}
_PER_EXPERT_NAME = re.compile(r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight")
_STACKED_NAME = re.compile(r".*\.experts\.(?P<layer>gate_up_proj|down_proj)")


class Experts(nn.Module):
    """One layer's experts: the two expert-dimension projections, multiplied by the fused MoE kernel."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size},
                                   bias=False, parallel="column", num_experts=num_experts)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, parallel="row", num_experts=num_experts)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # fp8 experts reach the kernel as stored, with their scales: it multiplies fp8 by fp8-quantized inputs
        gate_up_scale, block = self.gate_up_proj.weight_format.weight_scale(self.gate_up_proj)
        down_scale, _ = self.down_proj.weight_format.weight_scale(self.down_proj)
        return ops.fused_moe(hidden, self.gate_up_proj.weight, self.down_proj.weight, topk_weights, topk_ids,
                             gate_up_scale, down_scale, block)


def expert_checkpoint_keys(checkpoint_name: str, tensor: torch.Tensor | CheckpointTensor):
    """An MoE checkpoint tensor -> [((module, parameter, part, expert), tensor piece)]; None for other names.

    'model.layers.0.block_sparse_moe.experts.3.w1.weight' -> [(('model.layers.0.mlp.experts.gate_up_proj',
    'weight', 'gate_proj', 3), tensor)]; a stacked 'model.layers.0.mlp.experts.gate_up_proj' [E, 2I, H] -> one
    piece per expert and part (not read yet: each rank reads its slice); Mixtral's router
    'block_sparse_moe.gate.weight' -> the 'mlp.gate' module.
    """
    name = checkpoint_name.replace(".block_sparse_moe.", ".mlp.")
    match = _PER_EXPERT_NAME.fullmatch(name)
    if match and match["projection"] in _EXPERT_PROJECTIONS:
        layer, part = _EXPERT_PROJECTIONS[match["projection"]]
        return [((f"{match['prefix']}.{layer}", "weight", part, int(match["expert"])), tensor)]
    match = _STACKED_NAME.fullmatch(name)
    if match:
        parts = _STACKED_PARTS[match["layer"]]
        rows = tensor.shape[1] // len(parts)
        return [((name, "weight", part, expert), tensor[expert].narrow(0, index * rows, rows))
                for expert in range(tensor.shape[0]) for index, part in enumerate(parts)]
    if name != checkpoint_name:
        module_name, _, parameter = name.rpartition(".")
        return [((module_name, parameter, None, None), tensor)]
    return None


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], expert ids [T, k]): softmax over all experts in fp32, the top k, optionally divided
    by their sum (= the softmax over the chosen logits)."""
    weights, ids = torch.softmax(router_logits, dim=-1, dtype=torch.float32).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert, which every token passes through, scaled by
    sigmoid(shared_expert_gate(x))). Under tensor parallelism each rank runs its slice of every expert's (and the
    shared expert's) intermediate size; the router and the shared expert's gate stay whole; the block's output is
    all-reduced once."""
    fp8_token_input = False  # the router and the kernel take their input in the compute dtype

    def __init__(self, config: ModelConfig, shared_expert: nn.Module | None):
        super().__init__()
        moe = config.moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.weights_in_model_dtype = moe.weights_in_model_dtype
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, config.hidden_size, moe.intermediate_size)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = route(self.gate(hidden), self.top_k, self.renormalize)
        if self.weights_in_model_dtype:
            topk_weights = topk_weights.to(hidden.dtype)
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return all_reduce(out)   # the experts' and the shared expert's partial sums over this rank's slice
