"""Errors as OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with the right status.

A client's mistake is a 4xx that names the field (400), the key (401), the model (404), the size (413) or the
load (429, with Retry-After); 503 while loading or draining. Only a fault of the server itself is a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .protocol import UNSUPPORTED

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def validation_error(err: RequestValidationError) -> ApiError:
    """pydantic's first complaint as one 400 that names the field (an unsupported field by name)."""
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    # A union (content: str | list[part]) complains once per branch, the str branch's "should be a valid string"
    # first. Of the complaints about the first field, the one about what the client sent is a complaint other
    # than a type mismatch (a list's bad part, a too-short list), else the deepest (stop[1], not stop).
    field = _field(first)
    if field:
        same = [e for e in errors if _field(e) == field or _field(e)[:len(field) + 1] in (field + ".", field + "[")]
        first = max(same, key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(_field(e))))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = _dotted(loc)
    kind = first.get("type", "")
    if kind == "extra_forbidden" and loc:
        name = loc[-1]
        if name in UNSUPPORTED:
            return ApiError(400, f"'{param}' is not supported by this server", param, "unsupported_parameter")
        return ApiError(400, f"unknown field '{param}'", param, "unknown_parameter")
    if kind == "json_invalid" or not loc:
        return ApiError(400, f"the request body is not a valid JSON object: {first.get('msg', '')}", None,
                        "invalid_json")
    return ApiError(400, f"'{param}': {first.get('msg', 'invalid value')}", param, "invalid_value")


def _field(error: dict) -> str:
    return _dotted([str(p) for p in error.get("loc", ()) if p != "body"]) or ""


def _dotted(loc: list[str]) -> str | None:
    """('messages', '0', 'content', ...) -> 'messages[0].content...'; pydantic's union-branch names are dropped."""
    out: list[str] = []
    for part in loc:
        if "[" in part or "(" in part or part in ("str", "int", "float", "bool", "function-after"):
            continue
        if out and part == out[-1].lstrip("."):  # a discriminated union repeats its tag: image_url.image_url
            continue
        out.append(f"[{part}]" if part.isdigit() else (f".{part}" if out else part))
    return "".join(out) or None
