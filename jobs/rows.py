"""What a row may contain: the one place that turns a user's input row into an engine request.

A row never raises. Every problem with one row (bad JSON, wrong types, invalid parameter values, a bad
schema) becomes `PromptRow.error`, naming the file, the row and the field, so one bad line costs that line
and nothing else. Whole-file problems are the readers' business (`batchgen.jobs.errors.JobInputError`).
"""
import json
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from batchgen.engine import grammar
from batchgen.jobs.spec import InputFormat, JobSpec, check_json_schema, template_placeholders
from batchgen.sampling_params import SamplingParams, StructuredOutput

OPENAI_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
OPENAI_LINE_FIELDS = frozenset({"custom_id", "method", "url", "body"})
# Per-row sampling overrides: every SamplingParams field, except `structured`, which rows spell the
# OpenAI way (`response_format`). OpenAI names that map onto them are listed beside.
ROW_SAMPLING_FIELDS = frozenset(SamplingParams.model_fields) - {"structured"}
ROW_SAMPLING_ALIASES = frozenset({"max_completion_tokens", "top_logprobs", "response_format"})
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_INT64_LIMIT = 2 ** 63
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_PARAMS_CACHE_SIZE = 4096


def structured_from_response_format(value: Any) -> StructuredOutput | None:
    """OpenAI `response_format` -> StructuredOutput. {"type": "text"} is an explicit "no constraint".
    Raises ValueError naming what is wrong; the schema itself is checked against its JSON Schema draft."""
    if isinstance(value, str):
        try:   # Parquet users store it as JSON text
            value = json.loads(value)
        except ValueError:
            raise ValueError("must be an object or JSON text") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, got {_type_name(value)}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"type must be 'json_schema', 'json_object' or 'text', got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("json_schema must be an object with a 'schema'")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema.schema must be an object, got {_type_name(schema)}")
    try:
        schema_json = json.dumps(schema, sort_keys=True, allow_nan=False)
    except ValueError:
        raise ValueError("json_schema.schema must not contain NaN or Infinity") from None
    check_json_schema(schema_json)
    constraint = StructuredOutput(json_schema=schema)
    grammar.validate(constraint)
    return constraint


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One input row made ready for the engine: a prompt or chat messages plus validated parameters, or
    an error saying why not. `index` is the 0-based input position (the output order)."""
    index: int
    id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams | None = None
    columns: dict[str, Any] = field(default_factory=dict)     # kept input columns
    error: str | None = None
    unknown_fields: tuple[str, ...] = ()
    requested_model: str | None = None                       # noted; the job's model serves every row
    sampling_fields: tuple[str, ...] = ()                    # sampling fields the row sets itself

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class _RowError(Exception):
    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field_name = field_name
        self.message = message


class RowParser:
    """Turns raw rows of one input into PromptRows. Built once per reader (it precomputes what the job
    allows); `parse`/`parse_line` never raise."""

    def __init__(self, spec: JobSpec, input_format: InputFormat, duplicate_rows: frozenset[int] = frozenset()):
        self.spec = spec
        self.openai = input_format == "openai"
        self.source = spec.input_display
        self.unit = "row" if input_format == "parquet" else "line"
        self.duplicate_rows = duplicate_rows
        self.placeholders = template_placeholders(spec.template) if spec.template else []
        self.template_parts = list(string.Formatter().parse(spec.template)) if spec.template else []
        self.default_sampling = {**spec.effective_sampling()[0], "structured": spec.structured}
        self.default_params = SamplingParams.model_validate(self.default_sampling, strict=True)
        # Rows repeat the same few overrides (max_tokens=1 on every line): validate each combination once.
        self.params_cache: dict[tuple, SamplingParams] = {}
        sampling = ROW_SAMPLING_FIELDS | ROW_SAMPLING_ALIASES | {"model"}
        self.known_fields = sampling | set(spec.keep_columns) | (
            {"messages", "prompt"} if self.openai else
            {spec.id_column, spec.prompt_column, spec.messages_column, *self.placeholders})

    def read_columns(self, available: list[str]) -> list[str]:
        """The columns of a table that rows may use (the rest are unknown, warned once and never read)."""
        return [name for name in available if name in self.known_fields]

    # -- entry points --------------------------------------------------------------------------------
    def parse_line(self, line: bytes, index: int, line_no: int) -> PromptRow:
        """One JSONL line (bytes as read, newline included or not)."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = line[exc.start:exc.start + 1]
            return self.failed(None, index, line_no, None, f"not valid UTF-8 (byte {exc.start + 1} is {bad!r})")
        if line_no == 1 and text.startswith("\ufeff"):
            text = text[1:]
        try:
            raw = json.loads(text)
        except RecursionError:
            return self.failed(None, index, line_no, None, "malformed JSON: nested too deeply")
        except json.JSONDecodeError as exc:
            return self.failed(None, index, line_no, None, f"malformed JSON: {exc.msg} (character {exc.pos + 1})")
        except ValueError as exc:   # e.g. an integer too long to convert
            return self.failed(None, index, line_no, None, f"malformed JSON: {exc}")
        if not isinstance(raw, dict):
            return self.failed(None, index, line_no, None, f"expected a JSON object, got {_type_name(raw)}")
        if _SURROGATE_ESCAPE.search(text):
            broken = _field_with_lone_surrogate(raw)
            if broken is not None:   # such text can't be stored or tokenized: keep none of this row
                return self.failed(None, index, line_no, broken, "contains an unpaired UTF-16 surrogate escape")
        return self.parse(raw, index, line_no)

    def parse(self, raw: dict[str, Any], index: int, position: int) -> PromptRow:
        """A decoded row (JSON object or Parquet row as a dict). `position` is the 1-based line / row
        number used in messages."""
        try:
            return self._parse(raw, index, position)
        except _RowError as exc:
            return self.failed(raw, index, position, exc.field_name, exc.message)
        except Exception as exc:  # the reader must survive any row; this names the bug instead of crashing
            return self.failed(raw, index, position, None, f"internal error: {type(exc).__name__}: {exc}")

    # -- the rules -----------------------------------------------------------------------------------
    def _parse(self, raw: dict[str, Any], index: int, position: int) -> PromptRow:
        if self.openai:
            fields, prefix, endpoint = self._openai_body(raw)
            id_field = "custom_id"
            row_id = _row_id(raw.get("custom_id"), index, "custom_id", required=True)
            unknown = [f for f in raw if f not in OPENAI_LINE_FIELDS and f not in self.spec.keep_columns]
        else:
            fields, prefix, endpoint = raw, "", None
            id_field = self.spec.id_column
            row_id = _row_id(raw.get(id_field), index, id_field, required=False)
            unknown = []
        unknown += [prefix + f for f in fields if f not in self.known_fields]
        if index in self.duplicate_rows:
            raise _RowError(id_field, f"duplicate id {row_id!r}: an earlier row already has it")

        prompt, messages = self._prompt(fields, prefix, endpoint)
        if messages is None and (self.spec.as_chat or self.spec.system_prompt):
            messages, prompt = [{"role": "user", "content": prompt}], None
        if messages is not None and self.spec.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.spec.system_prompt}, *messages]

        model = fields.get("model")
        params, sampling_fields = self._params(fields, prefix)
        return PromptRow(index=index, id=row_id, prompt=prompt, messages=messages,
                         params=params, sampling_fields=sampling_fields, columns=self._kept(raw, fields),
                         unknown_fields=tuple(unknown), requested_model=model if isinstance(model, str) else None)

    def _openai_body(self, raw: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
        missing = [f for f in ("custom_id", "method", "url", "body") if f not in raw]
        if missing:
            raise _RowError(missing[0], "missing (OpenAI batch lines need custom_id, method, url, body)")
        if raw["method"] != "POST":
            raise _RowError("method", f"must be 'POST', got {_short(raw['method'])}")
        endpoint = OPENAI_ENDPOINTS.get(raw["url"]) if isinstance(raw["url"], str) else None
        if endpoint is None:
            raise _RowError("url", f"must be one of {sorted(OPENAI_ENDPOINTS)}, got {_short(raw['url'])}")
        if not isinstance(raw["body"], dict):
            raise _RowError("body", f"must be an object, got {_type_name(raw['body'])}")
        return raw["body"], "body.", endpoint

    def _prompt(self, fields: dict[str, Any], prefix: str, endpoint: str | None
                ) -> tuple[str | None, list[dict[str, str]] | None]:
        if self.template_parts:
            return self._render_template(fields), None
        if endpoint is not None:
            prompt_field, messages_field = ("prompt", None) if endpoint == "completion" else (None, "messages")
        else:
            prompt_field, messages_field = self.spec.prompt_column, self.spec.messages_column
        prompt = fields.get(prompt_field) if prompt_field else None
        messages = fields.get(messages_field) if messages_field else None
        if prompt is not None and messages is not None:
            raise _RowError(prefix + prompt_field, f"give '{prompt_field}' or '{messages_field}', not both")
        if messages is not None:
            return None, _messages(messages, prefix + messages_field)
        if prompt is None:
            wanted = " or ".join(repr(f) for f in (prompt_field, messages_field) if f)
            raise _RowError(prefix + (prompt_field or messages_field), f"missing: the row needs {wanted}")
        if not isinstance(prompt, str):
            raise _RowError(prefix + prompt_field, f"must be a string, got {_type_name(prompt)}")
        if not prompt.strip():
            raise _RowError(prefix + prompt_field, "empty prompt")
        return prompt, None

    def _render_template(self, fields: dict[str, Any]) -> str:
        pieces = []
        for literal, name, _, _ in self.template_parts:
            pieces.append(literal)
            if name is None:
                continue
            value = fields.get(name)
            if value is None:
                raise _RowError(name, "missing (the template needs it)")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _RowError(name, f"must be text or a number for the template, got {_type_name(value)}")
            pieces.append(value if isinstance(value, str) else str(value))
        prompt = "".join(pieces)
        if not prompt.strip():
            raise _RowError(self.placeholders[0], "empty prompt after the template")
        return prompt

    def _params(self, fields: dict[str, Any], prefix: str) -> tuple[SamplingParams, tuple[str, ...]]:
        """The row's params, and the sampling fields it sets itself."""
        overrides: dict[str, Any] = {}
        source: dict[str, str] = {}      # sampling name -> the row's own field name, for messages
        for name, value in fields.items():
            if value is not None and name in ROW_SAMPLING_FIELDS and name != "logprobs":
                overrides[name], source[name] = value, name
        _logprobs(fields, prefix, overrides, source)
        if fields.get("max_completion_tokens") is not None:
            if "max_tokens" in overrides and overrides["max_tokens"] != fields["max_completion_tokens"]:
                raise _RowError(prefix + "max_completion_tokens", "conflicts with max_tokens; give one")
            overrides["max_tokens"], source["max_tokens"] = fields["max_completion_tokens"], "max_completion_tokens"
        if fields.get("response_format") is not None:
            try:
                overrides["structured"] = structured_from_response_format(fields["response_format"])
            except ValueError as exc:
                raise _RowError(prefix + "response_format", str(exc)) from None
            source["structured"] = "response_format"
        if not overrides:
            return self.default_params, ()
        for name, value in overrides.items():
            problem = _out_of_range_number(value)
            if problem:
                raise _RowError(prefix + source[name], problem)
        key = _params_key(overrides)
        if key in self.params_cache:
            return self.params_cache[key], tuple(overrides)
        try:
            params = SamplingParams.model_validate({**self.default_sampling, **overrides}, strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            loc = error["loc"]
            name = str(loc[0]) if loc else None
            where = prefix + source.get(name, name) if name else "sampling parameters"
            message = error["msg"].removeprefix("Value error, ")
            if loc and name in overrides:
                message += f" (got {_short(overrides[name])})"
            raise _RowError(where, message) from None
        if key is not None and len(self.params_cache) < _PARAMS_CACHE_SIZE:
            self.params_cache[key] = params
        return params, tuple(overrides)

    def _kept(self, raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        return {name: raw[name] if name in raw else fields.get(name) for name in self.spec.keep_columns}

    def failed(self, raw: dict[str, Any] | None, index: int, position: int, field_name: str | None,
               message: str) -> PromptRow:
        """The row as an error naming file, row and field; keeps its id and kept columns where it has them."""
        where = f"{self.source}: {self.unit} {position}"
        if field_name is not None:
            where += f": field '{field_name}'"
        row_id, columns = str(index), {}
        if raw is not None:
            id_value = raw.get("custom_id" if self.openai else self.spec.id_column)
            if isinstance(id_value, str) and id_value or isinstance(id_value, int) and not isinstance(id_value, bool):
                row_id = str(id_value)
            fields = raw.get("body") if self.openai and isinstance(raw.get("body"), dict) else raw
            columns = self._kept(raw, fields)
        return PromptRow(index=index, id=row_id, columns=columns, error=f"{where}: {message}")


def _row_id(value: Any, index: int, field_name: str, required: bool) -> str:
    if value is None:
        if required:
            raise _RowError(field_name, "missing")
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(field_name, f"must be a string or an integer, got {_type_name(value)}")
    if value == "":
        raise _RowError(field_name, "must not be empty")
    return str(value)


def _messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _RowError(field_name, "must be a non-empty list of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise _RowError(where, f"must be an object with role and content, got {_type_name(message)}")
        role = CHAT_ROLES.get(message.get("role")) if isinstance(message.get("role"), str) else None
        if role is None:
            raise _RowError(f"{where}.role", f"must be one of {sorted(CHAT_ROLES)}, got {_short(message.get('role'))}")
        messages.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    if not any(m["content"].strip() for m in messages):
        raise _RowError(field_name, "every message is empty")
    return messages


def _content(value: Any, field_name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):   # OpenAI content parts; only text parts can be served
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
                raise _RowError(field_name, f"has an image ({part['type']} content part): batchgen runs text only "
                                "(a multimodal checkpoint such as Gemma 3 4B+ is served without its vision tower)")
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _RowError(field_name, "only {\"type\": \"text\", \"text\": ...} content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _RowError(field_name, f"must be a string, got {_type_name(value)}")


def _logprobs(fields: dict[str, Any], prefix: str, overrides: dict[str, Any], source: dict[str, str]) -> None:
    """Chat API: logprobs: bool + top_logprobs: int. Completions API and plain rows: logprobs: int."""
    logprobs, top = fields.get("logprobs"), fields.get("top_logprobs")
    if isinstance(logprobs, bool):
        if logprobs:
            overrides["logprobs"], source["logprobs"] = (0, "logprobs") if top is None else (top, "top_logprobs")
        elif top is not None:
            raise _RowError(prefix + "top_logprobs", "requires logprobs: true")
        else:
            overrides["logprobs"], source["logprobs"] = None, "logprobs"
    elif logprobs is not None:
        if top is not None:
            raise _RowError(prefix + "top_logprobs", "give it with logprobs: true, not with a number of logprobs")
        overrides["logprobs"], source["logprobs"] = logprobs, "logprobs"
    elif top is not None:
        raise _RowError(prefix + "top_logprobs", "requires logprobs: true")


def _params_key(overrides: dict[str, Any]) -> tuple | None:
    """A hashable key for a set of override values, or None (a schema dict). Types are part of the key:
    1, 1.0 and True are equal in Python but not to strict validation."""
    def typed(value: Any) -> tuple:
        if isinstance(value, list):
            return list, tuple(typed(item) for item in value)
        return type(value), value

    key = tuple(sorted((name, typed(value)) for name, value in overrides.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _out_of_range_number(value: Any) -> str | None:
    """NaN / Infinity and integers beyond int64 pass pydantic's bounds but break the engine."""
    for item in value if isinstance(value, list) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number (got {item})"
        if isinstance(item, int) and not isinstance(item, bool) and not -_INT64_LIMIT <= item < _INT64_LIMIT:
            return "integer out of range (64-bit)"
    return None


def _field_with_lone_surrogate(raw: dict[str, Any]) -> str | None:
    for name, value in raw.items():
        try:
            json.dumps({name: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return ascii(name)[1:-1]
    return None


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
