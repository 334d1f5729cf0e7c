"""Structured output: a random "model" sampling under the grammar mask must still produce valid outputs.

Outputs are checked with jsonschema / re / the option list, and the bitmask against a bit-by-bit reference.
"""
import json
import re
import threading
import time

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from batchgen.engine.grammar import StructuredOutputError, validate
from batchgen.engine.structured import GrammarEngine, apply_bitmask
from batchgen.sampling_params import StructuredOutput

PADDING = 40          # logits wider than the vocab, and not a multiple of 32


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def eos_ids(tokenizer):
    return sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")})


@pytest.fixture(scope="module")
def grammars(tokenizer, eos_ids):
    engine = GrammarEngine(tokenizer, eos_ids, len(tokenizer) + PADDING)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def closing_bias(tokenizer, eos_ids):
    """Logit bonus for tokens that close strings, arrays and objects, and for EOS: random outputs stay short
    (the largest of ~49k standard normal logits is about 4, so a closer wins often but not always)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    bias = torch.zeros(len(tokenizer) + PADDING)
    bias[[i for i, text in enumerate(texts) if text and set(text) <= set('"]},')]] = 3.5
    bias[eos_ids] = 3.5
    return bias


def sample(grammars, constraints, bias, eos_ids, seed, max_steps=300):
    """A fake model: random logits every step, masked, then the best token taken. Rows run to the end."""
    for constraint in constraints:
        if constraint is not None:
            grammars.start(constraint)
    matchers = [None if c is None else grammars.matcher(c) for c in constraints]
    generator = torch.Generator().manual_seed(seed)
    outputs = [[] for _ in constraints]
    live = [i for i, m in enumerate(matchers) if m is not None]
    for _ in range(max_steps):
        if not live:
            return outputs
        logits = torch.randn(len(live), grammars.vocab_width, generator=generator) + bias
        apply_bitmask(logits, grammars.fill_bitmask([matchers[i] for i in live]))
        tokens = logits.argmax(-1).tolist()
        still_live = []
        for i, token in zip(live, tokens):
            assert matchers[i].accept_token(token), matchers[i].error
            if token not in eos_ids:
                outputs[i].append(token)
            if matchers[i].is_terminated():
                assert matchers[i].is_complete()
            else:
                assert token not in eos_ids
                still_live.append(i)
        live = still_live
    raise AssertionError(f"rows {live} did not finish in {max_steps} steps")


def accepts(grammars, tokenizer, constraint, text):
    """Does the grammar take `text` (as the tokenizer splits it) as a whole output?"""
    matcher = grammars.matcher(constraint)
    return all(matcher.accept_token(t) for t in tokenizer.encode(text)) and matcher.is_complete()


def allowed_reference(bitmask_row, width):
    """bool [width]: bit j of the row, read one id at a time."""
    ids = torch.arange(width)
    return ((bitmask_row[ids // 32] >> (ids % 32)) & 1).bool()


FLAT = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120},
                   "email": {"type": "string"}, "active": {"type": "boolean"}},
    "required": ["name", "age", "email"],
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "status": {"enum": ["draft", "published", "archived"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "authors": {"type": "array", "minItems": 1, "maxItems": 3,
                    "items": {"type": "object", "required": ["name", "role"],
                              "properties": {"name": {"type": "string"}, "role": {"enum": ["lead", "editor"]}}}},
        "meta": {"type": "object", "properties": {"pages": {"type": "integer"}, "isbn": {"type": ["string", "null"]}},
                 "required": ["pages"]},
    },
    "required": ["title", "status", "rating", "authors", "meta"],
}
DEFS = {
    "$defs": {"node": {"type": "object", "required": ["value"],
                       "properties": {"value": {"type": "integer"},
                                      "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
    "type": "object",
    "properties": {"tree": {"$ref": "#/$defs/node"}, "label": {"anyOf": [{"type": "integer"}, {"const": "none"}]}},
    "required": ["tree", "label"],
}
PATTERNS_AND_ITEMS = {
    "type": "object",
    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                   "scores": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2,
                              "maxItems": 4}},
    "required": ["sku", "scores"],
}


@pytest.mark.parametrize("schema", [FLAT, NESTED, DEFS, PATTERNS_AND_ITEMS], ids=["flat", "nested", "defs", "patterns"])
def test_sampled_json_validates_against_schema(grammars, tokenizer, closing_bias, eos_ids, schema):
    constraint = StructuredOutput(json_schema=schema)
    outputs = sample(grammars, [constraint] * 6, closing_bias, eos_ids, seed=len(json.dumps(schema)))
    for tokens in outputs:
        value = json.loads(tokenizer.decode(tokens))
        jsonschema.validate(value, schema)
        assert set(value) <= set(schema["properties"])     # objects are closed to unlisted keys


def test_objects_are_closed_unless_the_schema_opens_them(grammars, tokenizer):
    closed = StructuredOutput(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    opened = StructuredOutput(json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "additionalProperties": {"type": "integer"}})
    assert accepts(grammars, tokenizer, closed, '{"a": 1}')
    assert not accepts(grammars, tokenizer, closed, '{"a": 1, "b": 2}')
    assert accepts(grammars, tokenizer, opened, '{"a": 1, "b": 2}')
    assert not accepts(grammars, tokenizer, opened, '{"a": 1, "b": "x"}')
    # the shape pydantic gives an Optional nested model: the $defs object is closed too
    nested = StructuredOutput(json_schema={
        "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        "type": "object", "required": ["home"],
        "properties": {"home": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]}}})
    assert accepts(grammars, tokenizer, nested, '{"home": {"city": "Oslo"}}')
    assert accepts(grammars, tokenizer, nested, '{"home": null}')
    assert not accepts(grammars, tokenizer, nested, '{"home": {"city": "Oslo", "zip": 1}}')
    # branches that add keys to their parent's object: closing either part would reject the other's keys
    extended = StructuredOutput(json_schema={
        "type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"],
        "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]},
                  {"properties": {"y": {"type": "integer"}}, "required": ["y"]}]})
    assert accepts(grammars, tokenizer, extended, '{"kind": "a", "x": 1}')
    assert accepts(grammars, tokenizer, extended, '{"kind": "b", "y": 2}')


def test_json_object_is_any_object(grammars, tokenizer, closing_bias, eos_ids):
    constraint = StructuredOutput(json_object=True)
    for tokens in sample(grammars, [constraint] * 6, closing_bias, eos_ids, seed=1):
        assert isinstance(json.loads(tokenizer.decode(tokens)), dict)
    assert accepts(grammars, tokenizer, constraint, '{"any": [1, {"nested": null}], "keys": "ok"}')
    assert not accepts(grammars, tokenizer, constraint, '[1, 2]')


@pytest.mark.parametrize("pattern", [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no), because [a-z ]{1,12}\.",
                                     r"[A-Z][a-z]{0,8}( [0-9]{1,3})?"])
def test_sampled_text_fullmatches_regex(grammars, tokenizer, closing_bias, eos_ids, pattern):
    outputs = sample(grammars, [StructuredOutput(regex=pattern)] * 6, closing_bias, eos_ids, seed=2)
    for tokens in outputs:
        assert re.fullmatch(pattern, tokenizer.decode(tokens))


def test_sampled_choice_is_exactly_one_option(grammars, tokenizer, closing_bias, eos_ids):
    options = ["yes", "yes please", "no", 'n/a "quoted"\nline', "é"]
    constraint = StructuredOutput(choice=options)
    outputs = sample(grammars, [constraint] * 12, closing_bias, eos_ids, seed=3)
    assert all(tokenizer.decode(tokens) in options for tokens in outputs)
    assert all(accepts(grammars, tokenizer, constraint, option) for option in options)
    assert not accepts(grammars, tokenizer, constraint, "ye")
    assert not accepts(grammars, tokenizer, constraint, "yes!")


def test_batched_bitmask_equals_each_rows_own_mask(grammars, tokenizer):
    constraints = [StructuredOutput(json_schema=NESTED), None, StructuredOutput(regex=r"[a-c]+x"),
                   StructuredOutput(choice=["alpha", "beta"]), None, StructuredOutput(json_object=True)]
    prefixes = ['{"title": "A", "status": "dr', "", "abca", "bet", "", '{"k": [1, ']
    matchers = [None if c is None else grammars.matcher(c) for c in constraints]
    for matcher, prefix in zip(matchers, prefixes):
        if matcher is not None:
            assert all(matcher.accept_token(t) for t in tokenizer.encode(prefix))
    batched = grammars.fill_bitmask(matchers).clone()
    assert batched.shape == (len(matchers), (len(tokenizer) + PADDING + 31) // 32)
    for row, matcher in enumerate(matchers):
        if matcher is None:
            assert (batched[row] == -1).all()
        else:
            assert torch.equal(batched[row], grammars.fill_bitmask([matcher])[0])
    assert grammars.fill_bitmask([None, None]) is None


def test_padded_ids_never_allowed_and_only_eos_after_completion(grammars, tokenizer, eos_ids):
    width = grammars.vocab_width
    matcher = grammars.matcher(StructuredOutput(json_schema=FLAT))
    allowed = allowed_reference(grammars.fill_bitmask([matcher])[0], width)
    assert allowed[:len(tokenizer)].any() and not allowed[len(tokenizer):].any()
    for token in tokenizer.encode('{"name": "Ann", "age": 41, "email": "a@b.c"}'):
        assert not matcher.is_terminated()
        assert matcher.accept_token(token)
    assert matcher.is_terminated() and matcher.is_complete()
    allowed = allowed_reference(grammars.fill_bitmask([matcher])[0], width)
    assert allowed.nonzero().view(-1).tolist() == eos_ids


def test_refused_token_leaves_an_error(grammars, tokenizer):
    matcher = grammars.matcher(StructuredOutput(json_schema=FLAT))
    assert not matcher.accept_token(tokenizer.encode("hello")[0])
    assert matcher.error


def test_cut_output_is_not_complete(grammars, tokenizer):
    matcher = grammars.matcher(StructuredOutput(json_schema=FLAT))
    assert all(matcher.accept_token(t) for t in tokenizer.encode('{"name": "Ann", "age": 4'))
    assert not matcher.is_complete() and not matcher.is_terminated()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_apply_bitmask_sets_exactly_the_disallowed_ids(device):
    generator = torch.Generator().manual_seed(0)
    rows, width = 5, 1000                       # 1000 = 31 full words + 8 ids of a 32nd
    bitmask = torch.randint(-2**31, 2**31, (rows, 32), dtype=torch.int32, generator=generator)
    bitmask[1] = -1                             # an unconstrained row
    logits = torch.randn(rows, width, generator=generator)
    masked = logits.to(device)
    apply_bitmask(masked, bitmask)
    allowed = torch.stack([allowed_reference(row, width) for row in bitmask])
    expected = logits.masked_fill(~allowed, float("-inf"))
    assert torch.equal(masked.cpu(), expected)
    assert torch.isinf(expected[0]).any() and torch.equal(masked[1].cpu(), logits[1])


def test_apply_bitmask_refuses_a_mask_that_does_not_cover_the_logits():
    with pytest.raises(ValueError, match="does not cover"):
        apply_bitmask(torch.zeros(2, 65), torch.full((2, 2), -1, dtype=torch.int32))


@pytest.mark.parametrize("constraint, reason", [
    (StructuredOutput(json_schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "not"),
    (StructuredOutput(json_schema={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
     "uniqueItems"),
    (StructuredOutput(json_schema={"type": "string", "format": "credit-card"}), "credit-card"),
    (StructuredOutput(json_schema={"$ref": "https://example.com/schema.json"}), "example.com"),
    (StructuredOutput(regex=r"(?=a)\w+"), "look-around"),
])
def test_uncompilable_constraint_gives_a_clear_error(grammars, constraint, reason):
    with pytest.raises(StructuredOutputError, match=re.escape(reason)):
        validate(constraint)
    grammars.start(constraint)
    with pytest.raises(StructuredOutputError, match=re.escape(reason)):
        grammars.matcher(constraint)
    assert grammars.ready(constraint)       # a failed compile is finished too: the row gets its error


@pytest.mark.parametrize("constraint, valid, invalid", [
    (StructuredOutput(json_schema=NESTED),
     '{"title": "T", "status": "draft", "rating": 5, "authors": [{"name": "A", "role": "lead"}], "meta": {"pages": 3}}',
     '{"title": "T", "status": "draft", "rating": 6, "authors": [{"name": "A", "role": "lead"}], "meta": {"pages": 3}}'),
    (StructuredOutput(json_schema=DEFS), '{"tree": {"value": 1, "children": [{"value": 2}]}, "label": "none"}',
     '{"tree": {"children": []}, "label": "none"}'),
    (StructuredOutput(json_object=True), '{"a": [1, 2]}', '[1, 2]'),
    (StructuredOutput(regex=r"\d+"), "2024", "20x4"),
    (StructuredOutput(choice=["a", "b"]), "b", "c"),
])
def test_validate_accepts_supported_constraints_that_then_enforce_them(grammars, tokenizer, constraint, valid,
                                                                        invalid):
    validate(constraint)                      # raises on a constraint it would refuse
    if constraint.json_schema is not None:    # the examples themselves, judged by jsonschema
        jsonschema.validate(json.loads(valid), constraint.json_schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(invalid), constraint.json_schema)
    grammars.start(constraint)
    assert accepts(grammars, tokenizer, constraint, valid)
    assert not accepts(grammars, tokenizer, constraint, invalid)


def test_equal_constraints_compile_once(grammars, tokenizer, monkeypatch):
    compiled = []
    compile_grammar = GrammarEngine._compile

    def counting_compile(self, constraint):
        compiled.append(compile_grammar(self, constraint))
        return compiled[-1]

    monkeypatch.setattr(GrammarEngine, "_compile", counting_compile)
    schema = {"type": "object", "properties": {"cache_test": {"type": "integer"}}, "required": ["cache_test"]}
    first = grammars.matcher(StructuredOutput(json_schema=schema))
    second = grammars.matcher(StructuredOutput(json_schema=json.loads(json.dumps(schema))))
    assert len(compiled) == 1
    grammars.matcher(StructuredOutput(json_schema={**schema, "required": []}))
    assert len(compiled) == 2
    # matchers from one compiled grammar advance independently
    assert all(first.accept_token(t) for t in tokenizer.encode('{"cache_test": 7}'))
    assert first.is_terminated() and not second.is_terminated()


def test_compile_runs_in_the_background(grammars, tokenizer, monkeypatch):
    release = threading.Event()
    compile_grammar = GrammarEngine._compile

    def held_compile(self, constraint):
        assert release.wait(10)
        return compile_grammar(self, constraint)

    monkeypatch.setattr(GrammarEngine, "_compile", held_compile)
    constraint = StructuredOutput(regex=r"background [0-9]+")
    grammars.start(constraint)
    assert not grammars.ready(constraint)      # start() returned while the compile is still held
    release.set()
    deadline = time.monotonic() + 10
    while not grammars.ready(constraint):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert accepts(grammars, tokenizer, constraint, "background 42")
