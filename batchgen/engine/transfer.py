"""Host-to-device copies that never make the host wait for the device.

A copy from ordinary (pageable) host memory first waits for all the work queued on the device, which would
stall the engine's host work behind the very forward pass it is meant to overlap. From pinned memory the copy
is queued like a kernel.
"""
import numpy as np
import torch


def to_device(data: list | np.ndarray | torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a list, numpy array or CPU tensor) on `device`, with `dtype` if given; queued, not waited for."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    tensor = torch.as_tensor(data, dtype=dtype)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
