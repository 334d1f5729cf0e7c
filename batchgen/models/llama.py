"""One decoder for the Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 and tied-embedding variants
(SmolLM2), told apart by `ModelConfig` flags, and for its mixture-of-experts relatives (Mixtral, Qwen2-MoE,
Qwen3-MoE), whose layers differ only in the MLP (`decoder_mlp`).

Module names follow the Hugging Face checkpoints, except that q/k/v and gate/up projections are fused;
`load_weights` maps the checkpoint's separate tensors into the fused ones. Projections are `Linear` layers, whose
weight format (bf16, fp8, ...) the loader chooses.
"""
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from batchgen.kernels import ops
from batchgen.models.attention import Attention, AttentionMetadata
from batchgen.models.config import ModelConfig
from batchgen.models.layers import RMSNorm, RotaryEmbedding
from batchgen.models.linear import Linear, ShapeMismatch
from batchgen.models.moe import SparseMoeBlock, expert_checkpoint_keys

# checkpoint projection name -> the fused module holding it as a part of that name
_FUSED_PROJECTIONS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_MAX_NAMES_IN_ERROR = 20


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                               bias=config.attention_bias, parallel="column")
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_proj_bias, parallel="row")
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary_emb = rotary_emb  # shared by all layers: one table per model
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | tuple, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = positions.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, {"gate_proj": size, "up_proj": size}, bias=config.mlp_bias,
                                   parallel="column")
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias, parallel="row")

    @property
    def fp8_token_input(self) -> bool:
        """Whether the norm before this MLP should hand it its input quantized to fp8 per token."""
        return self.gate_up_proj.weight_format.fp8_token_input

    def forward(self, hidden: torch.Tensor | tuple) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)
        if self.down_proj.weight_format.fp8_token_input:
            return self.down_proj(ops.silu_and_mul_fp8(gate_up))
        return self.down_proj(ops.silu_and_mul(gate_up))


def decoder_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward block: the expert block on a mixture-of-experts model's sparse layers
    (with Qwen2-MoE's shared expert, a plain MLP), the dense MLP everywhere else."""
    moe = config.moe
    if moe is None or layer not in moe.sparse_layers:
        return LlamaMLP(config)
    shared_size = moe.shared_expert_intermediate_size
    return SparseMoeBlock(config, LlamaMLP(config, shared_size) if shared_size else None)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary_emb)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them. Norms
        feeding fp8 projections hand them their input quantized."""
        fp8_qkv = self.self_attn.qkv_proj.weight_format.fp8_token_input
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden, fp8=fp8_qkv)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, fp8=fp8_qkv)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual, fp8=self.mlp.fp8_token_input)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary_emb, decoder_mlp(config, layer))
                                    for layer in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The model runner's view of a model: forward over a flat token batch, logits for chosen rows, and the
    attention layers whose `k_cache`/`v_cache` it assigns."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # tied models reuse the embedding matrix in compute_logits rather than sharing a Parameter object,
        # which the loader's meta-device build would split in two
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                      bias=False, parallel="column")

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden_size] (only the rows that sample) -> float32 logits [S, vocab_size]."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint tensors (Hugging Face names) into this model: `Linear` layers through their weight
        format, other parameters copied with a cast to their dtype.

        Expert layers take each expert's tensors separately (hub layout) or stacked (see `expert_checkpoint_keys`).
        Raises ValueError listing every missing, unexpected and wrongly shaped tensor, after reading them all.
        """
        modules = dict(self.named_modules())
        expected = set()
        for module_name, module in modules.items():
            if isinstance(module, Linear):
                experts = [None] if module.num_experts is None else range(module.num_experts)
                expected.update((module_name, name, part, expert) for name, part in module.checkpoint_tensors()
                                for expert in experts)
            else:
                expected.update((module_name, name, None, None) for name, _ in module.named_parameters(recurse=False))

        found, unexpected, mismatched = set(), [], []
        for checkpoint_name, tensor in weights:
            if checkpoint_name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved rope buffers; ours are computed from the config
            if checkpoint_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            keys = expert_checkpoint_keys(checkpoint_name, tensor) or [((*_model_key(checkpoint_name), None), tensor)]
            if any(key not in expected for key, _ in keys):
                unexpected.append(checkpoint_name)
                continue
            for key, piece in keys:
                found.add(key)
                module_name, name, part, expert = key
                module = modules[module_name]
                try:
                    if isinstance(module, Linear):
                        module.load(name, part, piece, expert)
                    else:
                        target = getattr(module, name)
                        if target.shape != piece.shape:
                            raise ShapeMismatch(f"checkpoint {tuple(piece.shape)}, model expects {tuple(target.shape)}")
                        target.copy_(piece)
                except ShapeMismatch as error:
                    mismatched.append(f"{checkpoint_name}: {error}")

        missing = sorted(_checkpoint_name(*key) for key in expected - found)
        problems = [f"{label} ({len(names)}): {', '.join(names[:_MAX_NAMES_IN_ERROR])}"
                    + (", ..." if len(names) > _MAX_NAMES_IN_ERROR else "")
                    for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                         ("shape mismatches", mismatched)) if names]
        if problems:
            raise ValueError(f"checkpoint does not fit {self.config.architecture} "
                             f"(hidden {self.config.hidden_size}, {self.config.num_hidden_layers} layers): "
                             + "; ".join(problems))


def _model_key(checkpoint_name: str) -> tuple[str, str, str | None]:
    """'model.layers.0.self_attn.k_proj.weight' -> ('model.layers.0.self_attn.qkv_proj', 'weight', 'k_proj')."""
    module_name, _, name = checkpoint_name.rpartition(".")
    prefix, _, last = module_name.rpartition(".")
    if last not in _FUSED_PROJECTIONS:
        return module_name, name, None
    return f"{prefix}.{_FUSED_PROJECTIONS[last]}", name, last


def _checkpoint_name(module_name: str, name: str, part: str | None, expert: int | None) -> str:
    """The inverse of `_model_key` (and of the hub layout of `expert_checkpoint_keys`), for error messages."""
    parent = module_name.rpartition(".")[0]
    if expert is not None:
        return f"{parent}.{expert}.{part or module_name.rpartition('.')[2]}.{name}"
    if part is not None:
        module_name = f"{parent}.{part}"
    return f"{module_name}.{name}"
