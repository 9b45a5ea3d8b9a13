"""Every bad request gets the right status and an OpenAI error object that names the problem, never a 500.

A client of an OpenAI-compatible server learns what it did wrong only from `{"error": {"message", "type",
"param", "code"}}` (the openai SDK raises `BadRequestError` etc. from it), so each refusal is checked for its
status, its `type`, the field it names in `param` and a message that says what is wrong: unknown and
unsupported fields, wrong types and ranges, malformed JSON, unknown models, bad and forbidden images, the
server's limits (images, tiles, prompt tokens, context, stop strings, body size), bad response formats,
tokenize/detokenize misuse, a missing or wrong API key (401; /health and /metrics stay open), a full queue
(429 with Retry-After), loading and draining (503), and CORS (off by default, on for configured origins).
Last, the server still answers a normal request: none of this hurt the engine.

The shared `live` server (tests/serving/conftest.py) takes the requests that need no special settings;
`guarded`, a second server of this module, has an API key, a 16 KiB body limit, a CORS origin and small image
limits, and is the one whose state the 429/503 tests change (and restore).
"""

from __future__ import annotations

import base64
import http.client
import json
import time

import pytest

from idefics3.serving.prompts import Limits
from idefics3.serving.server import ServeOptions
from live_server import call, data_url, free_port, image_part, picture, start, stop

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
BODY_LIMIT = 16 * 2**10
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable"}


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    server = start(ServeOptions(model=str(tiny_checkpoint), port=free_port(), dtype="fp32", max_batch=2,
                                max_seq_len=256, api_key=KEY, max_body_bytes=BODY_LIMIT, cors_origins=[ORIGIN],
                                limits=Limits(max_images=1, max_frames=4)))
    yield server
    stop(server)


DROP = object()  # a field value that removes the field


def chat_body(live, **fields) -> dict:
    body = {"model": live.state.model_name, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not DROP}


def text_body(live, **fields) -> dict:
    body = {"model": live.state.model_name, "prompt": "Once upon a time", "max_tokens": 2}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not DROP}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def url_part(url: str, detail: str | None = None) -> dict:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image_url}


def b64(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def assert_error(status: int, headers: dict, body, want: int, param: str | None = None, *words: str,
                 code: str | None = None) -> dict:
    """`body` is an OpenAI error object with status `want`, naming `param` and saying each of `words`."""
    assert status == want, body
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == TYPES[want], error
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error)
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- fields: unknown, unsupported, wrong types and ranges ------------------------------------------

@pytest.mark.parametrize("fields, param, words, code", [
    ({"foo": 1}, "foo", ["unknown field", "foo"], "unknown_parameter"),
    ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour", ["unknown field"],
     "unknown_parameter"),
    ({"stream_options": {"include_usage": True, "chunk_size": 3}}, "stream_options.chunk_size", ["unknown field"],
     "unknown_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["not supported", "tools"],
     "unsupported_parameter"),
    ({"tool_choice": "auto"}, "tool_choice", ["not supported"], "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", ["not supported", "audio"], "unsupported_parameter"),
    ({"logit_bias": {"42": 10}}, "logit_bias", ["not supported", "logit_bias"], "unsupported_parameter"),
    ({"temperature": "hot"}, "temperature", ["temperature", "number"], "invalid_value"),
    ({"temperature": 2.5}, "temperature", ["less than or equal to 2"], "invalid_value"),
    ({"top_p": 0}, "top_p", ["greater than 0"], "invalid_value"),
    ({"top_k": -2}, "top_k", ["top_k"], "invalid_value"),
    ({"top_k": 2**70}, "top_k", ["less than or equal to"], "invalid_value"),  # once it overflowed in the engine
    ({"max_tokens": 0}, "max_tokens", ["greater than or equal to 1"], "invalid_value"),
    ({"max_tokens": "ten"}, "max_tokens", ["integer"], "invalid_value"),
    ({"max_tokens": 1.5}, "max_tokens", ["integer"], "invalid_value"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", ["greater than or equal to 1"], "invalid_value"),
    ({"n": 0}, "n", ["greater than or equal to 1"], "invalid_value"),
    ({"n": 17}, "n", ["less than or equal to 16"], "invalid_value"),
    ({"seed": -1}, "seed", ["seed"], "invalid_value"),
    ({"seed": 2**64}, "seed", ["seed"], "invalid_value"),
    ({"presence_penalty": 9}, "presence_penalty", ["presence_penalty"], "invalid_value"),
    ({"stream": "sometimes"}, "stream", ["boolean"], "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["less than or equal to 20"], "invalid_value"),
    ({"top_logprobs": 3}, "top_logprobs", ["needs logprobs"], None),
    ({"model": DROP}, "model", ["required"], "invalid_value"),
    ({"model": ""}, "model", ["model"], "invalid_value"),
    ({"messages": DROP}, "messages", ["required"], "invalid_value"),
    ({"messages": []}, "messages", ["at least 1"], "invalid_value"),
    ({"messages": "hello"}, "messages", ["list"], "invalid_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", ["'system', 'user' or 'assistant'"],
     "invalid_value"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role", ["role"], "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", ["required"], "invalid_value"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", ["messages[0].content"],
     "invalid_value"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", ["at least 1"], "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, 5]}]}, "messages[0].content[1]",
     ["messages[0].content[1]"], "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "messages[0].content[0]",
     ["video"], "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url",
     ["required"], "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
     "messages[0].content[0].image_url.url", ["at least 1"], "invalid_value"),
    ({"messages": [{"role": "user", "content": [url_part("data:,", detail="ultra")]}]},
     "messages[0].content[0].image_url.detail", ["'auto', 'low' or 'high'"], "invalid_value"),
    ({"messages": [{"role": "assistant", "content": [url_part("data:,")]}]}, "messages[0].content[0]",
     ["only accepted in user messages"], None),
    ({"stop": ["s"] * 17}, "stop", ["17", "at most 16"], None),
    ({"stop": ""}, "stop", ["empty"], None),
    ({"stop": ["END", ""]}, "stop", ["empty"], None),
    ({"stop": 5}, "stop", ["stop"], "invalid_value"),
    ({"stop": ["END", 5]}, "stop[1]", ["string"], "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ["json_schema"], "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", ["Invalid type: foo"], "invalid_response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", ["not"], "invalid_response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"], "invalid_response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", ["required"], "invalid_value"),
])
def test_bad_chat_fields_are_400s_naming_the_field(live, fields, param, words, code):
    assert_error(*call(live, "POST", "/v1/chat/completions", chat_body(live, **fields)), 400, param, *words,
                 code=code)


@pytest.mark.parametrize("fields, param, words", [
    ({"prompt": []}, "prompt", ["empty"]),
    ({"prompt": ["a"] * 17}, "prompt", ["at most 16"]),
    ({"prompt": 12}, "prompt", ["prompt"]),
    ({"prompt": "look: <image>"}, "prompt", ["<image>", "/v1/chat/completions"]),
    ({"prompt": DROP}, "prompt", ["required"]),
    ({"logprobs": 21}, "logprobs", ["less than or equal to 20"]),
    ({"logprobs": True, "top_logprobs": 2}, "top_logprobs", ["unknown field"]),
    ({"echo": True}, "echo", ["not supported"]),
    ({"suffix": "!"}, "suffix", ["not supported"]),
    ({"best_of": 2}, "best_of", ["not supported"]),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", ["unknown field"]),
    ({"max_tokens": 0}, "max_tokens", ["greater than or equal to 1"]),
    ({"stop": [""]}, "stop", ["empty"]),
])
def test_bad_completion_fields_are_400s_naming_the_field(live, fields, param, words):
    assert_error(*call(live, "POST", "/v1/completions", text_body(live, **fields)), 400, param, *words)


def test_lone_surrogates_are_400s(live):
    """JSON may escape half a UTF-16 pair ("\\ud800"); such a string is not Unicode and the tokenizer refuses it."""
    bad = "a\ud800b"
    for path, body, param in (
            ("/v1/chat/completions", chat_body(live, messages=[{"role": "user", "content": bad}]), "messages"),
            ("/v1/chat/completions", chat_body(live, messages=user({"type": "text", "text": bad})), "messages"),
            ("/v1/completions", text_body(live, prompt=bad), "prompt"),
            ("/tokenize", {"prompt": bad}, "prompt"),
            ("/tokenize", {"messages": [{"role": "user", "content": bad}]}, "messages")):
        raw = json.dumps(body).encode()
        assert b"\\ud800" in raw
        assert_error(*call(live, "POST", path, raw=raw), 400, param, "surrogate")


def test_a_conversation_the_chat_template_refuses_is_a_prompt_error(live):
    """The fuzzer's first find: an empty content list made the template raise, a 500. The protocol now refuses
    empty lists (above), and whatever else a template refuses is a 400 naming `messages`, not a 500."""
    from idefics3.serving.prompts import PromptError
    from idefics3.serving.protocol import Message

    with pytest.raises(PromptError, match="chat template") as info:
        live.state.builder.chat([Message.model_construct(role="user", content=[])])
    assert info.value.param == "messages"


def test_extreme_but_valid_sampling_settings_work(live):
    for fields in ({"top_k": 2**31 - 1, "temperature": 1.0}, {"seed": 2**63 - 1, "n": 16, "temperature": 1.0},
                   {"temperature": 5e-324}, {"top_p": 5e-324, "temperature": 1.0}, {"min_p": 1.0, "temperature": 1.0},
                   {"repetition_penalty": 1e-300}, {"logprobs": True, "top_logprobs": 20, "n": 4},
                   {"stop": ["\u0000", "\ud800"]}):
        status, _, body = call(live, "POST", "/v1/chat/completions", chat_body(live, **fields))
        assert status == 200, (fields, body)


@pytest.mark.parametrize("raw", [
    b"{not json", b'{"model": "x", "messages": [}', b"", b"[1, 2]", b'"a string"', b"null", b"42",
    b"\xff\xfe{}", b'{"model": "x"' + b" " * 100,
])
def test_malformed_json_bodies_are_400s(live, raw):
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        status, headers, body = call(live, "POST", path, raw=raw)
        assert_error(status, headers, body, 400, None, code="invalid_json")


def test_non_finite_numbers_are_refused(live):
    """Python's JSON parser takes NaN and Infinity; the range checks still refuse them."""
    for value in (b"NaN", b"Infinity", b"-Infinity"):
        raw = (b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": %s}'
               % (live.state.model_name.encode(), value))
        assert_error(*call(live, "POST", "/v1/chat/completions", raw=raw), 400, "temperature")


def test_invalid_utf8_and_non_json_content_types_are_400s(live):
    raw = b'{"model": "\xff\xfe", "prompt": "hi"}'
    assert_error(*call(live, "POST", "/v1/completions", raw=raw), 400, None)  # FastAPI's "error parsing the body"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        assert_error(*call(live, "POST", "/v1/chat/completions", chat_body(live),
                           headers={"Content-Type": content_type}), 400, None, code="invalid_json")


def test_unknown_model_is_404_model_not_found(live):
    for path, body in (("/v1/chat/completions", chat_body(live, model="gpt-4o")),
                       ("/v1/completions", text_body(live, model="gpt-4o")),
                       ("/tokenize", {"model": "gpt-4o", "prompt": "hi"}),
                       ("/detokenize", {"model": "gpt-4o", "tokens": [1]})):
        error = assert_error(*call(live, "POST", path, body), 404, "model", "gpt-4o", live.state.model_name,
                             code="model_not_found")
        assert error["type"] == "not_found_error"


def test_unknown_routes_and_methods_are_error_objects(live):
    assert_error(*call(live, "GET", "/v1/nothing-here"), 404)
    assert_error(*call(live, "GET", "/v1/chat/completions"), 405)
    assert_error(*call(live, "DELETE", "/v1/models"), 405)


# ---- images ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parts, words", [
    ([url_part("data:image/png;base64,iVBORw0K!!!!")], ["image 0", "base64"]),
    ([url_part("data:image/png;base64,")], ["image 0", "no data"]),
    ([url_part(b64(b"just some text, not an image at all"))], ["image 0", "is not a PNG"]),
    ([url_part(b64(b"%PDF-1.4 not an image", "application/pdf"))], ["image 0", "image/<format>"]),
    ([url_part(b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40))], ["image 0"]),  # a PNG signature, then garbage
    ([image_part(picture(1)), url_part("data:image/png;base64,@@@@")], ["image 1", "base64"]),
    ([url_part("https://images.example.com/cat.png")], ["image 0", "images.example.com", "--allowed-media-domains"]),
    ([url_part("http://127.0.0.1:1/cat.png")], ["image 0", "127.0.0.1", "--allowed-media-domains"]),
    ([url_part("file:///etc/passwd")], ["image 0", "file://", "--allowed-local-media-path"]),
    ([url_part("ftp://example.com/cat.png")], ["image 0", "unsupported URL scheme 'ftp'"]),
    ([url_part("cat.png")], ["image 0", "is not a URL"]),
])
def test_bad_or_forbidden_images_are_400s_naming_the_image(live, parts, words):
    error = assert_error(*call(live, "POST", "/v1/chat/completions", chat_body(live, messages=user(*parts))), 400,
                         "messages", *words, code="invalid_image")
    assert len(error["message"]) < 600  # a long data URI is shortened, not echoed


def test_a_huge_bad_data_uri_is_not_echoed(live):
    url = "data:image/png;base64," + "A" * 200_000 + "!"
    error = assert_error(*call(live, "POST", "/v1/chat/completions", chat_body(live, messages=user(url_part(url)))),
                         400, "messages", "image 0")
    assert len(error["message"]) < 600


# ---- context and prompt limits ---------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_400(live):
    long = "lorem ipsum dolor sit amet " * 200  # well over the 512-token context of `live`
    error = assert_error(*call(live, "POST", "/v1/chat/completions",
                               chat_body(live, messages=[{"role": "user", "content": long}])), 400, "messages",
                         "tokens", "at most 511", code="context_length_exceeded")
    assert "prompt has" in error["message"]
    assert_error(*call(live, "POST", "/v1/completions", text_body(live, prompt=long)), 400, "prompt", "at most 511",
                 code="context_length_exceeded")
    assert_error(*call(live, "POST", "/tokenize", {"prompt": long}), 400, "prompt", "at most 511")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_room_left_is_400_context_length_exceeded(live, field):
    status, _, body = call(live, "POST", "/tokenize", {"messages": chat_body(live)["messages"]})
    assert status == 200, body
    room = live.state.max_model_len - body["count"]
    error = assert_error(*call(live, "POST", "/v1/chat/completions", chat_body(live, **{"max_tokens": None,
                                                                                         field: room + 1})),
                         400, field, str(room + 1), f"at most {room}", code="context_length_exceeded")
    assert str(live.state.max_model_len) in error["message"]
    status, _, body = call(live, "POST", "/v1/chat/completions", chat_body(live, **{"max_tokens": None, field: room},
                                                                             stop=["e"], temperature=0))
    assert status == 200, body  # exactly the room left is fine
    streamed = chat_body(live, max_tokens=10**12, stream=True)  # refused before any event is sent
    assert_error(*call(live, "POST", "/v1/chat/completions", streamed), 400, "max_tokens",
                 code="context_length_exceeded")
    assert_error(*call(live, "POST", "/v1/completions", text_body(live, max_tokens=10**6)), 400, "max_tokens",
                 code="context_length_exceeded")


# ---- tokenize / detokenize ---------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param, words", [
    ("/tokenize", {}, "prompt", ["exactly one of 'prompt' and 'messages'"]),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt", ["exactly one"]),
    ("/tokenize", {"prompt": "hi", "tools": []}, "tools", ["not supported"]),
    ("/tokenize", {"messages": [{"role": "user", "content": [url_part("data:image/png;base64,!!")]}]}, "messages",
     ["image 0"]),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens", ["1000000000", "outside the vocabulary"]),
    ("/detokenize", {"tokens": [2**70]}, "tokens", ["outside the vocabulary"]),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]", ["greater than or equal to 0"]),
    ("/detokenize", {"tokens": "hello"}, "tokens", ["list"]),
    ("/detokenize", {}, "tokens", ["required"]),
])
def test_bad_tokenize_and_detokenize_requests_are_400s(live, path, body, param, words):
    assert_error(*call(live, "POST", path, body), 400, param, *words)


# ---- the API key ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}, {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {KEY}\u00e9"},
    {"X-Api-Key": KEY},
])
def test_without_the_right_key_every_guarded_route_is_401(guarded, headers):
    for method, path, body in (("POST", "/v1/chat/completions", chat_body(guarded)),
                               ("POST", "/v1/completions", text_body(guarded)), ("GET", "/v1/models", None),
                               ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]})):
        status, got, error = call(guarded, method, path, body, headers=headers)
        assert_error(status, got, error, 401, None, "Bearer", code="invalid_api_key")
        assert got.get("www-authenticate") == "Bearer"
        assert KEY not in json.dumps(error)


def test_health_and_metrics_stay_open_and_the_right_key_works(guarded):
    status, _, body = call(guarded, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    status, _, text = call(guarded, "GET", "/metrics")
    assert status == 200 and "idefics3" in text
    for auth in (AUTH, {"Authorization": f"bearer {KEY}"}):
        status, _, body = call(guarded, "GET", "/v1/models", headers=auth)
        assert status == 200 and body["data"][0]["id"] == guarded.state.model_name, body
    status, _, body = call(guarded, "POST", "/v1/chat/completions", chat_body(guarded), headers=AUTH)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body


# ---- body size -----------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_by_content_length(guarded):
    body = chat_body(guarded, messages=[{"role": "user", "content": "x" * BODY_LIMIT}])
    assert_error(*call(guarded, "POST", "/v1/chat/completions", body, headers=AUTH), 413, None, str(BODY_LIMIT),
                 "--max-body-mb", code="body_too_large")
    # before the key is checked: a large unauthenticated body is not read either
    assert_error(*call(guarded, "POST", "/v1/chat/completions", body), 413, None, code="body_too_large")


def chunked(live, data: bytes, piece: int = 4096) -> tuple[int, dict, object]:
    """POST data with Transfer-Encoding: chunked (no Content-Length), in `piece`-byte chunks."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=(data[i:i + piece] for i in range(0, len(data), piece)),
                     headers={"Content-Type": "application/json", **AUTH}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def test_a_chunked_body_over_the_limit_is_413(guarded):
    small = json.dumps(chat_body(guarded)).encode()
    status, _, body = chunked(guarded, small, piece=16)
    assert status == 200, body  # chunked bodies are read at all
    big = json.dumps(chat_body(guarded, messages=[{"role": "user", "content": "x" * (2 * BODY_LIMIT)}])).encode()
    assert_error(*chunked(guarded, big), 413, None, str(BODY_LIMIT), code="body_too_large")


# ---- image limits ----------------------------------------------------------------------------------------

def test_too_many_images_is_400_before_any_is_fetched(guarded):
    small = image_part(picture(0, 8, 8), "low")
    error = assert_error(*call(guarded, "POST", "/v1/chat/completions",
                               chat_body(guarded, messages=user(small, url_part("https://elsewhere.example/x.png"))),
                               headers=AUTH), 400, "messages", "2 images", "at most 1", "--max-images-per-request")
    assert "elsewhere" not in error["message"]
    status, _, body = call(guarded, "POST", "/v1/chat/completions", chat_body(guarded, messages=user(small)),
                           headers=AUTH)
    assert status == 200, body


def test_too_many_tiles_is_400_and_detail_low_fits(guarded):
    from PIL import Image

    big = Image.new("RGB", (400, 300), (120, 30, 200))  # tiles 2x2 + 1 global frame with the tiny checkpoint
    assert len(data_url(big)) < BODY_LIMIT // 2
    assert_error(*call(guarded, "POST", "/v1/chat/completions", chat_body(guarded, messages=user(image_part(big))),
                       headers=AUTH), 400, "messages", "5 tiles", "at most 4", 'detail "low"')
    status, _, body = call(guarded, "POST", "/v1/chat/completions",
                           chat_body(guarded, messages=user(image_part(big, "low"))), headers=AUTH)
    assert status == 200, body


# ---- load: 429, and 503 while loading or draining --------------------------------------------------------

def test_a_full_queue_is_429_with_retry_after(guarded):
    runner = guarded.state.runner
    saved = runner.max_waiting
    runner.max_waiting = 0
    try:
        status, headers, body = call(guarded, "POST", "/v1/chat/completions", chat_body(guarded), headers=AUTH)
        assert_error(status, headers, body, 429, None, "busy", code="queue_full")
        assert int(headers["retry-after"]) >= 1
        status, headers, body = call(guarded, "POST", "/v1/completions", text_body(guarded), headers=AUTH)
        assert status == 429 and "retry-after" in headers
    finally:
        runner.max_waiting = saved
    status, _, body = call(guarded, "POST", "/v1/chat/completions", chat_body(guarded), headers=AUTH)
    assert status == 200, body


@pytest.mark.parametrize("phase, word", [("loading", "loading"), ("draining", "shutting down")])
def test_503_while_loading_and_draining(guarded, phase, word):
    state = guarded.state
    state.status = phase
    try:
        status, _, body = call(guarded, "GET", "/health")
        assert (status, body) == (503, {"status": phase})
        for path, body in (("/v1/chat/completions", chat_body(guarded)), ("/v1/completions", text_body(guarded)),
                           ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            status, headers, error = call(guarded, "POST", path, body, headers=AUTH)
            assert_error(status, headers, error, 503, None, word, code=phase)
            if phase == "loading":
                assert int(headers["retry-after"]) >= 1
        assert call(guarded, "GET", "/metrics")[0] == 200
    finally:
        state.status = "ok"
    assert call(guarded, "GET", "/health")[:3:2] == (200, {"status": "ok"})


def test_503_when_the_runner_drains_under_a_request(guarded):
    """The app's status is still "ok" but the engine already refuses new work (SIGTERM between the checks)."""
    runner = guarded.state.runner
    runner.start_draining()
    try:
        assert_error(*call(guarded, "POST", "/v1/chat/completions", chat_body(guarded), headers=AUTH), 503, None,
                     "shutting down", code="draining")
    finally:
        runner.draining = False
    assert call(guarded, "POST", "/v1/chat/completions", chat_body(guarded), headers=AUTH)[0] == 200


# ---- CORS ------------------------------------------------------------------------------------------------

def preflight(live, origin: str) -> tuple[int, dict]:
    status, headers, _ = call(live, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    return status, headers


def test_cors_is_off_by_default(live):
    status, headers = preflight(live, ORIGIN)
    assert status >= 400 and "access-control-allow-origin" not in headers
    status, headers, _ = call(live, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_for_a_configured_origin(guarded):
    status, headers = preflight(guarded, ORIGIN)
    assert status == 200
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers = preflight(guarded, "https://evil.example")
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, _ = call(guarded, "GET", "/v1/models", headers={"Origin": ORIGIN, **AUTH})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = call(guarded, "GET", "/v1/models", headers={"Origin": ORIGIN})  # the 401 is readable too
    assert status == 401 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = call(guarded, "GET", "/v1/models", headers={"Origin": "https://evil.example", **AUTH})
    assert status == 200 and "access-control-allow-origin" not in headers


# ---- and the engine survived ----------------------------------------------------------------------------

@pytest.mark.parametrize("server", ["live", "guarded"])
def test_the_servers_still_answer_after_all_of_this(request, server):
    live = request.getfixturevalue(server)
    body = chat_body(live, messages=user(image_part(picture(3, 8, 8), "low")), max_tokens=4, temperature=0)
    status, _, answer = call(live, "POST", "/v1/chat/completions", body, headers=AUTH)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] >= 1
    assert live.state.status == "ok"
    deadline = time.monotonic() + 5  # the engine thread publishes its state just after the last token
    while live.state.runner.snapshot()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.state.runner.snapshot()["running"] == 0
