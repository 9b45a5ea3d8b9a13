"""Grammar-constrained decoding (serving/grammar.py) on the real 49k SmolVLM tokenizer, driven by fake models.

A "fake model" samples among the tokens `allowed()` leaves, like the engine does after masking the logits to -inf:
whatever it picks, the text must parse and validate, and end with eos as the only choice.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from idefics3.serving.grammar import GrammarError, JsonConstraint, JsonGrammars

TOKENIZER_JSON = Path(__file__).resolve().parents[1] / "data" / "smolvlm-tokenizer" / "tokenizer.json"
VOCAB = 49280
EOS = [49279, 2]  # <end_of_utterance>, <|im_end|>
OTHER_SPECIALS = [0, 1, 49189, 49190]  # <|endoftext|>, <|im_start|>, <fake_token_around_image>, <image>

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "pet": {
            "type": "object",
            "properties": {"kind": {"const": "cat"}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
            "required": ["kind"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"], "maxLength": 5},
    },
    "required": ["name", "age", "mood", "tags", "ok", "pet"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
GOOD = {"name": "Ada", "age": 36, "mood": "calm", "tags": ["math", "code"], "ok": True, "pet": {"kind": "cat"}}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(value, schema: dict) -> None:
    """Assert `value` satisfies `schema`, for the keywords SCHEMA uses."""
    if "const" in schema:
        assert value == schema["const"]
    if "enum" in schema:
        assert value in schema["enum"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(isinstance(value, int) and not isinstance(value, bool) if t == "integer" else
                   type(value) is _TYPES[t] for t in types), (value, types)
    if isinstance(value, int) and not isinstance(value, bool):
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value)
    if isinstance(value, str):
        assert len(value) <= schema.get("maxLength", len(value))
    if isinstance(value, list):
        assert len(value) <= schema.get("maxItems", len(value))
        for item in value:
            validate(item, schema.get("items", {}))
    if isinstance(value, dict):
        assert set(schema.get("required", [])) <= set(value)
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), set(value) - set(props)
        for key, item in value.items():
            validate(item, props.get(key, {}))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_JSON))


@pytest.fixture(scope="module")
def grammars() -> JsonGrammars:
    return JsonGrammars(TOKENIZER_JSON, VOCAB, EOS)


def allowed(constraint: JsonConstraint) -> np.ndarray:
    """The constraint's mask, checked for what the engine needs, as numpy (torch's reductions crawl on a busy CPU)."""
    mask = constraint.allowed()
    assert mask.dtype == torch.bool and mask.dim() == 1 and mask.device.type == "cpu"
    return mask.numpy()


def ids(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


def run(constraint: JsonConstraint, pick, max_steps: int = 400) -> tuple[list[int], list[np.ndarray]]:
    """Decode with `pick(mask, step)` as the model until it picks eos; the tokens before eos and every mask."""
    tokens, masks = [], []
    for step in range(max_steps):
        mask = allowed(constraint)
        masks.append(mask)
        assert mask.any(), "no token allowed"
        if mask[EOS].any():  # complete: only eos may follow (a top-level object cannot grow)
            assert ids(mask) == sorted(EOS)
        token = pick(mask, step)
        assert mask[token]
        constraint.accept(token)
        if token in EOS:
            assert constraint.error is None
            return tokens, masks
        tokens.append(token)
    raise AssertionError(f"no eos after {max_steps} tokens")


def random_model(seed: int):
    """Any allowed token, uniformly: the worst model there is."""
    rng = random.Random(seed)

    def pick(mask, step):
        choices = np.flatnonzero(mask)
        return int(choices[rng.randrange(len(choices))])

    return pick


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_random_model_output_validates(grammars, tokenizer, seed):
    tokens, masks = run(grammars.constraint(SCHEMA_FORMAT), random_model(seed))
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    validate(json.loads(text), SCHEMA)
    assert ids(masks[-1]) == sorted(EOS)  # the end: eos and nothing else
    assert not any(m[EOS].any() for m in masks[:-1])  # before it: never eos
    assert all(m.shape == (VOCAB,) and not m[OTHER_SPECIALS].any() for m in masks)


@pytest.mark.parametrize("seed", range(1, 5))  # (seed 0 draws the one token "{}" first)
def test_json_object_gives_a_json_object(grammars, tokenizer, seed):
    # \u0120 is the byte-level BPE's " "
    opening = [tokenizer.token_to_id(c) for c in ['"', ":", ",", "{", "[", "1", "-", ".", "true", "null", "\u0120"]]
    closing = [*EOS, *(tokenizer.token_to_id(c) for c in ['"', "}", "]", "0", ":"])]
    rng, anything = random.Random(seed), random_model(seed)

    def model(mask, step):  # babbles JSON-ish for 40 tokens, then picks whatever closes the document soonest
        if step >= 40:
            return next((token for token in closing if mask[token]), None) or anything(mask, step)
        structure = [token for token in opening if mask[token]]
        return rng.choice(structure) if structure and rng.random() < 0.7 else anything(mask, step)

    tokens, masks = run(grammars.constraint({"type": "json_object"}), model)
    value = json.loads(tokenizer.decode(tokens, skip_special_tokens=False))
    assert isinstance(value, dict) and value
    assert ids(masks[-1]) == sorted(EOS)


@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    json.dumps(GOOD, separators=(",", ":")),
    json.dumps(GOOD, indent=2),
    json.dumps({**GOOD, "pet": {"kind": "cat", "legs": 4}, "note": None}, indent=4),
])
def test_typical_model_outputs_are_allowed(grammars, tokenizer, text):
    constraint = grammars.constraint(SCHEMA_FORMAT)
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        mask = allowed(constraint)
        assert mask[token], f"{tokenizer.id_to_token(token)!r} refused after {text!r}"
        assert not mask[EOS].any()
        constraint.accept(token)
    assert ids(allowed(constraint)) == sorted(EOS)
    constraint.accept(EOS[0])
    assert constraint.error is None


def test_text_needs_no_constraint(grammars):
    assert grammars.constraint({"type": "text"}) is None


def test_each_call_is_a_fresh_sequence(grammars, tokenizer):
    first, second = grammars.constraint({"type": "json_object"}), grammars.constraint({"type": "json_object"})
    start = allowed(first)
    assert start[tokenizer.token_to_id("{")] and not start[EOS].any()
    first.accept(tokenizer.token_to_id("{"))
    assert not np.array_equal(allowed(first), start)
    assert np.array_equal(allowed(second), start)


def test_tokens_past_the_tokenizer_are_never_allowed(tokenizer):
    wide = JsonGrammars(TOKENIZER_JSON, VOCAB + 160, EOS)  # a model whose embedding is padded past the tokenizer
    tokens, masks = run(wide.constraint(SCHEMA_FORMAT), random_model(0))
    validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=False)), SCHEMA)
    assert all(m.shape == (VOCAB + 160,) and not m[VOCAB:].any() for m in masks)


def test_a_refused_token_ends_the_sequence_without_raising(grammars, tokenizer):
    constraint = grammars.constraint({"type": "json_object"})
    constraint.accept(tokenizer.token_to_id("]"))  # the engine never samples it; if it did, the sequence stops
    assert constraint.error
    assert ids(allowed(constraint)) == sorted(EOS)


BAD_SCHEMA = "response_format.json_schema.schema is not a supported JSON schema: "


@pytest.mark.parametrize("response_format, problem", [
    ("json", "response_format must be an object, got string"),
    ({}, "response_format.type is required"),
    ({"type": "xml"}, "response_format.type must be one of 'text', 'json_object', 'json_schema', got 'xml'"),
    ({"type": "json_schema"}, "response_format.json_schema is required"),
    ({"type": "json_schema", "json_schema": ["x"]}, "response_format.json_schema must be an object, got array"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema is required"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name must be a string, got number"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be a boolean"),
    ({"type": "json_schema", "json_schema": {"schema": [{"type": "object"}]}}, "schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": "object"}}, "schema must be a JSON Schema object, got string"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, BAD_SCHEMA + "Invalid type: foo"),
    ({"type": "json_schema", "json_schema": {"schema": {"properties": 5}}},
     BAD_SCHEMA + "properties must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}},
     BAD_SCHEMA + 'Unimplemented keys: ["not"]'),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 2}}},
     BAD_SCHEMA + "Unsatisfiable schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "("}}},
     BAD_SCHEMA + "regex parse error"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}},
     BAD_SCHEMA + "Pointer '/$defs/missing' does not exist"),
])
def test_bad_response_formats_name_the_problem(grammars, response_format, problem):
    with pytest.raises(GrammarError) as info:
        grammars.constraint(response_format)
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError)  # what the server turns into HTTP 400


def test_bad_eos_ids_are_refused():
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        JsonGrammars(TOKENIZER_JSON, VOCAB, [])
    with pytest.raises(ValueError, match="outside"):
        JsonGrammars(TOKENIZER_JSON, VOCAB + 160, [VOCAB + 3])


def test_masks_are_fast(grammars):
    constraint = grammars.constraint(SCHEMA_FORMAT)
    pick = random_model(0)
    times = []
    for step in range(400):
        start = time.perf_counter()
        mask = constraint.allowed()
        times.append(time.perf_counter() - start)
        token = pick(mask.numpy(), step)
        if token in EOS:
            constraint = grammars.constraint(SCHEMA_FORMAT)
        else:
            constraint.accept(token)
    # measured ~0.02 ms median, ~2 ms for the first mask of a grammar; the bound leaves room for a busy machine
    assert statistics.median(times) < 5e-3, f"median {statistics.median(times) * 1e3:.2f} ms per mask"
