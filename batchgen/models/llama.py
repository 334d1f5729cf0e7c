"""One decoder for the Llama family and its relatives: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, tied-embedding
variants (SmolLM2), Gemma 3 (text) and Phi-3/3.5/4-mini, told apart by `ModelConfig` flags (norm style and
placement, MLP activation, each layer's sliding window and rope), and its mixture-of-experts relatives (Mixtral,
Qwen2-MoE, Qwen3-MoE), whose layers differ only in the MLP (`decoder_mlp`).

Module names follow the Hugging Face checkpoints, except that q/k/v and gate/up projections are fused;
`load_weights` maps the checkpoint's separate tensors into the fused ones (Phi-3 stores them fused already).
Projections are `Linear` layers, whose weight format (bf16, fp8, ...) the loader chooses.
"""
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from batchgen.distributed import all_gather, tensor_parallel
from batchgen.kernels import ops
from batchgen.models.attention import Attention, AttentionMetadata
from batchgen.models.checkpoint import CheckpointTensor, read
from batchgen.models.config import ModelConfig
from batchgen.models.layers import RMSNorm, RotaryEmbedding, VocabParallelEmbedding
from batchgen.models.linear import Linear, ShapeMismatch
from batchgen.models.moe import SparseMoeBlock, expert_checkpoint_keys
from batchgen.models.quant import kv_cache_scale

# checkpoint projection name -> the fused module holding it as a part of that name
_FUSED_PROJECTIONS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
# Gemma 3 multimodal checkpoints: prefixes of the text model's tensors (hub layout, then what transformers 5
# may write) -> ours, and of the vision tower's, which batchgen does not load
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# activation -> (act(gate) * up, the same quantized per token for an fp8 down projection)
_ACTIVATIONS = {"silu": (ops.silu_and_mul, ops.silu_and_mul_fp8),
                "gelu_pytorch_tanh": (ops.gelu_tanh_and_mul, ops.gelu_tanh_and_mul_fp8)}
_MAX_NAMES_IN_ERROR = 20


def _norm(config: ModelConfig, size: int) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, config.norm_unit_offset)


def _kv_head_slices(config: ModelConfig) -> int:
    """How many slices tensor parallelism cuts the KV heads into: one per rank, or one per head when there are
    fewer heads than ranks (each rank then keeps the head its query heads attend with). Refuses head counts
    that do not divide."""
    num_heads, num_kv_heads, tp_size = config.num_attention_heads, config.num_key_value_heads, tensor_parallel().size
    if num_heads % tp_size or (num_kv_heads % tp_size and tp_size % num_kv_heads):
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the model's {num_heads} attention heads "
                         f"and {num_kv_heads} KV heads (each must be a multiple of it, or the KV heads a divisor)")
    return min(num_kv_heads, tp_size)


class LlamaAttention(nn.Module):
    """Self-attention over this rank's heads: its share of the query heads and the KV heads they attend with."""

    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        kv_slices = _kv_head_slices(config)
        self.num_heads = config.num_attention_heads // tensor_parallel().size
        self.num_kv_heads = config.num_key_value_heads // kv_slices
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                               bias=config.attention_bias, parallel="column",
                               part_shards={"k_proj": kv_slices, "v_proj": kv_slices})
        self.split_sizes = [size for _, size in self.qkv_proj.part_rows.values()]
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_proj_bias, parallel="row")
        if config.qk_norm:
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)
        self.qk_norm = config.qk_norm
        self.rotary_emb = rotary_emb  # shared by the layers of one rope: one table per model (or layer type)
        scale = config.attention_scale or self.head_dim ** -0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | tuple, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows: project only these rows' attention output (all rows' K/V are stored all the same)."""
        num_tokens = positions.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out if rows is None else out[rows])


class LlamaMLP(nn.Module):
    """Gated MLP over this rank's share of the intermediate size. reduce_output=False: the caller all-reduces
    the partial sum (an MoE block's shared expert)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None, reduce_output: bool = True):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, {"gate_proj": size, "up_proj": size}, bias=config.mlp_bias,
                                   parallel="column")
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias, parallel="row",
                                reduce_output=reduce_output)
        self.act_and_mul, self.act_and_mul_fp8 = _ACTIVATIONS[config.hidden_act]

    @property
    def fp8_token_input(self) -> bool:
        """Whether the norm before this MLP should hand it its input quantized to fp8 per token."""
        return self.gate_up_proj.weight_format.fp8_token_input

    def forward(self, hidden: torch.Tensor | tuple) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)
        if self.down_proj.weight_format.fp8_token_input:
            return self.down_proj(self.act_and_mul_fp8(gate_up))
        return self.down_proj(self.act_and_mul(gate_up))


def decoder_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward block: the expert block on a mixture-of-experts model's sparse layers
    (with Qwen2-MoE's shared expert, a plain MLP), the dense MLP everywhere else."""
    moe = config.moe
    if moe is None or layer not in moe.sparse_layers:
        return LlamaMLP(config)
    shared_size = moe.shared_expert_intermediate_size
    return SparseMoeBlock(config, LlamaMLP(config, shared_size, reduce_output=False) if shared_size else None)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP. With sandwich_norms (Gemma) each sublayer's output is normed too, and the
    norm before the MLP is `pre_feedforward_layernorm`; without, that norm is `post_attention_layernorm`."""

    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None,
                 mlp: nn.Module):
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = LlamaAttention(config, rotary_emb, sliding_window)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = _norm(config, config.hidden_size)
            self.post_feedforward_layernorm = _norm(config, config.hidden_size)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them. Norms
        feeding fp8 projections hand them their input quantized. With `rows`, attention runs over every token
        (storing its K/V) and the rest of the layer over those rows only."""
        fp8_qkv = self.self_attn.qkv_proj.weight_format.fp8_token_input
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden, fp8=fp8_qkv)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, fp8=fp8_qkv)
        hidden = self.self_attn(positions, hidden, meta, rows)
        if rows is not None:
            residual = residual[rows]
        if self.sandwich_norms:
            hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual,
                                                              fp8=self.mlp.fp8_token_input)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual, fp8=self.mlp.fp8_token_input)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embedding_scale = config.embedding_scale
        self.rotary_emb = RotaryEmbedding(config, config.rope_parameters)
        # Gemma 3's sliding layers rotate with their own base
        sliding_rope = config.sliding_rope_parameters
        self.sliding_rotary_emb = None if sliding_rope is None else RotaryEmbedding(config, sliding_rope)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self._rotary_emb(config, layer), config.layer_window(layer),
                              decoder_mlp(config, layer))
            for layer in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size)

    def _rotary_emb(self, config: ModelConfig, layer: int) -> RotaryEmbedding:
        if self.sliding_rotary_emb is not None and config.layer_window(layer) is not None:
            return self.sliding_rotary_emb
        return self.rotary_emb

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.embedding_scale is not None:   # as transformers does: the scale rounded to the model dtype
            hidden = hidden * torch.tensor(self.embedding_scale, dtype=hidden.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, meta, rows if i == last else None)
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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden_size], or [len(rows), hidden_size]
        for the rows a step reads (those it samples): nothing reads the others' last-layer output, so the last
        layer projects and runs its MLP over these rows alone (1/num_layers of a prefill step's GEMMs saved)."""
        return self.model(input_ids, positions, meta, rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden_size] (only the rows that sample) -> logits [S, vocab_size], the whole vocabulary on
        every rank (each rank computes its slice of it). In the model's dtype, as Hugging Face's models return
        them before their `.float()`: consumers compute in fp32 from these values (a copy of 856 x 128k logits
        to fp32 cost a decode step 0.33 ms on an H200); fp32 after a final softcap."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        logits = all_gather(logits, dim=-1)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits.float() / cap) * cap

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
        """Load checkpoint tensors (Hugging Face names) into this model: `Linear` layers through their weight
        format, other parameters copied with a cast to their dtype. Each layer reads a `CheckpointTensor` only
        as far as it holds it (its tensor-parallel slice).

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
            if checkpoint_name.endswith("rotary_emb.inv_freq") or checkpoint_name.startswith(_VISION_PREFIXES):
                continue  # old checkpoints saved rope buffers (ours come from the config); no vision tower here
            checkpoint_name = _text_model_name(checkpoint_name)
            if checkpoint_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            if (kv_scale := kv_cache_scale(checkpoint_name)) is not None:   # optional: not in `expected`
                attention = modules.get(f"{kv_scale[0]}.attn")
                if isinstance(attention, Attention):
                    attention.load_kv_scale(kv_scale[1], read(tensor))
                else:
                    unexpected.append(checkpoint_name)
                continue
            keys = (expert_checkpoint_keys(checkpoint_name, tensor)
                    or _dense_checkpoint_keys(modules, checkpoint_name, tensor))
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
                    elif isinstance(module, VocabParallelEmbedding):
                        module.load(piece)
                    else:
                        target = getattr(module, name)
                        if target.shape != piece.shape:
                            raise ShapeMismatch(f"checkpoint {tuple(piece.shape)}, model expects {tuple(target.shape)}")
                        target.copy_(read(piece))
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


def _text_model_name(checkpoint_name: str) -> str:
    """A Gemma 3 multimodal checkpoint's text-model tensor under its text-only name; other names unchanged."""
    for prefix, ours in _TEXT_PREFIXES.items():
        if checkpoint_name.startswith(prefix):
            return ours + checkpoint_name[len(prefix):]
    return checkpoint_name


def _dense_checkpoint_keys(modules: dict, checkpoint_name: str, tensor: torch.Tensor | CheckpointTensor
                           ) -> list[tuple[tuple, torch.Tensor | CheckpointTensor]]:
    """[(model key, tensor)] of a dense checkpoint tensor: one, or one per part of a fused layer stored whole
    (Phi-3's qkv_proj and gate_up_proj)."""
    module_name, name, part = _model_key(checkpoint_name)
    module = modules.get(module_name)
    if part is None and isinstance(module, Linear) and None not in module.part_rows:
        return [((module_name, name, p, None), piece) for p, piece in _split_parts(module, tensor)]
    return [((module_name, name, part, None), tensor)]


def _split_parts(module: Linear, tensor: torch.Tensor | CheckpointTensor
                 ) -> list[tuple[str, torch.Tensor | CheckpointTensor]]:
    """A checkpoint tensor of a whole fused layer cut into its parts along the output rows (weights, biases
    and per-row scales alike: each part's share of the rows is its share of the layer's outputs); each part
    is then sharded like a separately stored one (and read only then)."""
    total, start, parts = sum(module.checkpoint_parts.values()), 0, []
    for part, part_size in module.checkpoint_parts.items():
        rows = tensor.shape[0] * part_size // total
        parts.append((part, tensor.narrow(0, start, rows)))
        start += rows
    return parts


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
