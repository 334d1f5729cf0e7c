"""The Celery app's contract (JSON only, late acks, queues per model, credentials kept out of sight) and the CLI's
commands."""
import re
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgen.cli import main
from batchgen.workers.app import make_app, queue_name


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


@pytest.mark.parametrize("command", ["run", "submit", "status", "wait", "cancel", "resume", "list", "results",
                                     "worker", "beat", "bench"])
def test_every_command_has_help(command):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage: main " + command in result.output.replace("batchgen", "main")
