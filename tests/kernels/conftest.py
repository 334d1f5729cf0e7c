"""Kernel tests compare each Triton launcher with its torch reference (TRITON_INTERPRET=1 without a GPU)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every torch.empty (the launchers' outputs and scratch) comes back filled with NaN (or -1 for integers),
    so an element a kernel forgets to write fails the comparison instead of passing on lucky memory."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)
