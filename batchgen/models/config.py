"""What the model layer needs to know about a checkpoint, read from a Hugging Face model directory."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# the dtypes models run in and checkpoints may declare, by name: the one map engine, loader and config use
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HIDDEN_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# architectures whose config.json leaves fields to transformers' defaults (hub Gemma 3 configs name only what
# differs): parsed after transformers' own config class has filled them in
_FILLED_BY_TRANSFORMERS = {"Gemma3ForCausalLM": "gemma3_text", "Gemma3ForConditionalGeneration": "gemma3_text",
                           "Phi3ForCausalLM": "phi3"}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder as described by config.json (+ generation_config.json).

    Architecture quirks become flags here so one model class serves them all: Qwen2 has a bias on q/k/v
    (not on o_proj), Qwen3 RMS-normalises q and k per head, Llama may carry biases everywhere, Gemma 3 has
    (1 + w) norms around each sublayer, a GELU MLP, scaled embeddings and 5 sliding-window layers per global
    one with their own rope, Phi-3 partial rotary and LongRoPE.
    """
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool         # bias on the q/k/v projections
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool                # per-head RMSNorm of q and k before rotary (Qwen3)
    rope_parameters: dict        # transformers 5 form: rope_type, rope_theta and the type's own keys
    dtype: torch.dtype           # the checkpoint's dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None   # the window of "sliding_attention" layers; None when it limits nothing
    moe: "MoEConfig | None" = None  # mixture-of-experts models only
    # defaults below: the Llama family
    layer_types: tuple[str, ...] = ()        # per layer, one of LAYER_TYPES; () = all full attention
    sliding_rope_parameters: dict | None = None  # rope of sliding layers when it differs (Gemma 3's local base)
    hidden_act: str = "silu"
    attention_scale: float | None = None     # None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    norm_unit_offset: bool = False           # RMSNorm weights stored as w - 1 (Gemma)
    sandwich_norms: bool = False             # norms on each sublayer's output too (Gemma's post-attention/-feedforward)
    embedding_scale: float | None = None     # embeddings multiplied by this, rounded to the model dtype (Gemma)
    final_logit_softcapping: float | None = None

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, None for global attention."""
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def rope_position_offset(self, sequence_length: int) -> int:
        """Where the tokens of a sequence of this length start in the rotary table: 0, or for a LongRoPE model
        past original_max_position_embeddings, the table's long-factor half (see layers.RotaryEmbedding)."""
        params = self.rope_parameters
        if params["rope_type"] != "longrope" or sequence_length <= params["original_max_position_embeddings"]:
            return 0
        return self.max_model_len

    @property
    def max_model_len(self) -> int:
        """Longest context this model computes exactly: sliding-window layers attend within their window at any
        length, so the window caps nothing."""
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
        generation_file = path / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
        return cls.from_dict(json.loads(config_file.read_text()), generation)

    @classmethod
    def from_dict(cls, config: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Parse config.json's content. Accepts both the transformers 5 layout (`rope_parameters`) and the
        older one (`rope_theta` + `rope_scaling`) that most hub checkpoints still use."""
        generation_config = generation_config or {}
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("config.json names no architecture (its 'architectures' list is missing or empty)")
        architecture = architectures[0]
        top_level = config
        if architecture in _FILLED_BY_TRANSFORMERS:
            config = _filled_by_transformers(architecture, config)

        def required(key: str):
            if config.get(key) is None:
                raise ValueError(f"config.json of this {architecture} model lacks '{key}'")
            return config[key]

        hidden_act = config.get("hidden_activation") or config.get("hidden_act", "silu")
        if hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_act '{hidden_act}' is not supported (one of {', '.join(HIDDEN_ACTIVATIONS)})")
        for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if config.get(key):
                raise ValueError(f"config.json sets {key}={config[key]!r}, which batchgen does not implement")

        hidden_size, num_heads = required("hidden_size"), required("num_attention_heads")
        num_layers = required("num_hidden_layers")
        max_position_embeddings = required("max_position_embeddings")
        bias = bool(config.get("attention_bias"))
        if architecture == "Qwen2ForCausalLM":
            qkv_bias, o_proj_bias = True, False
        elif architecture == "Qwen2MoeForCausalLM":
            qkv_bias, o_proj_bias = config.get("qkv_bias", True), False
        elif architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
            qkv_bias = o_proj_bias = False
        else:
            qkv_bias = o_proj_bias = bias

        bos = generation_config.get("bos_token_id", config.get("bos_token_id"))
        eos_ids = (_id_list(top_level.get("eos_token_id")) + _id_list(config.get("eos_token_id"))
                   + _id_list(generation_config.get("eos_token_id")))
        gemma = architecture.startswith("Gemma3")
        rope_parameters = config.get("rope_parameters") or {}
        sliding_rope = None
        if set(rope_parameters) <= set(LAYER_TYPES) and rope_parameters:   # per layer type (Gemma 3)
            sliding_rope = _rope_parameters(config, rope_parameters.get("sliding_attention"), max_position_embeddings)
            rope_parameters = rope_parameters["full_attention"]

        return cls(
            architecture=architecture,
            vocab_size=required("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=required("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=architecture == "LlamaForCausalLM" and bool(config.get("mlp_bias")),
            qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM") or gemma,
            rope_parameters=_rope_parameters(config, rope_parameters or None, max_position_embeddings),
            dtype=_checkpoint_dtype(top_level),
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            sliding_window=_active_sliding_window(config, max_position_embeddings),
            moe=MoEConfig.from_dict(config, architecture, num_layers),
            layer_types=_layer_types(architecture, config, num_layers),
            sliding_rope_parameters=sliding_rope,
            hidden_act=hidden_act,
            attention_scale=config["query_pre_attn_scalar"] ** -0.5 if gemma else None,
            norm_unit_offset=gemma,
            sandwich_norms=gemma,
            embedding_scale=hidden_size ** 0.5 if gemma else None,
            # transformers' Gemma3ForConditionalGeneration never applies its text config's softcapping
            final_logit_softcapping=(None if architecture == "Gemma3ForConditionalGeneration"
                                     else config.get("final_logit_softcapping")),
        )


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _filled_by_transformers(architecture: str, config: dict) -> dict:
    """The text model's config.json content with transformers' defaults filled in. Gemma 3 multimodal
    checkpoints nest it under text_config, and tie the output embedding by their own top-level flag."""
    from transformers import AutoConfig

    text = config
    if architecture == "Gemma3ForConditionalGeneration":
        text = {**config.get("text_config", {}), "tie_word_embeddings": config.get("tie_word_embeddings", True)}
    text = {key: value for key, value in text.items() if key not in ("architectures", "model_type")}
    return AutoConfig.for_model(_FILLED_BY_TRANSFORMERS[architecture], **text).to_dict()


def _layer_types(architecture: str, config: dict, num_layers: int) -> tuple[str, ...]:
    """Each layer's attention as transformers runs it: `layer_types` when the config lists them, else Qwen's
    `use_sliding_window` from layer `max_window_layers` on, else the window (if any) on every layer."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        if config.get("sliding_window") is None:
            layer_types = ["full_attention"] * num_layers
        elif architecture.startswith("Qwen"):
            use_window = config.get("use_sliding_window")
            first_sliding = config.get("max_window_layers", num_layers) if use_window else num_layers
            layer_types = ["full_attention" if i < first_sliding else "sliding_attention" for i in range(num_layers)]
        else:
            layer_types = ["sliding_attention"] * num_layers
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown or len(layer_types) != num_layers:
        raise ValueError(f"config.json layer_types={layer_types!r} is not supported: batchgen needs one of "
                         f"{', '.join(LAYER_TYPES)} for each of the {num_layers} layers")
    return tuple(layer_types)


def _rope_parameters(config: dict, params: dict | None, max_position_embeddings: int) -> dict:
    if params is None:
        params = config.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"per-layer-type rope parameters are not supported: {params}")
    params = dict(params)
    legacy_type = params.pop("type", "default")
    params.setdefault("rope_type", legacy_type)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in config:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # transformers' own fallback: the pretraining length is the model's length unless stated
        params.setdefault("original_max_position_embeddings",
                          config.get("original_max_position_embeddings", max_position_embeddings))
    return params


def _checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"checkpoint dtype '{name}' is not supported (one of {', '.join(DTYPES)})")
    return DTYPES[name]


def _active_sliding_window(config: dict, max_position_embeddings: int) -> int | None:
    """The window, if any layer uses one that is shorter than the model's context.

    Qwen2/Qwen3 configs carry a `sliding_window` value even when `use_sliding_window` is false, and
    transformers 5 lists per-layer `layer_types`; either can switch the window off. Which layers use it is
    `layer_types`' business.
    """
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window") is False:
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window if window < max_position_embeddings else None


@dataclass(frozen=True)
class MoEConfig:
    """The expert layers of a mixture-of-experts model: which layers have them and how tokens are routed.

    Every family routes by a softmax over all experts (in fp32) and keeps the top-k; `renormalize` divides the
    k weights by their sum (Mixtral always: the softmax over the chosen logits; Qwen MoE when norm_topk_prob).
    """
    num_experts: int
    top_k: int
    intermediate_size: int                # of one expert
    renormalize: bool
    weights_in_model_dtype: bool          # Qwen MoE rounds the routing weights to the model dtype; Mixtral not
    shared_expert_intermediate_size: int  # Qwen2-MoE's always-on expert, scaled by a sigmoid gate; 0 = none
    sparse_layers: tuple[int, ...]        # the layers whose MLP is the expert block; the others are dense

    @classmethod
    def from_dict(cls, config: dict, architecture: str, num_layers: int) -> "MoEConfig | None":
        if architecture not in _MOE_ARCHITECTURES:
            return None
        # transformers writes num_local_experts for Qwen3-MoE too; hub checkpoints of Qwen MoE write num_experts
        num_experts = config.get("num_experts", config.get("num_local_experts"))
        for key, supported in _ROUTING_FLAGS.items():
            if config.get(key) not in (None, supported):
                raise ValueError(f"{architecture} config sets {key}={config[key]!r}; batchgen routes experts only "
                                 f"with {key}={supported!r}")
        if architecture == "MixtralForCausalLM":
            if config.get("norm_topk_prob") is False:
                raise ValueError("MixtralForCausalLM config sets norm_topk_prob=False; Mixtral routing always "
                                 "renormalises the top-k weights")
            return cls(num_experts=num_experts, top_k=config["num_experts_per_tok"],
                       intermediate_size=config["intermediate_size"], renormalize=True,
                       weights_in_model_dtype=False, shared_expert_intermediate_size=0,
                       sparse_layers=tuple(range(num_layers)))
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        return cls(num_experts=num_experts, top_k=config["num_experts_per_tok"],
                   intermediate_size=config["moe_intermediate_size"],
                   renormalize=bool(config.get("norm_topk_prob", False)), weights_in_model_dtype=True,
                   shared_expert_intermediate_size=(config.get("shared_expert_intermediate_size", 0)
                                                    if architecture == "Qwen2MoeForCausalLM" else 0),
                   sparse_layers=tuple(i for i in range(num_layers)
                                       if num_experts > 0 and i not in dense and (i + 1) % step == 0))


_MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# routing options of other MoE families' configs, with the one value batchgen's routing computes
_ROUTING_FLAGS = {"scoring_func": "softmax", "topk_method": "greedy", "routed_scaling_factor": 1.0, "n_group": 1,
                  "topk_group": 1, "n_shared_experts": 0}
