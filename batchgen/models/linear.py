"""The linear layer every model projection is built from: it owns this rank's shard of a weight stored in a
weight format (batchgen/models/quant.py), fused named parts, and optionally a leading expert dimension.

Models build `Linear(in_features, out_features or {part: size}, bias, parallel=...)`; the loader then gives
each layer its format (`set_format`, on the meta device) and materializes the parameters the format created;
`load_weights` routes each checkpoint tensor to `Linear.load(name, part, tensor)`. Fused parts are named after
the checkpoint modules they come from ("q_proj", "k_proj", "v_proj" in a qkv_proj).
"""
from typing import Literal

import torch
from torch import nn

from batchgen.distributed import all_reduce, tensor_parallel
from batchgen.models.checkpoint import CheckpointTensor, read
from batchgen.models.quant import Unquantized, WeightFormat


class ShapeMismatch(ValueError):
    """A checkpoint tensor that does not fit its place in the model."""


class Linear(nn.Module):
    """y = x W^T + b, over this rank's shard of W.

    parallel: how tensor parallelism (`batchgen.distributed`, read when the layer is built) shards it:
    "column" splits the output, each fused part across the ranks; "row" splits the input and all-reduces the
    ranks' partial sums (the bias added once, after the sum); "replicated" keeps it whole on every rank.
    part_shards: parts that split into fewer slices than there are ranks (KV heads fewer than ranks): rank r
    holds slice r * slices // ranks, shared with its neighbours.
    reduce_output: False leaves a row-parallel layer's partial sum for its caller to all-reduce together with
    other partial sums (an MoE block reduces its experts and its shared expert once); rank 0 adds the bias.
    num_experts: a leading expert dimension, weights [E, out, in] (mixture-of-experts layers multiply them
    with their own kernel; `forward` is for plain layers).
    """

    def __init__(self, in_features: int, out_features: int | dict[str, int], bias: bool,
                 parallel: Literal["column", "row", "replicated"] = "replicated", num_experts: int | None = None,
                 part_shards: dict[str, int] | None = None, reduce_output: bool = True):
        super().__init__()
        tp = tensor_parallel()
        self.parallel, self.tp_rank, self.tp_size = parallel, tp.rank, tp.size
        self.reduce_output = reduce_output
        # the checkpoint's (unsharded) sizes: what the loader reads and dummy weights draw
        self.checkpoint_parts = out_features if isinstance(out_features, dict) else {None: out_features}
        self.checkpoint_in_features = in_features
        # part -> (slices it splits into, the one this rank holds)
        self.part_slices: dict[str | None, tuple[int, int]] = {}
        self.part_rows: dict[str | None, tuple[int, int]] = {}
        start = 0
        for name, size in self.checkpoint_parts.items():
            slices = (part_shards or {}).get(name, tp.size) if parallel == "column" else 1
            _check_split(f"{name or 'output'} of {size} rows", size, slices, tp.size)
            self.part_slices[name] = (slices, tp.rank * slices // tp.size)
            self.part_rows[name] = (start, size // slices)
            start += size // slices
        self.out_features = start
        in_slices = tp.size if parallel == "row" else 1
        _check_split(f"input of {in_features} columns", in_features, in_slices, tp.size)
        self.in_features = in_features // in_slices
        self.num_experts = num_experts
        self.has_bias = bias
        self.adds_bias = bias and (parallel != "row" or reduce_output or tp.rank == 0)
        self.weight_shape = (*(() if num_experts is None else (num_experts,)), self.out_features, self.in_features)
        self.set_format(Unquantized(torch.get_default_dtype()))

    def set_format(self, weight_format: WeightFormat) -> None:
        """Replace the parameters with the ones `weight_format` creates (build this on the meta device)."""
        for name in list(self._parameters):
            delattr(self, name)
        self.weight_format = weight_format
        weight_format.create(self)
        self.bias = nn.Parameter(torch.empty(self.weight_shape[:-1], dtype=weight_format.dtype),
                                 requires_grad=False) if self.has_bias else None

    def checkpoint_tensors(self) -> set[tuple[str, str | None]]:
        """(tensor name, part) pairs a checkpoint must hold for this layer."""
        bias = {("bias", part) for part in self.part_rows} if self.has_bias else set()
        return self.weight_format.checkpoint_tensors(self) | bias

    @torch.no_grad()
    def load(self, name: str, part: str | None, tensor: torch.Tensor | CheckpointTensor,
             expert: int | None = None) -> None:
        """Load one checkpoint tensor (the whole, unsharded one, read from the file only as far as this rank's
        shard needs) of one part (and expert). Raises ShapeMismatch when it does not fit."""
        if name == "bias":
            self.copy_rows(self.bias, part, expert, self.shard(tensor, part, in_dim=None))
        else:
            self.weight_format.load(self, name, part, tensor, expert)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [..., in], or (fp8 [T, in], scales [T, 1]) already quantized per token where
        `weight_format.fp8_token_input` says the format takes that (a fused RMSNorm or SiLU-and-mul made it)."""
        if isinstance(x, tuple):
            out, leading = self.weight_format.apply(self, x), x[0].shape[:-1]
        else:
            out, leading = self.weight_format.apply(self, x.reshape(-1, x.shape[-1])), x.shape[:-1]
        if self.parallel == "row" and self.reduce_output:
            out = all_reduce(out)
        if self.adds_bias:
            out = out + self.bias
        return out.view(*leading, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in the compute dtype, whatever its format: references and tests."""
        return self.weight_format.dequantized_weight(self)

    # -- helpers the formats load through ---------------------------------------------------------------
    def checkpoint_shape(self, name: str, part: str | None) -> tuple[int, ...]:
        """The shape of one expert's float checkpoint tensor `name` ("weight" or "bias") of `part`, unsharded."""
        rows = self.checkpoint_parts[part]
        return (rows,) if name == "bias" else (rows, self.checkpoint_in_features)

    def shard(self, tensor: torch.Tensor | CheckpointTensor, part: str | None, out_dim: int | None = 0,
              in_dim: int | None = 1) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor of `part` whose dims `out_dim`/`in_dim` run over output/
        input features (or blocks of them); None where the tensor has no such dim (a per-channel scale has no
        input dim, a per-tensor scale neither). Read from the file only now, so only the slice is read."""
        if self.parallel == "column" and out_dim is not None:
            dim, (slices, index) = out_dim, self.part_slices[part]
        elif self.parallel == "row" and in_dim is not None:
            dim, slices, index = in_dim, self.tp_size, self.tp_rank
        else:
            return read(tensor)
        size = tensor.shape[dim] // slices
        return read(tensor.narrow(dim, index * size, size))

    def rows(self, param: torch.Tensor, part: str | None, expert: int | None, unit: int = 1) -> torch.Tensor:
        """The view of `param` holding `part` (of `expert`); `unit` output rows per param row (block scales)."""
        target = param if expert is None else param[expert]
        start, size = self.part_rows[part]
        return target.narrow(0, start // unit, -(-size // unit))

    def check_rows(self, param: torch.Tensor, part: str | None, expert: int | None, tensor: torch.Tensor,
                   unit: int = 1) -> torch.Tensor:
        target = self.rows(param, part, expert, unit)
        if target.shape != tensor.shape:
            raise ShapeMismatch(f"checkpoint {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        return target

    def copy_rows(self, param: torch.Tensor, part: str | None, expert: int | None, tensor: torch.Tensor,
                  unit: int = 1) -> None:
        self.check_rows(param, part, expert, tensor, unit).copy_(tensor)


def _check_split(what: str, size: int, slices: int, tp_size: int) -> None:
    if size % slices or tp_size % slices:
        raise ValueError(f"tensor parallelism cannot split the {what} into {slices} equal slices for "
                         f"tensor_parallel_size {tp_size}")
