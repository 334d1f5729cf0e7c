"""Checkpoint tensors that are read only where a layer needs them, so a tensor-parallel rank reads its slice
from the safetensors file and never the whole tensor.

The loader hands the model `CheckpointTensor`s. Layers pick their region with the two tensor operations that
both torch tensors and checkpoint tensors have, `narrow(dim, start, length)` and `[index]` (one expert of a
stacked tensor), and `read` it where they copy it: only that region leaves the file. Torch tensors (pickled
checkpoints, dummy weights, a state dict handed to `load_weights`) take the same path, already in memory.
"""
import copy

import torch


class CheckpointTensor:
    """A region of one safetensors tensor, not read yet: all of it until narrowed."""

    def __init__(self, checkpoint, name: str):
        """checkpoint: an open `safetensors.safe_open` handle, which must stay open until the region is read."""
        self.name = name
        self.stored = checkpoint.get_slice(name)   # the tensor's place in the file; nothing read yet
        # per dim of the stored tensor: the range still selected, or the one index chosen (a dim dropped)
        self.index: tuple[slice | int, ...] = tuple(slice(0, size) for size in self.stored.get_shape())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(dim.stop - dim.start for dim in self.index if isinstance(dim, slice))

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int) -> "CheckpointTensor":
        kept = self._kept_dims()[dim]
        selected = self.index[kept]
        if start < 0 or length < 0 or selected.start + start + length > selected.stop:
            raise IndexError(f"{self.name}: narrow({dim}, {start}, {length}) outside shape {tuple(self.shape)}")
        return self._with(kept, slice(selected.start + start, selected.start + start + length))

    def __getitem__(self, index: int) -> "CheckpointTensor":
        kept = self._kept_dims()[0]
        selected = self.index[kept]
        if not 0 <= index < selected.stop - selected.start:
            raise IndexError(f"{self.name}: index {index} outside shape {tuple(self.shape)}")
        return self._with(kept, selected.start + index)

    def read(self) -> torch.Tensor:
        """The selected region, read from the file (only its bytes)."""
        return self.stored[self.index]

    def _kept_dims(self) -> list[int]:
        return [dim for dim, selected in enumerate(self.index) if isinstance(selected, slice)]

    def _with(self, dim: int, selected: slice | int) -> "CheckpointTensor":
        narrowed = copy.copy(self)
        narrowed.index = self.index[:dim] + (selected,) + self.index[dim + 1:]
        return narrowed


def read(tensor: torch.Tensor | CheckpointTensor) -> torch.Tensor:
    """A tensor in memory: a checkpoint tensor's region read from its file, a torch tensor as it is."""
    return tensor.read() if isinstance(tensor, CheckpointTensor) else tensor
