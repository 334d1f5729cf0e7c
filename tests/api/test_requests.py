"""What the API answers before any row runs, through the official `openai` client: file validation with the
lines at fault, keys and tenancy, the upload limit, list pages."""
import json
import urllib.error
import urllib.request

import openai
import pytest

from api_harness import KEYS, MAX_UPLOAD_BYTES, free_port


def chat_line(custom_id: str, content: str, model: str = "default", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def upload(client, lines: list) -> str:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    return client.files.create(file=("batch.jsonl", data), purpose="batch").id


def wait_for(client, batch_id: str, statuses: set[str], timeout_s: float = 60):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        time.sleep(0.2)


def test_a_file_the_batch_cannot_run_fails_validation_with_its_lines(server):
    client = server.client()
    file_id = upload(client, [
        chat_line("ok", "Hi"),
        "{not json",
        {**chat_line("wrong-url", "Hi"), "url": "/v1/completions"},
        chat_line("unknown-model", "Hi", model="gpt-unknown"),
        "",
        chat_line("other-model", "Hi", model="gpt-4o-mini"),     # served (an alias) but not the file's model
        {"custom_id": "no-model", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
    ])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"purpose": "test"})
    assert batch.status == "validating" and batch.id.startswith("batch_") and batch.metadata == {"purpose": "test"}
    failed = wait_for(client, batch.id, {"failed", "in_progress", "completed"})
    assert failed.status == "failed" and failed.failed_at >= failed.created_at
    assert [(e.line, e.code, e.param) for e in failed.errors.data] == [
        (2, "invalid_json_line", None), (3, "mismatched_endpoint", "url"), (4, "model_not_found", "body.model"),
        (6, "mismatched_model", "body.model"), (7, "missing_model", "body.model")]
    assert "gpt-unknown" in failed.errors.data[2].message
    assert failed.request_counts.total == 6 and failed.output_file_id is None


def test_keys_and_tenants(server):
    owner, other = server.client(KEYS[0]), server.client(KEYS[1])
    file_id = upload(owner, [chat_line("a", "Hi")])
    with pytest.raises(openai.AuthenticationError) as wrong:
        server.client("sk-not-a-key").files.retrieve(file_id)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as missing:       # no key at all
        urllib.request.urlopen(f"{server.url}/v1/batches")
    assert missing.value.code == 401 and "API key" in json.load(missing.value)["error"]["message"]
    batch = owner.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                 lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
                 lambda: other.files.delete(file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):       # another tenant's file can't be a batch's input either
        other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in [b.id for b in other.batches.list()]
    assert file_id not in [f.id for f in other.files.list()]
    assert owner.files.retrieve(file_id).bytes == len(json.dumps(chat_line("a", "Hi"))) + 1
    owner.batches.cancel(batch.id)


def test_an_upload_over_the_limit_is_refused_with_the_limit_named(server):
    client = server.client()
    before = {f.id for f in client.files.list()}
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("big.jsonl", b"x" * (MAX_UPLOAD_BYTES * 3)), purpose="batch")
    assert refused.value.status_code == 413 and f"{MAX_UPLOAD_BYTES:,} bytes" in refused.value.message
    # just over the limit: the body passes the declared-size check, the copy stops at the limit
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("big.jsonl", b"x" * (MAX_UPLOAD_BYTES + 1)), purpose="batch")
    assert refused.value.status_code == 413 and refused.value.code == "file_too_large"
    assert {f.id for f in client.files.list()} == before
    exact = client.files.create(file=("fits.jsonl", b"x" * MAX_UPLOAD_BYTES), purpose="batch")
    assert exact.bytes == MAX_UPLOAD_BYTES and client.files.content(exact.id).content == b"x" * MAX_UPLOAD_BYTES
    assert client.files.delete(exact.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(exact.id)


def test_list_pages(server):
    client = server.client(KEYS[1])
    file_id = upload(client, ["{broken"])
    created = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(5)]
    newest_first = created[::-1]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == newest_first[2:4] and second.has_more
    third = client.batches.list(limit=2, after=second.data[-1].id)
    assert [b.id for b in third.data] == newest_first[4:] and not third.has_more
    assert [b.id for b in client.batches.list(limit=2)] == newest_first     # the client follows the pages
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                              metadata={f"k{i}": "v" for i in range(17)})
    assert refused.value.param == "metadata"


def test_serve_command(tmp_path):
    """`batchgen serve` as a user starts it: refuses to start without keys, then answers the openai client."""
    import os
    import subprocess
    import sys
    import time

    import openai


    command = [sys.executable, "-m", "batchgen.cli", "serve", "--port", str(free_port())]
    env = {**os.environ, "BATCHGEN_API_STORAGE": str(tmp_path)}
    env.pop("BATCHGEN_API_KEYS", None)
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "BATCHGEN_API_KEYS" in refused.stderr
    keys_file = tmp_path / "keys"
    keys_file.write_text("# the team's key\nsk-from-file\n")
    server = subprocess.Popen(command, env={**env, "BATCHGEN_API_KEYS_FILE": str(keys_file)})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{command[-1]}/v1", api_key="sk-from-file", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                file = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert (tmp_path / "files" / file.id).read_bytes() == b"{}\n"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_file_over_the_requests_limit_fails_at_the_first_line_past_it(server, monkeypatch):
    import dataclasses

    batches = server.app.state.batches
    monkeypatch.setattr(batches, "settings", dataclasses.replace(batches.settings, max_requests=3))
    client = server.client()
    file_id = upload(client, [chat_line(f"r{i}", "Hi") for i in range(5)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(client, batch.id, {"failed", "in_progress"})
    assert failed.status == "failed"
    assert [(e.line, e.code) for e in failed.errors.data] == [(4, "too_many_requests")]
    assert "3 requests" in failed.errors.data[0].message


def test_a_batch_left_validating_is_taken_up_by_the_refresh_loop(server):
    """As after a server stopped between answering the create request and validating: nothing but the
    loop knows about the batch."""
    from batchgen.api.settings import cache_salt_of, tenant_of

    client = server.client()
    file_id = upload(client, [chat_line("a", "Hi", model="gpt-unknown")])
    batch = server.app.state.batches.create(tenant_of(KEYS[0]), cache_salt_of(KEYS[0]), file_id,
                                            "/v1/chat/completions", "24h", None)
    failed = wait_for(client, batch.id, {"failed", "in_progress"}, timeout_s=10)
    assert failed.status == "failed" and [(e.line, e.code) for e in failed.errors.data] == [(1, "model_not_found")]



def test_no_client_string_becomes_a_path(server):
    from pathlib import Path

    client = server.client()
    storage = Path(server.app.state.settings.storage)
    before = set(storage.rglob("*"))
    uploaded = client.files.create(file=("../../escape.jsonl", b"{}\n"), purpose="batch")
    assert uploaded.filename == "../../escape.jsonl"
    assert set(storage.rglob("*")) - before == {storage / "files" / uploaded.id}
    for probe in ("..%2F..%2Fetc%2Fpasswd", "..", f"{uploaded.id}%2F.."):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/files/{probe}/content",
                                                          headers={"Authorization": f"Bearer {KEYS[0]}"}))
        assert answer.value.code == 404
