"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding, the token embedding (projections:
linear.py).

Every layer runs its math through `batchgen.kernels.ops`, so the same module uses Triton on the GPU and the
torch references on the CPU.
"""
import torch
from torch import nn
from torch.nn import functional as F

from batchgen.distributed import all_reduce, tensor_parallel
from batchgen.kernels import ops
from batchgen.models.checkpoint import CheckpointTensor, read
from batchgen.models.config import ModelConfig
from batchgen.models.linear import ShapeMismatch

# rope types one table serves: fixed frequencies, or LongRoPE's two sets (see RotaryEmbedding)
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.unit_offset = unit_offset   # Gemma: the weight is stored as w - 1, applied as (1 + w)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8: bool = False):
        """Without residual: normed x. With residual: (normed(x + residual), x + residual), the residual add
        of the decoder layer fused into the norm that follows it. fp8: the normed x comes quantized per token,
        (fp8 [T, H], scales [T, 1]), for an fp8 projection."""
        return (ops.rms_norm_fp8 if fp8 else ops.rms_norm)(x, self.weight, self.eps, residual, self.unit_offset)


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split across the tensor-parallel ranks: each rank looks up the
    tokens in its slice, zeros for the others, and an all-reduce sums the ranks' rows. A tied LM head
    multiplies by the same slice (`weight` [vocab / ranks, hidden])."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = tensor_parallel()
        if vocab_size % tp.size:
            raise ValueError(f"tensor_parallel_size {tp.size} does not divide the vocabulary of {vocab_size} "
                             "tokens (the embedding and LM head split it into equal slices)")
        self.vocab_size, self.tp_size = vocab_size, tp.size
        rows = vocab_size // tp.size
        self.vocab_start = tp.rank * rows
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def load(self, weight: torch.Tensor | CheckpointTensor) -> None:
        """Copy this rank's rows of the full checkpoint matrix [vocab, hidden] (read from the file only now)."""
        rows = self.weight.shape[0]
        if weight.shape != (self.vocab_size, self.weight.shape[1]):
            raise ShapeMismatch(f"checkpoint {tuple(weight.shape)}, model expects ({self.vocab_size}, "
                                f"{self.weight.shape[1]})")
        self.weight.copy_(read(weight.narrow(0, self.vocab_start, rows)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        in_slice = (local_ids >= 0) & (local_ids < self.weight.shape[0])
        rows = F.embedding(local_ids.clamp(0, self.weight.shape[0] - 1), self.weight)
        return all_reduce(rows.masked_fill(~in_slice.unsqueeze(-1), 0.0))


class RotaryEmbedding(nn.Module):
    """Applies rotary position embedding from a precomputed fp32 table `cos_sin_cache` [rows, rotary_dim]
    holding cos in its first rotary_dim/2 columns and sin in the rest; the first rotary_dim dims of each head
    rotate (rotary_dim < head_dim: partial rotary).

    Row p holds position p. LongRoPE (Phi-3 128k) has two frequency sets, and Hugging Face picks one per
    forward pass: the long factors once the sequence is longer than original_max_position_embeddings, and
    `generate` recomputes the whole sequence when it first passes that length. So the table holds rows
    [0, max_len) with short factors, then rows [max_len, 2 max_len) with long factors, for sequences longer
    than that (`ModelConfig.rope_position_offset`; the scheduler recomputes a sequence that crosses it).

    The table is computed on the CPU (also when the model is built on the meta device) and follows the model
    with `.to(device)`; it stays fp32 whatever the model dtype, so never cast the model as a whole.
    """

    def __init__(self, config: ModelConfig, params: dict):
        super().__init__()
        max_len = config.max_model_len
        with torch.device("cpu"):
            positions = torch.arange(max_len, dtype=torch.float32)[:, None]
            inv_freq, attention_scaling = rope_inv_freq(config, params)
            angles = positions * inv_freq[None, :]
            if params["rope_type"] == "longrope":
                long_inv_freq, _ = rope_inv_freq(config, params, long_factors=True)
                angles = torch.cat((angles, positions * long_inv_freq[None, :]))
            cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T] (table rows); q [T, Hq, D]; k [T, Hkv, D] -> rotated (q, k)."""
        return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)


def rope_inv_freq(config: ModelConfig, params: dict, long_factors: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim/2] fp32, cos/sin scaling) for rope parameters `params` of the model.

    Scaled types come from transformers' own init functions, so batchgen's positions mean exactly what they
    mean in the checkpoint's reference implementation. Types whose frequencies change with the sequence
    length in other ways than LongRoPE's two sets (dynamic NTK) are refused: a table cannot reproduce them.
    """
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_parameters rope_type '{rope_type}' is not supported: batchgen supports "
                         f"{', '.join(_SUPPORTED_ROPE_TYPES)}")
    dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The init functions read these fields of a transformers config; the Llama one has them all.
    hf_config = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                            head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                            rope_parameters=dict(params))
    # LongRoPE's long set is what transformers computes for a sequence past the original length
    seq_len = params["original_max_position_embeddings"] + 1 if long_factors else None
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), seq_len=seq_len)
    return inv_freq.float(), float(attention_scaling)
