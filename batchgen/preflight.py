"""What a CUDA engine needs, checked when the engine starts: a missing piece then fails there, saying what to
do, instead of at the first kernel launch or as an out-of-memory crash mid-job (where a worker dies on its first
step and its container restarts in a loop).

Triton builds a small C launcher for each kernel the first time it runs, with $CC, else gcc, else clang from
PATH (triton/runtime/build.py), against Python's headers; slim images and bare hosts often lack all three.
"""
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import nn

INSTALL_HINT = ("install a C compiler with the C library and Python headers (Debian/Ubuntu: "
                "apt-get install gcc libc6-dev python3-dev; the python:3.x images have Python's headers already) "
                "or point $CC at one")
PROBE_SOURCE = "#include <Python.h>\nint batchgen_probe(void) { return Py_IsInitialized(); }\n"


def triton_c_compiler() -> str | None:
    """The C compiler Triton will use: $CC, else gcc, else clang on PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def python_include_dir() -> str:
    """Python's header directory as Triton finds it (Debian's posix_local scheme has no headers of its own)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]


def check_triton_can_build(device: torch.device) -> None:
    """On a CUDA device, build a tiny Python extension the way Triton builds its launchers; raise RuntimeError
    naming what is missing if that fails. Other devices run no compiled launcher."""
    if device.type != "cuda":
        return
    compiler = triton_c_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC is unset and neither gcc nor clang is on PATH); Triton needs "
                           f"one to build its kernel launchers the first time a kernel runs: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory() as build_dir:
        source = Path(build_dir, "probe.c")
        source.write_text(PROBE_SOURCE)
        command = [compiler, str(source), "-shared", "-fPIC", f"-I{python_include_dir()}",
                   "-o", str(Path(build_dir, "probe.so"))]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
            failure = result.stderr.strip().splitlines()[-3:] if result.returncode else None
        except OSError as exc:
            failure = [str(exc)]
    if failure is not None:
        raise RuntimeError(f"the C compiler {compiler!r} cannot build a Python extension, which Triton needs for "
                           f"its kernel launchers ({' / '.join(failure) or 'no message'}): {INSTALL_HINT}")


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the model's parameters and buffers take once materialized, from the model as built on the meta
    device: a Linear's parameters in the dtypes its weight format chose, every other parameter in `dtype` (as
    the loader materializes them). Under tensor parallelism the model holds this rank's shard only."""
    from batchgen.models.linear import Linear   # not at the top: the models package imports this module

    total = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    for module in model.modules():
        for param in module.parameters(recurse=False):
            total += param.numel() * (param.element_size() if isinstance(module, Linear) else dtype.itemsize)
    return total


def check_weights_fit(model: nn.Module, device: torch.device, dtype: torch.dtype,
                      free_bytes: int | None = None) -> None:
    """Before any weight is loaded: raise ValueError saying what to do when this rank's weights (the model as
    built on the meta device) need more than the device's free memory (`free_bytes`, default: what CUDA reports
    free now; other devices are not checked)."""
    from batchgen.models.linear import Linear

    if free_bytes is None:
        if device.type != "cuda":
            return
        free_bytes, _ = torch.cuda.mem_get_info(device)
    needed = weight_bytes(model, dtype)
    if needed <= free_bytes:
        return
    size = max((module.tp_size for module in model.modules() if isinstance(module, Linear)), default=1)
    remedies = [f"split it over more GPUs with --tensor-parallel-size {2 * size} (LLM(..., "
                f"tensor_parallel_size={2 * size}))"]
    if not any(param.element_size() == 1 for param in model.parameters()):
        remedies.append("store the weights in fp8 with --quantization fp8 (about half the bytes)")
    raise ValueError(f"the model's weights need {needed / 2**30:.1f} GiB per GPU at tensor-parallel size {size}, "
                     f"but {device} has {free_bytes / 2**30:.1f} GiB free (and the KV cache needs room beside "
                     f"them): {', or '.join(remedies)}")
