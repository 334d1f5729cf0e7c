"""What grammar a structured-output constraint means (llguidance's grammar text), and the submit-time check
that it compiles. Torch-free, so `batchgen submit` can validate a job's schema without loading the engine."""
import json

import llguidance

from batchgen.sampling_params import StructuredOutput

# One-line JSON in json.dumps' default style: free whitespace lets a small model loop on newlines until
# max_tokens, and ", " / ": " are the separators models saw most in training. A schema may override this
# with its own top-level "x-guidance" key (llguidance applies these as defaults).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """A constraint the grammar engine cannot enforce; the message says what in it is unsupported."""


def validate(constraint: StructuredOutput) -> None:
    """Check at submit time, without a tokenizer, that `constraint` compiles; raise StructuredOutputError if not."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar(constraint))
    if is_error:
        raise StructuredOutputError(describe(constraint, messages[0]))


def grammar(constraint: StructuredOutput) -> str:
    """The llguidance grammar text of a constraint."""
    if constraint.json_schema is not None:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(_close_objects(constraint.json_schema),
                                                                 defaults=JSON_FORMAT)
        except ValueError as error:   # not a JSON object at all (checked by the grammar, not here)
            raise StructuredOutputError(describe(constraint, str(error))) from error
    if constraint.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_FORMAT)
    if constraint.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(constraint.regex)
    # Lark string literals take JSON's escapes, so json.dumps quotes any option safely
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in constraint.choice))


_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems")
# keywords through which other schemas add keys to an object: such an object stays open
_ADDS_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "$ref",
              "dependentSchemas", "if")


def _close_objects(schema):
    """The schema with every object that lists `properties` closed to other keys unless it says otherwise.

    JSON Schema lets unlisted keys through, and a model given that room pads extraction outputs with
    invented keys (or runs into max_tokens). Closing them matches OpenAI's strict mode and xgrammar's
    default. An object whose keys other subschemas may extend (anyOf, allOf, $ref, ...) stays open, and
    so do those subschemas: closing one part would reject the other part's keys.
    """
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: _close_objects(sub) for name, sub in closed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(closed.get(key), list) and not (key in _ADDS_KEYS and "properties" in closed):
            closed[key] = [_close_objects(sub) for sub in closed[key]]
    for key in _SCHEMA_VALUES:
        if isinstance(closed.get(key), dict):
            closed[key] = _close_objects(closed[key])
    if "properties" in closed and not any(key in closed for key in _ADDS_KEYS):
        closed["additionalProperties"] = False
    return closed


def describe(constraint: StructuredOutput, message: str) -> str:
    kind = ("json_schema" if constraint.json_schema is not None else "json_object" if constraint.json_object
            else "regex" if constraint.regex is not None else "choice")
    return f"{kind} cannot be enforced: {message.strip()}"
