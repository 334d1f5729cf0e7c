"""Compare xgrammar and llguidance as batchgen's grammar engine (numbers in docs/structured-output.md).

Measures, with one Hugging Face tokenizer (default: the SmolLM2 copy at /tmp/smolst):
  - tokenizer set-up time,
  - compile time per schema (cold, no cache) and time to the first mask (llguidance builds lazily),
  - per-step mask fill and token accept time for a batch of rows driven by a random "model",
  - JSON-schema feature coverage: rejected, or accepted and then checked by sampling + jsonschema and by
    feeding a known violation,
  - regex and choice support,
  - padded vocab (model logits wider than the tokenizer): are the padded ids masked out?

    python benchmarks/structured_compare.py [--tokenizer DIR] [--batch 64] [--steps 200] [--threads 2]
                                            [--timing-only]
"""
import argparse
import json
import re
import statistics
import time

import jsonschema
import llguidance
import llguidance.hf
import llguidance.torch
import referencing.exceptions
import torch
import xgrammar
from transformers import AutoTokenizer

FLAT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}},
    "required": ["name", "age", "email"],
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "status": {"enum": ["draft", "published", "archived"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "authors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "role": {"enum": ["lead", "editor"]}},
                "required": ["name", "role"],
            },
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object", "properties": {"pages": {"type": "integer"}, "isbn": {"type": "string"}},
                 "required": ["pages"]},
    },
    "required": ["title", "status", "rating", "authors"],
}
REFS = {
    "$defs": {
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["city"]},
        "node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                  "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                 "required": ["value"]},
    },
    "type": "object",
    "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"},
                   "tree": {"$ref": "#/$defs/node"}},
    "required": ["home", "tree"],
}
PATTERNS = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "phone": {"type": "string", "pattern": "^\\+?[0-9 ]{7,15}$"},
    },
    "required": ["sku", "date", "phone"],
}
MIN_MAX_ITEMS = {
    "type": "object",
    "properties": {
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 2, "maxItems": 5},
        "labels": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["scores", "labels"],
}
SIX_FIELDS = {  # the issue's GPU benchmark shape
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "category": {"enum": ["person", "company", "place", "other"]},
        "year": {"type": "integer"}, "score": {"type": "number"},
        "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5}, "is_public": {"type": "boolean"},
    },
    "required": ["name", "category", "year", "score", "keywords", "is_public"],
}
LONG_STRING = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 200}},
               "required": ["summary"]}
SCHEMAS = {"flat": FLAT, "nested": NESTED, "refs": REFS, "patterns": PATTERNS, "min_max_items": MIN_MAX_ITEMS,
           "six_fields": SIX_FIELDS, "long_string": LONG_STRING}


def _obj(prop):
    return {"type": "object", "properties": {"x": prop}, "required": ["x"], "additionalProperties": False}


# One JSON-schema feature per entry, wrapped in {"x": ...} so that sampling always exercises it.
# Strings are bounded so that a random "model" finishes its outputs.
FEATURES = {
    "enum": _obj({"enum": ["red", "green", 3, None]}),
    "const": _obj({"const": "fixed"}),
    "type list": _obj({"type": ["integer", "null"]}),
    "anyOf": _obj({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}),
    "oneOf": _obj({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}),
    "allOf": _obj({"allOf": [{"type": "integer"}, {"minimum": 5}]}),
    "$ref/$defs": {"$defs": {"n": {"type": "integer", "minimum": 0}}, **_obj({"$ref": "#/$defs/n"})},
    "recursive $ref": REFS,
    "remote $ref": _obj({"$ref": "https://example.com/s.json"}),
    "minLength/maxLength": _obj({"type": "string", "minLength": 2, "maxLength": 4}),
    "pattern": _obj({"type": "string", "pattern": "^[a-z]{1,5}[0-9]$"}),
    "pattern lookahead": _obj({"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{3}$"}),
    "format date-time": _obj({"type": "string", "format": "date-time"}),
    "format email": _obj({"type": "string", "format": "email"}),
    "format uuid": _obj({"type": "string", "format": "uuid"}),
    "minimum/maximum": _obj({"type": "integer", "minimum": -5, "maximum": 12}),
    "exclusiveMinimum": _obj({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "multipleOf": _obj({"type": "integer", "multipleOf": 7}),
    "minItems/maxItems": _obj({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}),
    "uniqueItems": _obj({"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True}),
    "prefixItems": _obj({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                         "items": False}),
    "contains": _obj({"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}}),
    "additionalProperties schema": _obj({"type": "object", "additionalProperties": {"type": "integer"}}),
    "patternProperties": _obj({"type": "object", "patternProperties": {"^k[0-9]$": {"type": "integer"}},
                               "additionalProperties": False}),
    "propertyNames": _obj({"type": "object", "propertyNames": {"pattern": "^[a-c]$"}}),
    "min/maxProperties": _obj({"type": "object", "additionalProperties": {"type": "integer"},
                               "minProperties": 1, "maxProperties": 2}),
    "dependentRequired": _obj({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                               "dependentRequired": {"a": ["b"]}}),
    "if/then/else": _obj({"type": "integer", "if": {"minimum": 10}, "then": {"maximum": 20},
                          "else": {"minimum": 0}}),
    "not": _obj({"not": {"type": "string"}}),
}

# Outputs that break the feature's rule: an engine that takes one of them does not enforce the feature.
VIOLATIONS = {
    "allOf": '{"x": 3}', "if/then/else": '{"x": 25}', "not": '{"x": "s"}', "contains": '{"x": [1]}',
    "uniqueItems": '{"x": [1, 1]}', "dependentRequired": '{"x": {"a": 1}}', "format email": '{"x": "not an email"}',
    "propertyNames": '{"x": {"zz": 1}}', "min/maxProperties": '{"x": {"a": 1, "b": 2, "c": 3}}',
    "multipleOf": '{"x": 8}', "pattern lookahead": '{"x": "abc"}',
}

REGEXES = {
    "date": r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "email-like": r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    "\\d \\w classes": r"\d{3}-\w{2,4}",
    "unicode \\p{L}": r"\p{L}{2,5}",
    "lazy quantifier": r"a+?b",
    "lookahead": r"(?=a)a+",
    "backreference": r"(a|b)\1",
}

CHOICES = ["positive", "negative", "neutral", "mixed feelings"]


class Xgr:
    name = "xgrammar"

    def __init__(self, tokenizer, width, eos_ids, threads):
        started = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=width, stop_token_ids=eos_ids)
        self.setup_s = time.perf_counter() - started
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind, spec):
        if kind == "json_schema":
            return self.compiler.compile_json_schema(spec, any_whitespace=False, separators=(", ", ": "))
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        # no native choice: an alternation of escaped literals
        return self.compiler.compile_regex("|".join(re.escape(c) for c in spec))

    def matcher(self, compiled):
        return xgrammar.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers, tokens):
        return xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def done(self, matcher):
        return matcher.is_terminated()


class Llg:
    """Used as batchgen.engine.structured uses it: the compiled grammar is a matcher at its start, and
    each request gets a deep copy (which shares the lexer cache)."""
    name = "llguidance"

    def __init__(self, tokenizer, width, eos_ids, threads):
        started = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width, eos_token=eos_ids)
        self.setup_s = time.perf_counter() - started
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile(self, kind, spec):
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=self.options)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask):
        llguidance.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                                     bitmask)

    def accept(self, matchers, tokens):
        return [m.consume_token(t) for m, t in zip(matchers, tokens)]

    def done(self, matcher):
        return matcher.is_stopped()


def unpack(bitmask, width):
    """int32 [S, W] bitmask -> bool [S, width] (True = allowed)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(bitmask.shape[0], -1)[:, :width].bool()


def closing_bias(tokenizer, width, eos_ids):
    """A fake model that likes to close strings/arrays/objects and to stop, so random outputs stay short."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    bias = torch.zeros(width)
    bias[[i for i, text in enumerate(texts) if text and set(text) <= set('"]},')]] = 3.5
    bias[eos_ids] = 3.5
    return bias


def fake_model_step(bitmask, bias, generator):
    """Random logits + bias, masked, best token: the sampling stand-in for a model."""
    logits = torch.randn(bitmask.shape[0], bias.shape[0], generator=generator) + bias
    logits.masked_fill_(~unpack(bitmask, bias.shape[0]), float("-inf"))
    return logits.argmax(-1).tolist()


def generate(engine, compiled_list, bias, eos_ids, generator, max_steps=400):
    """Run a batch to the end under the mask; returns [(tokens, finished)]."""
    matchers = [engine.matcher(c) for c in compiled_list]
    bitmask = torch.full((len(matchers), (bias.shape[0] + 31) // 32), -1, dtype=torch.int32)
    outputs = [[] for _ in matchers]
    finished = [False] * len(matchers)
    live = list(range(len(matchers)))
    for _ in range(max_steps):
        if not live:
            break
        rows = [matchers[i] for i in live]
        engine.fill(rows, bitmask[:len(live)])
        tokens = fake_model_step(bitmask[:len(live)], bias, generator)
        assert all(engine.accept(rows, tokens)), "a token allowed by the mask was refused"
        still = []
        for i, token in zip(live, tokens):
            if token in eos_ids:
                finished[i] = True
                continue
            outputs[i].append(token)
            if engine.done(matchers[i]):
                finished[i] = True
            else:
                still.append(i)
        live = still
    return list(zip(outputs, finished))


def step_times(engine, compiled_list, bias, eos_ids, generator, steps):
    """Seconds per step to fill the batch's mask and to accept its tokens. A finished row is replaced by a
    fresh request at once, as continuous batching does, so every step has the full batch."""
    matchers = [engine.matcher(c) for c in compiled_list]
    bitmask = torch.full((len(matchers), (bias.shape[0] + 31) // 32), -1, dtype=torch.int32)
    fill_s, accept_s = [], []
    for _ in range(steps):
        started = time.perf_counter()
        engine.fill(matchers, bitmask)
        fill_s.append(time.perf_counter() - started)
        tokens = fake_model_step(bitmask, bias, generator)
        started = time.perf_counter()
        assert all(engine.accept(matchers, tokens))
        accept_s.append(time.perf_counter() - started)
        for i, token in enumerate(tokens):
            if token in eos_ids or engine.done(matchers[i]):
                matchers[i] = engine.matcher(compiled_list[i])
    return fill_s, accept_s


def time_compile(engine, spec, width):
    """Seconds for: compile, making a request's matcher, its first mask."""
    started = time.perf_counter()
    compiled = engine.compile("json_schema", spec)
    compiled_at = time.perf_counter()
    matcher = engine.matcher(compiled)
    matcher_at = time.perf_counter()
    engine.fill([matcher], torch.full((1, (width + 31) // 32), -1, dtype=torch.int32))
    return compiled_at - started, matcher_at - compiled_at, time.perf_counter() - matcher_at


def takes(engine, compiled, tokenizer, text):
    matcher = engine.matcher(compiled)
    return all(engine.accept([matcher], [token])[0] for token in tokenizer.encode(text))


def coverage(engine, tokenizer, bias, eos_ids, generator, samples=8):
    """'rejected: why', or for an accepted schema how many sampled outputs jsonschema finds valid and
    whether the engine takes a known violation."""
    result = {}
    for feature, schema in FEATURES.items():
        try:
            compiled = engine.compile("json_schema", schema)
        except Exception as error:   # each engine raises its own error types
            result[feature] = "rejected: " + str(error).splitlines()[0][:90]
            continue
        outputs = generate(engine, [compiled] * samples, bias, eos_ids, generator)
        invalid = []
        for tokens, finished in outputs:
            if not finished:
                continue
            try:
                jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
            except (ValueError, jsonschema.ValidationError):
                invalid.append(tokenizer.decode(tokens))
            except referencing.exceptions.Unresolvable:   # a remote $ref: nobody can check it offline
                invalid.append("(unresolvable $ref) " + tokenizer.decode(tokens))
        finished = sum(f for _, f in outputs)
        result[feature] = (f"accepted, {finished - len(invalid)}/{finished} finished outputs valid"
                           + (f" NOT ENFORCED, e.g. {invalid[0][:40]!r}" if invalid else ""))
        violation = VIOLATIONS.get(feature)
        if violation is not None:
            result[feature] += (f"; NOT ENFORCED: takes {violation}" if takes(engine, compiled, tokenizer, violation)
                                else "; refuses a violation")
    return result


def regex_support(engine, tokenizer, bias, eos_ids, generator, samples=4):
    result = {}
    for name, pattern in REGEXES.items():
        try:
            compiled = engine.compile("regex", pattern)
        except Exception as error:
            lines = str(error).splitlines()
            result[name] = "rejected: " + next((ln for ln in lines if "error" in ln.lower()), lines[0]).strip()[:90]
            continue
        outputs = generate(engine, [compiled] * samples, bias, eos_ids, generator)
        python_pattern = pattern.replace(r"\p{L}", "[^\\W\\d_]")
        texts = [tokenizer.decode(t) for t, finished in outputs if finished]
        bad = [t for t in texts if re.fullmatch(python_pattern, t) is None]
        result[name] = f"accepted, {len(texts) - len(bad)}/{len(texts)} finished outputs match" + (
            f" NOT ENFORCED, e.g. {bad[0][:40]!r}" if bad else "")
    compiled = engine.compile("choice", CHOICES)
    outputs = generate(engine, [compiled] * samples, bias, eos_ids, generator)
    texts = [tokenizer.decode(t) for t, finished in outputs if finished]
    result["choice"] = f"{sum(t in CHOICES for t in texts)}/{len(texts)} finished outputs are an option"
    return result


def padded_vocab(engine, eos_ids, tokenizer_vocab, width):
    """Are ids in [tokenizer_vocab, width) disallowed for a constrained row?"""
    compiled = engine.compile("json_schema", FLAT)
    bitmask = torch.full((1, (width + 31) // 32), -1, dtype=torch.int32)
    engine.fill([engine.matcher(compiled)], bitmask)
    allowed = unpack(bitmask, width)[0]
    return f"{int(allowed[tokenizer_vocab:].sum())} of {width - tokenizer_vocab} padded ids allowed"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default="/tmp/smolst")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="mask/compile threads of each engine")
    parser.add_argument("--pad", type=int, default=64, help="extra logits columns beyond the tokenizer vocab")
    parser.add_argument("--timing-only", action="store_true", help="skip the coverage checks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    eos_ids = [tokenizer.eos_token_id]
    tokenizer_vocab = len(tokenizer)
    width = tokenizer_vocab + args.pad
    bias = closing_bias(tokenizer, width, eos_ids)
    print(f"tokenizer vocab {tokenizer_vocab}, logits width {width}, batch {args.batch}, threads {args.threads}\n")
    engines = [Xgr(tokenizer, width, eos_ids, args.threads), Llg(tokenizer, width, eos_ids, args.threads)]
    for engine in engines:
        print(f"== {engine.name}: tokenizer set-up {engine.setup_s * 1e3:.0f} ms")
        for name, schema in SCHEMAS.items():
            times = [time_compile(engine, schema, width) for _ in range(3)]
            compile_s, matcher_s, first_mask_s = (statistics.median(t) for t in zip(*times))
            print(f"  {name:14s} compile {compile_s * 1e3:7.2f} ms  matcher {matcher_s * 1e3:6.2f} ms  "
                  f"first mask {first_mask_s * 1e3:6.2f} ms")
        print("  padded vocab:", padded_vocab(engine, eos_ids, tokenizer_vocab, width))
    # per-step cost: rows spread over the schemas, each at its own point of its output; the engines take
    # turns so that background load on the machine hits both alike
    compiled = {e.name: [e.compile("json_schema", SCHEMAS[n]) for n in SCHEMAS] for e in engines}
    times = {e.name: ([], []) for e in engines}
    for repeat in range(3):
        for engine in engines:
            batch = [compiled[engine.name][i % len(SCHEMAS)] for i in range(args.batch)]
            fill_s, accept_s = step_times(engine, batch, bias, eos_ids, torch.Generator().manual_seed(repeat),
                                          args.steps)
            times[engine.name][0].extend(fill_s[10:])      # the first steps warm the lexer caches
            times[engine.name][1].extend(accept_s[10:])
    for name, (fill_s, accept_s) in times.items():
        fill_ms = sorted(t * 1e3 for t in fill_s)
        accept_ms = sorted(t * 1e3 for t in accept_s)
        print(f"{name}: batch {args.batch} fill mask median {statistics.median(fill_ms):.2f} ms, "
              f"p90 {fill_ms[len(fill_ms) * 9 // 10]:.2f} ms; accept median {statistics.median(accept_ms):.2f} ms "
              f"({len(fill_ms)} steps)")
    if args.timing_only:
        return
    for engine in engines:
        generator = torch.Generator().manual_seed(0)
        print(f"\n== {engine.name} schema features:")
        for feature, verdict in coverage(engine, tokenizer, bias, eos_ids, generator).items():
            print(f"    {feature:28s} {verdict}")
        print("  regex / choice:")
        for name, verdict in regex_support(engine, tokenizer, bias, eos_ids, generator).items():
            print(f"    {name:28s} {verdict}")


if __name__ == "__main__":
    main()
