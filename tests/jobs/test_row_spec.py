"""Row parsing: each accepted spelling gives the SamplingParams the engine would get from the same values
written directly, and each problem becomes the row's error naming file, line and field. Fuzzed: nothing
escapes the parser."""
import json
import string

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from batchgen import SamplingParams, StructuredOutput
from batchgen.jobs.paths import redact_url
from batchgen.jobs.rows import (ROW_SAMPLING_ALIASES, ROW_SAMPLING_FIELDS, PromptRow, RowParser,
                                structured_from_response_format)
from batchgen.jobs.spec import JobSpec, template_placeholders

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def parser(fmt="jsonl", **fields) -> RowParser:
    return RowParser(JobSpec(input="/data/in.jsonl", output="/data/out", **fields), fmt)


def parse(raw: dict, fmt="jsonl", **fields) -> PromptRow:
    return parser(fmt, **fields).parse(raw, 6, 7)


def test_plain_row_overrides_equal_direct_sampling_params():
    raw = {"id": "a", "prompt": "Hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "stop": "x",
           "seed": 7, "n": 2, "logprobs": 2, "presence_penalty": 0.5}
    row = parse(raw, sampling={"max_tokens": 64, "temperature": 0.0, "min_p": 0.1})
    expected = SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9, top_k=3, stop=["x"], seed=7, n=2,
                              logprobs=2, presence_penalty=0.5, min_p=0.1)
    assert row.error is None and row.params == expected
    assert (row.id, row.prompt, row.messages, row.index) == ("a", "Hi", None, 6)


def test_defaults_apply_and_are_shared_between_rows():
    p = parser(sampling={"temperature": 0.0})
    first, second = p.parse({"prompt": "a"}, 0, 1), p.parse({"prompt": "b"}, 1, 2)
    assert first.params == SamplingParams(max_tokens=256, temperature=0.0)
    assert first.params is second.params
    assert (first.id, second.id) == ("0", "1")      # no id: the input index


def test_openai_chat_body_maps_to_sampling_params():
    raw = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "gpt-4o", "messages": [{"role": "developer", "content": "Be brief."},
                                                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                    "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 3, "seed": 1,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}}
    row = parse(raw, "openai")
    assert row.error is None
    assert row.id == "req-1" and row.requested_model == "gpt-4o" and row.is_chat
    assert row.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert row.params == SamplingParams(max_tokens=9, logprobs=3, seed=1,
                                        structured=StructuredOutput(json_schema=PERSON))


def test_openai_completion_line():
    raw = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
           "body": {"model": "m", "prompt": "Once", "max_tokens": 4, "logprobs": 2, "stop": ["\n"]}}
    row = parse(raw, "openai")
    assert row.error is None and row.prompt == "Once" and not row.is_chat
    assert row.params == SamplingParams(max_tokens=4, logprobs=2, stop=["\n"])


def test_template_system_prompt_and_chat():
    row = parse({"text": "long doc", "n_words": 12}, template="Summarize in {n_words} words: {text}",
                system_prompt="You summarize.")
    assert row.error is None and row.prompt is None
    assert row.messages == [{"role": "system", "content": "You summarize."},
                            {"role": "user", "content": "Summarize in 12 words: long doc"}]
    assert parse({"prompt": "x"}, as_chat=True).messages == [{"role": "user", "content": "x"}]
    kept = parse({"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]},
                 system_prompt="job")
    assert kept.messages[0] == {"role": "system", "content": "own"}    # a row's own system message wins


def test_response_format_shapes():
    assert structured_from_response_format({"type": "json_object"}) == StructuredOutput(json_object=True)
    assert structured_from_response_format({"type": "text"}) is None
    as_text = json.dumps({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert structured_from_response_format(as_text) == StructuredOutput(json_schema=PERSON)
    # a row's {"type": "text"} lifts the job-wide constraint
    row = parse({"prompt": "x", "response_format": {"type": "text"}}, structured={"json_object": True})
    assert row.params.structured is None
    job_wide = parse({"prompt": "x"}, structured={"json_object": True})
    assert job_wide.params.structured == StructuredOutput(json_object=True)


BAD_ROWS = [
    ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens 0 is for scoring prompts"),
    ({"prompt": "x", "max_completion_tokens": 0}, "max_completion_tokens", "max_tokens 0 is for scoring"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ({"prompt": "x", "stop": 5}, "stop", "valid list"),
    ({"prompt": "x", "seed": 2 ** 70}, "seed", "64-bit"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature", "finite"),
    ({"prompt": "x", "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"prompt": "x", "min_tokens": 999}, "sampling parameters", "must not exceed max_tokens"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": "   "}, "prompt", "empty prompt"),
    ({"text": "no prompt here"}, "prompt", "missing"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt", "not both"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "y"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content",
     "has an image (image_url content part): batchgen runs text only"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content", "text"),
    ({"id": ["a"], "prompt": "x"}, "id", "string or an integer"),
    ({"id": "", "prompt": "x"}, "id", "must not be empty"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format", "invalid JSON schema"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"minLength": -1}}}},
     "response_format", "invalid JSON schema"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format", "type must be"),
    ({"prompt": "x", "response_format": "not json"}, "response_format", "JSON text"),
]


@pytest.mark.parametrize(("raw", "field", "message"), BAD_ROWS)
def test_bad_row_is_an_error_naming_file_line_and_field(raw, field, message):
    row = parse(raw)
    assert row.params is None and row.prompt is None and row.messages is None
    assert row.error.startswith(f"/data/in.jsonl: line 7: field '{field}': "), row.error
    assert message in row.error


def test_error_rows_keep_their_id_and_kept_columns():
    row = parse({"id": "keep-me", "prompt": "x", "temperature": -1, "source": "s"}, keep_columns=["source"])
    assert (row.id, row.columns, row.index) == ("keep-me", {"source": "s"}, 6)


BAD_OPENAI = [
    ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}, "custom_id", "missing"),
    ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}, "method", "POST"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}, "url", "must be one of"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": []}, "body", "object"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"prompt": "x"}},
     "body.messages", "missing"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": -2}},
     "body.temperature", "greater than or equal to 0"),
]


@pytest.mark.parametrize(("raw", "field", "message"), BAD_OPENAI)
def test_bad_openai_line(raw, field, message):
    row = parse(raw, "openai")
    assert row.error.startswith(f"/data/in.jsonl: line 7: field '{field}': "), row.error
    assert message in row.error


BAD_LINES = [
    (b'{"prompt": "x",', "malformed JSON"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
    (b'["prompt", "x"]', "expected a JSON object, got an array"),
    (b'"just a string"', "expected a JSON object, got a string"),
    (b'{"prompt": "x", "n": 1' + b'0' * 5000 + b'}', "malformed JSON"),     # int beyond Python's limit
    (b'[' * 100_000 + b']' * 100_000, "malformed JSON"),
    (b'{"prompt": "bad \\ud800 half"}', "unpaired UTF-16 surrogate"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_is_an_error_naming_file_and_line(line, message):
    row = parser().parse_line(line, 3, 4)
    assert row.error.startswith("/data/in.jsonl: line 4: ") and message in row.error, row.error
    assert row.id == "3"


def test_unknown_fields_are_reported_and_ignored():
    row = parse({"prompt": "x", "colour": "red", "max_tokens": 3})
    assert row.error is None and row.unknown_fields == ("colour",)
    assert row.params == SamplingParams(max_tokens=3)
    openai = parse({"custom_id": "a", "method": "POST", "url": "/v1/completions", "extra": 1,
                    "body": {"prompt": "x", "user": "u"}}, "openai")
    assert openai.error is None and set(openai.unknown_fields) == {"extra", "body.user"}


def test_job_spec_refuses_bad_values():
    with pytest.raises(ValidationError, match="placeholder"):
        JobSpec(input="a", output="b", template="{text.__class__}")
    with pytest.raises(ValidationError, match="placeholder"):
        JobSpec(input="a", output="b", template="{0}")
    with pytest.raises(ValidationError, match="shadow"):
        JobSpec(input="a", output="b", keep_columns=["text"])
    with pytest.raises(ValidationError, match="temperature"):
        JobSpec(input="a", output="b", sampling={"temperature": -1})
    with pytest.raises(ValidationError, match="invalid JSON schema"):
        JobSpec(input="a", output="b", structured={"json_schema": {"type": 12}})
    assert template_placeholders("Q: {question} A: {{literal}} {answer}") == ["question", "answer"]
    spec = JobSpec(input="a", output="b")
    assert spec.sampling == {} and spec.effective_sampling() == (
        {"max_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0},
        dict.fromkeys(["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"], "default"))


def test_redact_url_hides_passwords():
    assert redact_url("redis://:s3cret@host:6380/1") == "redis://:***@host:6380/1"
    assert redact_url("rediss://user:s3cret@host/0") == "rediss://user:***@host/0"
    assert redact_url("s3://AKIA:topsecret@bucket/path") == "s3://AKIA:***@bucket/path"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("s3://bucket/p?region=eu&secret_key=abc&access_key=AK") == \
        "s3://bucket/p?region=eu&secret_key=***&access_key=***"
    assert redact_url("/local/path.jsonl") == "/local/path.jsonl"
    spec = JobSpec(input="s3://k:s3cret@b/in.jsonl", output="o")
    assert "s3cret" not in spec.input_display and "s3cret" not in repr(spec) and "s3cret" not in str(spec)


# -- fuzzing: no exception escapes, and every accepted row is a complete request ---------------------------

FIELD_NAMES = sorted(ROW_SAMPLING_FIELDS | ROW_SAMPLING_ALIASES | {"id", "prompt", "messages", "model", "source"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["role", "content", "type", "text", "schema", "json_schema", "name"])
                    | st.text(max_size=5), inner, max_size=4)), max_leaves=12)
rows = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(string.ascii_letters, max_size=6), json_values,
                       max_size=8)
openai_rows = st.fixed_dictionaries(
    {"custom_id": st.one_of(st.text(max_size=5), st.integers()), "method": st.sampled_from(["POST", "GET"]),
     "url": st.sampled_from(["/v1/chat/completions", "/v1/completions", "/x"]), "body": rows | json_values})
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLAIN, OPENAI = parser(keep_columns=["source"]), parser("openai")


def _check(row: PromptRow) -> None:
    assert isinstance(row, PromptRow) and isinstance(row.id, str)
    if row.error is not None:
        assert "internal error" not in row.error, row.error
        assert row.error.startswith("/data/in.jsonl: line ")
        row.error.encode("utf-8")     # storable in Parquet
    else:
        assert isinstance(row.params, SamplingParams)
        assert (row.prompt is None) != (row.messages is None)
        assert (row.prompt or "").strip() or any(m["content"].strip() for m in row.messages)
        if row.params.structured is not None and row.params.structured.json_schema is not None:
            jsonschema.validators.validator_for(row.params.structured.json_schema).check_schema(
                row.params.structured.json_schema)


@FUZZ
@given(rows)
def test_fuzz_plain_rows(raw):
    _check(PLAIN.parse(raw, 0, 1))


@FUZZ
@given(openai_rows)
def test_fuzz_openai_rows(raw):
    _check(OPENAI.parse(raw, 0, 1))


@FUZZ
@given(st.one_of(st.binary(max_size=200), rows.map(lambda r: json.dumps(r).encode()),
                 st.tuples(rows, st.binary(max_size=3)).map(lambda t: json.dumps(t[0]).encode()[:-1] + t[1])))
def test_fuzz_lines(line):
    _check(PLAIN.parse_line(line, 0, 1))
