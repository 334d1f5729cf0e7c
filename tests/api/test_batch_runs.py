"""Batches that run, through the official `openai` client against a real server, Redis and worker: outputs
checked against the same model run in this process (greedy decoding, so the same text), structured output
against its schema, and the cancel and expiry paths that cut a batch between shards."""
import json

import jsonschema
import pytest

from batchgen import LLM, SamplingParams
from batchgen.sampling_params import StructuredOutput
from batchgen.api.settings import cache_salt_of
from batchgen.workers.app import job_store
from api_harness import KEYS, SHARD_SIZE
from test_requests import chat_line, upload, wait_for

pytestmark = pytest.mark.slow   # a real worker process on the default model, and the model in this process

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
GREEDY = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def reference(worker_process):
    """The default model in this process, loaded while the worker starts. One torch thread: beside the worker
    and the server on two shared cores, more threads only wait on each other (a 4-token chat took 7 s with
    two, 1.6 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM("default", device="cpu")
    torch.set_num_threads(threads)


def completion_line(custom_id: str, prompt: str, model: str = "gpt-4o-mini", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, **body}}


def read_lines(client, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def test_chat_and_completion_batches_round_trip(server, reference, worker):
    client = server.client()
    schema_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    chat = [chat_line("color", "Name a color.", **GREEDY),
            chat_line("json", "Is the sky blue? Answer in JSON.", response_format=schema_format, temperature=0,
                      max_tokens=16),
            chat_line("bad", "Hi", temperature=-1, max_tokens=4),
            chat_line("defaults", "Say hello.", max_tokens=4)]        # sampling: the model's defaults
    prompts = ["The capital of France is", "1, 2, 3,"]
    completions = [completion_line(f"p{i}", prompt, **GREEDY) for i, prompt in enumerate(prompts)]
    chat_batch = client.batches.create(input_file_id=upload(client, chat), endpoint="/v1/chat/completions",
                                       completion_window="24h")
    completion_batch = client.batches.create(input_file_id=upload(client, completions), endpoint="/v1/completions",
                                             completion_window="24h")
    chat_done = wait_for(client, chat_batch.id, {"completed", "failed"}, timeout_s=120)
    completion_done = wait_for(client, completion_batch.id, {"completed", "failed"}, timeout_s=120)
    assert chat_done.status == completion_done.status == "completed", (chat_done.errors, completion_done.errors)

    # chat: three rows answered, the bad one in the error file as OpenAI reports a 400
    assert (chat_done.request_counts.total, chat_done.request_counts.completed, chat_done.request_counts.failed) \
        == (4, 3, 1)
    assert chat_done.model == "default" and chat_done.in_progress_at <= chat_done.completed_at
    salt = job_store().get_spec(chat_batch.id).cache_salt       # the key's own prefix cache, not the key
    assert salt == cache_salt_of(KEYS[0]) != cache_salt_of(KEYS[1]) and KEYS[0] not in salt
    output = {line["custom_id"]: line for line in read_lines(client, chat_done.output_file_id)}
    errors = read_lines(client, chat_done.error_file_id)
    assert list(output) == ["color", "json", "defaults"] and [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400 and "temperature" in \
        errors[0]["response"]["body"]["error"]["message"]
    expected = reference.chat([[{"role": "user", "content": "Name a color."}],
                               [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]],
                              [SamplingParams(**GREEDY), SamplingParams(temperature=0, max_tokens=16,
                                                                        structured=StructuredOutput(json_schema=SCHEMA))])
    for custom_id, reference_output in zip(("color", "json"), expected):
        line = output[custom_id]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"] == reference_output.outputs[0].text
        assert body["usage"] == {"prompt_tokens": reference_output.prompt_tokens,
                                 "completion_tokens": reference_output.completion_tokens,
                                 "total_tokens": reference_output.prompt_tokens + reference_output.completion_tokens}
    jsonschema.validate(json.loads(output["json"]["response"]["body"]["choices"][0]["message"]["content"]), SCHEMA)
    assert output["defaults"]["response"]["body"]["usage"]["completion_tokens"] <= 4
    usage_lines = [line["response"]["body"]["usage"] for line in output.values()]
    assert chat_done.usage.output_tokens == sum(u["completion_tokens"] for u in usage_lines)
    assert chat_done.usage.input_tokens == sum(u["prompt_tokens"] for u in usage_lines)

    # completions, through an alias of the served model
    assert completion_done.model == "gpt-4o-mini" and completion_done.error_file_id is None
    lines = read_lines(client, completion_done.output_file_id)
    for line, prompt, reference_output in zip(lines, prompts, reference.generate(prompts, SamplingParams(**GREEDY))):
        body = line["response"]["body"]
        assert line["custom_id"] == f"p{prompts.index(prompt)}" and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == reference_output.outputs[0].text
        assert body["usage"]["completion_tokens"] == reference_output.completion_tokens
    assert {f.purpose for f in client.files.list() if f.id in (completion_done.output_file_id,
                                                                chat_done.output_file_id)} == {"batch_output"}


def long_batch(client, rows: int = 16) -> str:
    """A batch of several shards that each take a while (every row generates all its tokens)."""
    lines = [chat_line(f"r{i}", f"Count to ten, number {i}.", temperature=0, max_tokens=24, ignore_eos=True)
             for i in range(rows)]
    return client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def wait_for_rows(client, batch_id: str, rows: int):
    import time

    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch_id)).request_counts.completed < rows:
        assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def check_cut_short(client, batch, code: str, rows: int) -> None:
    """Each row once: the finished ones in the output file, the others in the error file with `code`."""
    output = read_lines(client, batch.output_file_id)
    errors = read_lines(client, batch.error_file_id)
    assert len(output) == batch.request_counts.completed >= SHARD_SIZE
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"r{i}" for i in range(rows))
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert errors and all(line["response"] is None and line["error"]["code"] == code for line in errors)
    assert len(output) % SHARD_SIZE == 0      # whole shards, never part of one


def test_cancel_mid_run_keeps_the_finished_rows(server, worker):
    client = server.client()
    batch_id = long_batch(client)
    wait_for_rows(client, batch_id, SHARD_SIZE)
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    cancelled = wait_for(client, batch_id, {"cancelled"}, timeout_s=60)
    assert cancelled.cancelled_at >= cancelled.cancelling_at
    check_cut_short(client, cancelled, "batch_cancelled", 16)


def test_a_batch_past_its_window_expires_with_its_finished_rows(server, worker):
    client = server.client()
    batch_id = long_batch(client)
    running = wait_for_rows(client, batch_id, SHARD_SIZE)
    server.clock.offset += running.expires_at - running.created_at + 1       # a day and a second later
    expired = wait_for(client, batch_id, {"expired"}, timeout_s=60)
    assert expired.expired_at >= expired.expires_at
    check_cut_short(client, expired, "batch_expired", 16)
