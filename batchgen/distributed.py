"""Tensor-parallel state and the two collectives the sharded layers need.

One process per rank; `init_tensor_parallel` joins them in a process group (gloo on the CPU, so CI can run
two ranks; NCCL on CUDA) and records this rank's place, which every layer reads once, when it is built, to
decide which slice of its weights it owns. Rank 0 of size 1 (never initialised) is the single-GPU model.

NVLink multicast stays off in every process: on the hosts batchgen runs on, a multicast object (NCCL's NVLS
algorithms, PyTorch's symmetric-memory / multimem all-reduce, NVSHMEM) can take the GPUs out of service for
everyone. So `disable_multicast` sets the three switches before any process group exists, and the collectives
here are plain NCCL all-reduce / all-gather, never symmetric memory.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import distributed as dist

MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    """Turn NVLink multicast off for this process and the processes it starts (call before any NCCL use)."""
    os.environ.update(MULTICAST_OFF_ENV)


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among `size` ranks, and the process group their collectives run in (None at size 1)."""
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


_state = TensorParallel()


def tensor_parallel() -> TensorParallel:
    """The current state: rank 0 of size 1 unless `init_tensor_parallel` ran in this process."""
    return _state


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """Join the `size` ranks at `init_method` (e.g. "tcp://127.0.0.1:29500") as `rank`; collectives that wait
    longer than `timeout_s` raise instead of hanging. Layers built afterwards own this rank's shard."""
    global _state
    disable_multicast()
    if size == 1:
        _state = TensorParallel()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    _state = TensorParallel(rank, size, dist.group.WORLD)


def close_tensor_parallel() -> None:
    """Leave the process group (if any) and return to size 1."""
    global _state
    if _state.group is not None:
        dist.destroy_process_group()
    _state = TensorParallel()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's `x` (in place when x is contiguous); x itself at size 1."""
    if _state.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=_state.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order; x itself at size 1."""
    if _state.size == 1:
        return x
    gathered = torch.empty((_state.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(gathered, x.contiguous(), group=_state.group)   # rank blocks along dim 0
    dim %= x.dim()
    if dim == 0:
        return gathered
    return gathered.view(_state.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)
