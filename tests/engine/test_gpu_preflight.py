"""The engine-start check for what Triton needs to build its kernel launchers, judged against Triton's own build
function on this machine: where Triton's build fails, the check fails with a message that names the fix, and
where Triton builds, the check passes. Runs without a GPU: only the device type decides whether it checks."""
import inspect
import subprocess
import textwrap

import pytest
import torch
from triton.runtime import build as triton_build

from batchgen import LLM
from batchgen.preflight import check_triton_can_build, triton_c_compiler

CUDA = torch.device("cuda")
LAUNCHER_LIKE = textwrap.dedent("""
    #include <Python.h>
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};
    PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&module); }
""")


def forget_found_compiler() -> None:
    """Triton >= 3.7 caches the compiler it found; 3.6 looks it up on every build."""
    if hasattr(triton_build, "_find_compiler"):
        triton_build._find_compiler.cache_clear()


def triton_builds(tmp_path) -> bool:
    """Whether Triton's launcher build (the function a kernel's first launch calls) succeeds here and now."""
    forget_found_compiler()
    source = tmp_path / "probe.c"
    source.write_text(LAUNCHER_LIKE)
    ccflags = [[]] if "ccflags" in inspect.signature(triton_build._build).parameters else []   # newer Triton versions
    try:
        triton_build._build("probe", str(source), str(tmp_path), [], [], [], *ccflags)
        return True
    except (RuntimeError, subprocess.CalledProcessError):   # no compiler found; the compiler failed
        return False
    finally:
        forget_found_compiler()


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """A PATH with no compiler on it (a python:3.x-slim image), $CC unset."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("CC", raising=False)


def test_without_a_compiler_triton_fails_and_the_check_says_what_to_install(tmp_path, no_compiler):
    assert triton_c_compiler() is None
    assert not triton_builds(tmp_path)
    with pytest.raises(RuntimeError, match=r"no C compiler found.*apt-get install gcc libc6-dev"):
        check_triton_can_build(CUDA)
    check_triton_can_build(torch.device("cpu"))   # no compiled launcher there: nothing to check


def test_a_compiler_that_cannot_build_fails_the_check_too(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")   # found, but builds nothing (as gcc without libc6-dev headers)
    assert not triton_builds(tmp_path)
    with pytest.raises(RuntimeError, match=r"'false' cannot build a Python extension.*apt-get install"):
        check_triton_can_build(CUDA)


def test_with_a_compiler_triton_builds_and_the_check_passes(tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    assert triton_c_compiler() is not None, "this machine needs gcc or clang (apt-get install gcc)"
    assert triton_builds(tmp_path)
    check_triton_can_build(CUDA)


def test_an_engine_on_cuda_fails_at_start_without_a_compiler(no_compiler):
    """Before any weight or device is touched, so this runs on a machine without a GPU too."""
    with pytest.raises(RuntimeError, match="no C compiler found"):
        LLM("default", device="cuda")
