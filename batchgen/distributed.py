"""Tensor-parallel process state and collectives (the contract's API; the tp-model branch owns the full version).

Every rank of one engine is one process; the process group spans exactly those ranks (gloo on CPU, NCCL on CUDA).
Layers read `tensor_parallel()` when they are built, so it is set before the model is loaded.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# NVLink multicast can take a host's GPUs out of service: off in every process a tensor-parallel engine starts
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    os.environ.update(MULTICAST_OFF_ENV)


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int


_state = TensorParallel(rank=0, size=1)


def tensor_parallel() -> TensorParallel:
    """This process's rank and the group size; rank 0 of 1 when never initialised."""
    return _state


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """Join the group of `size` ranks that meet at `init_method`; a collective that waits longer than
    `timeout_s` raises instead of hanging."""
    global _state
    disable_multicast()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)
    _state = TensorParallel(rank=rank, size=size)


def close_tensor_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = TensorParallel(rank=0, size=1)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
