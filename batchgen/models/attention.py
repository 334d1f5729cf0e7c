"""The attention interface every model layer calls: store this step's K/V, then attend over the paged cache.

The model runner builds one `AttentionMetadata` per step and hands it down through the model; each
`Attention` layer owns its slice of the KV cache (set by the runner after allocation).
"""
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from batchgen.kernels import ops


@dataclass
class AttentionMetadata:
    """A step's flat batch of T query tokens from B sequences."""
    query_start_loc: torch.Tensor  # int32 [B + 1]: sequence b's query rows are [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor         # int32 [B]: context length after this step (cached + new tokens)
    block_tables: torch.Tensor     # int32 [B, max_blocks]: physical blocks of each sequence, in order
    slot_mapping: torch.Tensor     # int64 [T]: cache slot of each new token's K/V, -1 for padding
    max_query_len: int
    max_seq_len: int
    # the first num_decodes sequences have one query token each: the decode kernel (split along the context)
    # serves them, the prefill kernel the rest
    num_decodes: int = 0

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    @cached_property
    def prefills(self) -> "AttentionMetadata":
        """The sequences after the decodes, with query offsets of their own. Copies, not views: a view starting
        mid-tensor may be unaligned, and Triton compiles a kernel variant per pointer alignment, which would
        stall a job's steps while it compiles."""
        d = self.num_decodes
        return AttentionMetadata(self.query_start_loc[d:] - d, self.seq_lens[d:].clone(), self.block_tables[d:].clone(),
                                 self.slot_mapping[d:].clone(), self.max_query_len, self.max_seq_len)


class Attention(nn.Module):
    """One layer's attention; `sliding_window` W (None: global) lets a query at position p see keys in
    (p - W, p] only. `k_scale`/`v_scale` are the layer's fp8 KV-cache scales (an fp8 cache holds K / k_scale and
    V / v_scale): the checkpoint's calibration when it has one, else 1.0; a cache in the compute dtype ignores
    them."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window
        # [num_blocks, block_size, num_kv_heads, head_dim] each (any strides); views into the runner's cache tensor
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # host floats, not tensors: fixed once loaded, so CUDA graphs capture them and no step reads the device
        self.k_scale = self.v_scale = 1.0
        self.kv_scales_loaded = False

    def load_kv_scale(self, name: str, tensor: torch.Tensor) -> None:
        """A checkpoint's per-tensor KV-cache scale (name 'k_scale' or 'v_scale')."""
        if tensor.numel() != 1:
            raise ValueError(f"KV-cache {name} of shape {tuple(tensor.shape)}: only per-tensor scales are supported")
        value = float(tensor.float().reshape(()))
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"KV-cache {name} is {value}: a scale must be a positive finite number")
        setattr(self, name, value)
        self.kv_scales_loaded = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotary already applied) -> [T, Hq * D]."""
        ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        if meta.decode_only:
            out = self._decode(q, meta.seq_lens, meta.block_tables)
        elif meta.num_decodes == 0:
            out = self._prefill(q, meta)
        else:
            d = meta.num_decodes
            out = torch.cat([self._decode(q[:d], meta.seq_lens[:d], meta.block_tables[:d]),
                             self._prefill(q[d:], meta.prefills)])
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q, seq_lens, block_tables):
        return ops.paged_decode_attention(q, self.k_cache, self.v_cache, seq_lens, block_tables, self.scale,
                                          self.sliding_window, self.k_scale, self.v_scale)

    def _prefill(self, q, meta: AttentionMetadata):
        return ops.paged_prefill_attention(q, self.k_cache, self.v_cache, meta.query_start_loc, meta.seq_lens,
                                           meta.block_tables, self.scale, meta.max_query_len, self.sliding_window,
                                           self.k_scale, self.v_scale)
