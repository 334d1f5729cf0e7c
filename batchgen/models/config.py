"""What the model layer needs to know about a checkpoint, read from a Hugging Face model directory."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# the dtypes models run in and checkpoints may declare, by name: the one map engine, loader and config use
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder as described by config.json (+ generation_config.json).

    Architecture quirks become flags here so one model class serves them all: Qwen2 has a bias on q/k/v
    (not on o_proj), Qwen3 RMS-normalises q and k per head, Llama may carry biases everywhere.
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
    sliding_window: int | None   # set only when a window actually limits attention (see max_model_len)
    moe: "MoEConfig | None" = None  # mixture-of-experts models only

    @property
    def max_model_len(self) -> int:
        """Longest context this model computes exactly.

        batchgen always attends over the full context. A sliding-window model (e.g. Mistral 7B v0.1, window
        4096 in a 32k context) attends to the same keys as long as the whole sequence fits in the window, so
        the engine caps its max_model_len here and results stay exact.
        """
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

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

        def required(key: str):
            if config.get(key) is None:
                raise ValueError(f"config.json of this {architecture} model lacks '{key}'")
            return config[key]

        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act '{hidden_act}' is not supported (only 'silu')")

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
        eos_ids = _id_list(config.get("eos_token_id")) + _id_list(generation_config.get("eos_token_id"))

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
            qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            rope_parameters=_rope_parameters(config, max_position_embeddings),
            dtype=_checkpoint_dtype(config),
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            sliding_window=_active_sliding_window(config, max_position_embeddings),
            moe=MoEConfig.from_dict(config, architecture, num_layers),
        )


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _rope_parameters(config: dict, max_position_embeddings: int) -> dict:
    params = config.get("rope_parameters")
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
    transformers 5 lists per-layer `layer_types`; either can switch the window off. When a window is on for
    only some layers we still report it: capping the context there is exact for every layer.
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
