"""What a CUDA engine needs beside Python packages, checked when the engine starts: a missing piece then fails
there, saying what to install, instead of at the first kernel launch (where a worker dies on its first step and
its container restarts in a loop).

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
