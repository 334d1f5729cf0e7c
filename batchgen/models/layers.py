"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding (projections: linear.py).

Every layer runs its math through `batchgen.kernels.ops`, so the same module uses Triton on the GPU and the
torch references on the CPU.
"""
import torch
from torch import nn

from batchgen.kernels import ops
from batchgen.models.config import ModelConfig

# rope types whose frequencies do not depend on the sequence being processed, so one table serves all positions
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8: bool = False):
        """Without residual: normed x. With residual: (normed(x + residual), x + residual), the residual add
        of the decoder layer fused into the norm that follows it. fp8: the normed x comes quantized per token,
        (fp8 [T, H], scales [T, 1]), for an fp8 projection."""
        return (ops.rms_norm_fp8 if fp8 else ops.rms_norm)(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Applies rotary position embedding from a precomputed fp32 table `cos_sin_cache` [max_positions, head_dim]
    holding cos in its first head_dim/2 columns and sin in the rest.

    The table is computed on the CPU (also when the model is built on the meta device) and follows the model
    with `.to(device)`; it stays fp32 whatever the model dtype, so never cast the model as a whole.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        with torch.device("cpu"):
            inv_freq, attention_scaling = rope_inv_freq(config)
            angles = torch.arange(config.max_model_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, Hq, D]; k [T, Hkv, D] -> rotated (q, k)."""
        return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32, cos/sin scaling) for the config's rope type.

    Scaled types come from transformers' own init functions, so batchgen's positions mean exactly what they
    mean in the checkpoint's reference implementation. Types whose frequencies change with the sequence
    length (dynamic NTK, longrope) are refused: one fixed table cannot reproduce them.
    """
    params = config.rope_parameters
    rope_type = params["rope_type"]
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"rope type '{rope_type}' is not supported: batchgen supports "
                         f"{', '.join(_STATIC_ROPE_TYPES)} (frequencies fixed for all positions)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial rotary embedding (partial_rotary_factor={params['partial_rotary_factor']}) "
                         "is not supported")
    dim = config.head_dim
    if rope_type == "default":
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The init functions read these fields of a transformers config; the Llama one has them all.
    hf_config = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                            head_dim=dim, max_position_embeddings=config.max_position_embeddings,
                            rope_parameters=dict(params))
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)
