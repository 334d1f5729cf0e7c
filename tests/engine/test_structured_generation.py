"""Structured output through the whole engine on the default model (CPU): every output must parse and fit its
constraint, checked with jsonschema / re / the choice list, never trusted."""
import json
import random
import re

import jsonschema
import pytest

from batchgen import LLM, SamplingParams, StructuredOutput

PRODUCTS = ["Aero kettle", "Nimbus headphones", "Basil lamp", "Luxe 2000 blender", "Orbit mouse", "Tidal speaker"]
OPINIONS = [("works great, five stars", 5), ("broke after a week, one star", 1), ("is fine, three stars", 3),
            ("is pretty good, four stars", 4), ("disappointing, two stars", 2)]

FLAT = {"type": "object",
        "properties": {"product": {"type": "string"},
                       "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                       "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["product", "sentiment", "rating"]}
NESTED = {"type": "object",
          "properties": {"customer": {"type": "object",
                                      "properties": {"name": {"type": "string"},
                                                     "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                                      "required": ["name", "age"]},
                         "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                   "items": {"type": "object",
                                             "properties": {"name": {"type": "string"},
                                                            "quantity": {"type": "integer", "minimum": 1},
                                                            "category": {"enum": ["food", "tools", "toys"]}},
                                             "required": ["name", "quantity", "category"]}},
                         "priority": {"enum": ["low", "high"]}},
          "required": ["customer", "items", "priority"]}


def reviews(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"The {rng.choice(PRODUCTS)} {rng.choice(OPINIONS)[0]}." for _ in range(count)]


def orders(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    names = ["Ann", "Bo", "Chen", "Dara", "Eli"]
    return [f"{rng.choice(names)} ({rng.randint(18, 80)}) ordered {rng.randint(1, 5)} hammers and "
            f"{rng.randint(1, 3)} apples, urgently." for _ in range(count)]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), dtype="float32", device="cpu")


def chats(instruction: str, documents: list[str]) -> list[list[dict]]:
    return [[{"role": "system", "content": instruction}, {"role": "user", "content": d}] for d in documents]


@pytest.mark.parametrize("schema,documents", [
    pytest.param(FLAT, reviews(52), id="flat"),
    pytest.param(NESTED, orders(50), id="nested", marks=pytest.mark.slow),   # the suite's longest engine test
])
def test_every_output_parses_and_fits_the_schema(llm, schema, documents):
    params = SamplingParams(temperature=0.0, max_tokens=160, structured=StructuredOutput(json_schema=schema))
    outputs = llm.chat(chats("Extract the fields as JSON.", documents), params)
    for output in outputs:
        assert output.error is None, output.error
        completion = output.outputs[0]
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), schema)


def test_sampled_n_gt_1_outputs_each_fit(llm):
    # bounded strings, so that sampling can't wander past max_tokens inside one
    schema = {**FLAT, "properties": {**FLAT["properties"], "product": {"type": "string", "maxLength": 30}}}
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=160,
                            structured=StructuredOutput(json_schema=schema))
    for output in llm.chat(chats("Extract the fields as JSON.", reviews(6, seed=3)), params):
        assert len(output.outputs) == 3 and output.error is None
        for completion in output.outputs:
            jsonschema.validate(json.loads(completion.text), schema)


def test_regex_choice_and_json_object(llm):
    documents = reviews(20, seed=5)
    pattern = r"[A-Z][a-z]{1,12} [0-9]{3}-[0-9]{4}"
    regex = llm.chat(chats("Give a name and a phone number.", documents),
                     SamplingParams(temperature=1.0, seed=1, max_tokens=40, structured=StructuredOutput(regex=pattern)))
    assert all(re.fullmatch(pattern, o.outputs[0].text) for o in regex)
    options = ["positive", "neutral", "negative"]
    choice = llm.chat(chats("Is this review positive, neutral or negative?", documents),
                      SamplingParams(temperature=1.0, seed=2, max_tokens=10,
                                     structured=StructuredOutput(choice=options)))
    assert all(o.outputs[0].text in options for o in choice)
    assert len({o.outputs[0].text for o in choice}) > 1
    objects = llm.chat(chats('Return a JSON object with two keys: "product" and "stars".', documents[:8]),
                       SamplingParams(temperature=0.0, max_tokens=60, repetition_penalty=1.2,
                                      structured=StructuredOutput(json_object=True)))
    for output in objects:   # a small model may ramble inside a string: then it must say it was cut off
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            assert output.error is None and isinstance(json.loads(completion.text), dict)
        else:
            assert completion.finish_reason == "length" and "cut off" in output.error
    assert any(o.outputs[0].finish_reason == "stop" for o in objects)


def test_unenforceable_schema_and_cut_off_output_are_row_errors(llm):
    bad = StructuredOutput(json_schema={"type": "object", "not": {"required": ["a"]}})
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured=bad),
              SamplingParams(temperature=0.0, max_tokens=3, structured=StructuredOutput(json_schema=NESTED)),
              SamplingParams(temperature=0.0, max_tokens=160, structured=StructuredOutput(json_schema=FLAT))]
    outputs = llm.chat(chats("Extract the fields as JSON.", reviews(3)), params)
    assert "cannot be enforced" in outputs[0].error and "not" in outputs[0].error
    assert outputs[1].outputs[0].finish_reason == "length" and "cut off" in outputs[1].error
    assert outputs[2].error is None
    jsonschema.validate(json.loads(outputs[2].outputs[0].text), FLAT)
