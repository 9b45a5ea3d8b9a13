"""The FastAPI application: routes, the API key, the body-size limit, CORS and OpenAI-style errors.

Everything here runs on the event loop and never touches the model: prompt building goes to worker threads
(prompts.py) and generation to the engine thread (runner.py). `ServerState` is what the routes share; it
starts in "loading" (every route but /health, /metrics and the docs answers 503 until the model is ready)
and ends in "draining" (503 for new work while running requests finish).

Safe by default: `/v1/*`, `/tokenize` and `/detokenize` need `Authorization: Bearer <key>` when a key is set
(compared in constant time); `/health` and `/metrics` stay open, as in vLLM. Request bodies over
`max_body_bytes` are refused with 413 while they are being read, whatever Content-Length claims. CORS is off
unless origins are given.

`/` is the chat page (static/: plain HTML, CSS and JS, no build step): open, like /health, and left out of the
schema; it talks to the server only through /v1/models and /v1/chat/completions, as any client does.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .completions import chat_completion, completion, prepare
from .errors import ApiError, error_body, validation_error
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}

# The chat page's files, by the name they are served under (nothing else in static/ is reachable).
STATIC = Path(__file__).resolve().parent / "static"
_PAGE_FILES = {"index.html": "text/html; charset=utf-8", "chat.css": "text/css; charset=utf-8",
               "chat.js": "text/javascript; charset=utf-8"}
# Script only from the page's own files (no inline script, no event-handler attributes: model text that slipped
# into the DOM as HTML could not run); images also as the data: / blob: URLs of attached pictures; requests to
# any http(s) server, as the page can be pointed at another OpenAI-compatible one.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                 "img-src 'self' data: blob:; connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; "
                 "form-action 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@dataclass
class ServerState:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    cors_origins: list[str] = field(default_factory=list)
    status: str = "loading"  # "ok", "draining"
    runner: Any = None       # EngineRunner, once loaded
    builder: Any = None      # PromptBuilder
    processor: Any = None
    grammars: Any = None     # JsonGrammars, or None without a tokenizer.json
    max_model_len: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def ready(self) -> None:
        if self.status == "loading":
            raise ApiError(503, "the model is still loading", None, "loading", {"Retry-After": "5"})
        if self.status == "draining":
            raise ApiError(503, "the server is shutting down", None, "draining")
        if self.status != "ok":
            raise ApiError(503, f"the model failed to load: {self.load_error}", None, "load_failed")


def body_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {max_bytes} bytes (--max-body-mb)", None, "body_too_large")


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or while it streams in."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = body_too_large(self.max_bytes)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await too_big.response()(scope, receive, send)


def page_file(name: str) -> FileResponse:
    """One of the chat page's files, or 404."""
    if name not in _PAGE_FILES:
        raise ApiError(404, f"the chat page has no file '{name}'", None, "not_found")
    return FileResponse(STATIC / name, media_type=_PAGE_FILES[name], headers=_PAGE_HEADERS)


class _TooLarge(HTTPException):
    """Raised while the body streams in. An HTTPException, so that FastAPI's body reader passes it on (it turns
    any other exception into a 400 "There was an error parsing the body") to the handler below."""

    def __init__(self) -> None:
        super().__init__(413)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="idefics3", version="1", description="OpenAI-compatible API for Idefics3 / SmolVLM models",
                  responses=_ERRORS)
    app.state.server = state
    if state.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes)

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(_TooLarge)
    async def too_large(_: Request, err: _TooLarge) -> JSONResponse:
        return body_too_large(state.max_body_bytes).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), status_code=500)

    guarded = [Depends(authorized)]

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        state.ready()
        return await chat_completion(state, body, request)

    @app.post("/v1/completions", dependencies=guarded, response_model=Completion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        state.ready()
        return await completion(state, body, request)

    @app.get("/v1/models", dependencies=guarded, response_model=ModelList)
    async def models() -> ModelList:
        state.ready()
        return ModelList(data=[ModelCard(id=state.model_name, created=state.created,
                                         max_model_len=state.max_model_len or None)])

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        return JSONResponse({"status": state.status}, status_code=200 if state.status == "ok" else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        if state.runner is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.runner.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", dependencies=guarded, response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state.ready()
        if body.model is not None:
            state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if body.messages is not None:
            prompt = await prepare(state.builder.chat, body.messages)
        else:
            prompt = await prepare(state.builder.text, body.prompt, body.add_special_tokens)
        return TokenizeResponse(tokens=prompt.ids, count=len(prompt.ids), max_model_len=state.max_model_len)

    @app.post("/detokenize", dependencies=guarded, response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state.ready()
        if body.model is not None:
            state.check_model(body.model)
        size = len(state.processor.tokenizer)
        bad = [t for t in body.tokens if t >= size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary (size {size})", "tokens")
        return DetokenizeResponse(prompt=state.processor.tokenizer.decode(body.tokens))

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def chat_page_file(name: str) -> FileResponse:
        return page_file(name)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without the 422 it documents for every body: validation errors here are 400s."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
