"""Schemathesis against the live server's own /openapi.json: generated requests, valid and invalid, never get a 5xx.

The hand-written cases of test_errors.py check the refusals we thought of; this fuzzes every operation the schema
describes with what hypothesis makes of it (positive cases that follow the schema, negative ones that break it
on purpose: wrong types, missing fields, out-of-range numbers, odd JSON) and fails on any 5xx, and on a response
that does not match what the schema says (status code, content type, body). Positive cases, and three in four
negative ones, are nudged past the first refusal (`tame`): the served model's name instead of a random one (a
404), a real data: image instead of a random URL, token ids inside the vocabulary. A `max_tokens` the schema
allows is cut to a few tokens (values past the context are kept: they are a quick 400), so that the run stays
short on 2 CPU cores. Each operation and mode is its own test of at most `EXAMPLES` cases; hypothesis's example
database is off, so a run leaves nothing behind and every run draws new cases.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from live_server import data_url, picture

EXAMPLES = 30
MAX_NEW = 4  # tokens per generated choice
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics")]
IMAGE = data_url(picture(0, 12, 16))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def test_the_schema_describes_every_route(schema):
    described = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert described == set(OPERATIONS)


def tame(case, live, path: str, helpful: bool) -> None:
    """Keep the case's generation short; when `helpful`, also point it at the served model, its image URLs at a
    real image and its token ids into the vocabulary, so that it gets past the first refusal."""
    body = case.body
    if not isinstance(body, dict):
        return
    if helpful and isinstance(body.get("model"), str):
        body["model"] = live.state.model_name
    if path in ("/v1/chat/completions", "/v1/completions"):
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if value is None and field == "max_tokens" and "max_completion_tokens" not in body:
                body[field] = MAX_NEW  # unset: as many as fit the context
            elif _int(value) and MAX_NEW < value <= live.state.max_model_len:
                body[field] = MAX_NEW
        if _int(body.get("n")) and body["n"] > 4:
            body["n"] = 4
    if not helpful:
        return
    if path == "/detokenize" and isinstance(body.get("tokens"), list):
        size = len(live.state.processor.tokenizer)
        body["tokens"] = [t % size if _int(t) else t for t in body["tokens"]]
    if path == "/tokenize" and ("prompt" in body) == ("messages" in body):  # exactly one of them
        body.pop("messages", None)
        body.setdefault("prompt", "Hello")
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                part["image_url"]["url"] = IMAGE
                message["role"] = "user"


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


RUNS = [(method, path, mode) for method, path in OPERATIONS
        for mode in ([GenerationMode.POSITIVE] if method == "GET" else list(GenerationMode))]  # GETs take no input


@pytest.mark.parametrize("method, path, mode", RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS])
def test_no_request_gets_a_server_error(live, schema, method, path, mode):
    operation = schema[path][method]
    statuses = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), helpful=st.integers(0, 3).map(bool))
    def fuzz(case, helpful):
        tame(case, live, path, helpful or mode is GenerationMode.POSITIVE)
        response = case.call(timeout=60)
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    fuzz()
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses, statuses  # some requests got through to the engine, not only refusals
