"""Every error leaves the API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

One handler per kind: Lamina's own errors keep their status and code; request validation (bad JSON
included) is a 400 naming the field, never FastAPI's 422 body; unknown routes are 404 and wrong methods
405 in the same envelope; anything else is a 500 whose body says nothing about the internals (the
traceback goes to the log). The envelope is `lamina.api.wire.ErrorResponse`, its one definition: the
handlers, the middleware's 413 and a stream's final error event are built from it, and `ERRORS` publishes
it for every route in the OpenAPI schema.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lamina.api.wire import NON_BLANK, ErrorBody, ErrorResponse
from lamina.errors import LaminaError

logger = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


_DESCRIPTIONS = {
    400: "Invalid request: the body or a parameter is wrong (`param` names it).",
    401: "Missing or wrong API key.",
    403: "This API key may not use this model.",
    404: "No such model, file, vector store or route.",
    409: "A vector store with this name already exists.",
    413: "The request body is too large.",
    429: "Rate limit or token quota exceeded (see the retry-after header).",
    500: "Internal error (logged; the body says nothing about it).",
    503: "The model is still loading, failed to load, or the server is overloaded.",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: {"model": ErrorResponse, "description": text} for code, text in _DESCRIPTIONS.items()},
    # Validation errors are 400s, never FastAPI's 422; "default" also keeps FastAPI from publishing a 422.
    "default": {"model": ErrorResponse, "description": "Any other error, in the same envelope."},
}
"""The error responses every API route declares (`APIRouter(responses=ERRORS)`)."""


class APIError(LaminaError):
    """An error raised by the API layer itself (auth, limits, routing), with optional response headers."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.error_type = _HTTP_TYPES.get(status_code, "server_error")
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: Any = None, headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(LaminaError)
    async def _lamina(request: Request, exc: LaminaError) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
            code: Any = "not_found"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return error_response(exc.status_code, message, _HTTP_TYPES.get(exc.status_code, "server_error"), None, code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(ErrorResponse.internal().model_dump(), status_code=500)


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """A 400 for the first problem, naming its field (OpenAI reports one at a time)."""
    first = errors[0] if errors else {}
    ctx = first.get("ctx") or {}
    original = ctx.get("error")
    if isinstance(original, LaminaError):  # raised by one of our validators: keep its words and param
        return error_response(400, original.message, original.error_type, original.param, original.code)
    where = list(first.get("loc", ()))
    if where[:1] and where[0] in ("body", "query", "path", "header", "cookie"):  # FastAPI's part of the request
        where = where[1:]
    loc = [str(p) for p in where if not _union_label(p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        message = f"The request body is not valid JSON: {ctx.get('error', first.get('msg', ''))}"
        param = None
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        got = first.get("input")
        shown = repr(got)[:100] if got is not None and not isinstance(got, dict) else ""
        why = "it must hold something besides white space" if ctx.get("pattern") == NON_BLANK else first.get("msg", "invalid")
        message = f"Invalid value for '{param}': {why}" + (f" (got {shown})" if shown else "") + "."
    return error_response(400, message, "invalid_request_error", param, "invalid_value" if kind != "missing" else "missing_required_parameter")


_CORE_TYPES = {"str", "int", "float", "bool", "bytes", "list", "dict", "none", "any"}


def _union_label(part: Any) -> bool:
    """True for the names pydantic gives the members of a union in an error's location ('str',
    'constrained-str', 'list[int]', 'ChatMessage'): they are not fields, and OpenAI's `param` has none.
    Field names in this API are lower-case snake_case, so a capitalised segment is a model's name."""
    if not isinstance(part, str):
        return False
    return part in _CORE_TYPES or "[" in part or "-" in part or part[:1].isupper()
