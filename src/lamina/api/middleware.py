"""ASGI middleware: the body-size limit (413) and the per-request record (usage row, HTTP metrics).

Pure ASGI rather than `BaseHTTPMiddleware`, so streamed responses pass through untouched and the record is
written when the last byte has been sent (a stream's tokens are only known then).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lamina.api.wire import ErrorBody, ErrorResponse
from lamina.infra.telemetry import Metrics

logger = logging.getLogger(__name__)

# Paths that are not API traffic: no usage row (metrics still count them).
_UNRECORDED = ("/health", "/metrics", "/static/", "/docs", "/openapi.json", "/favicon")


class BodyTooLarge(Exception):
    pass


class LimitBody:
    """413 for bodies over the limit: `upload_bytes` on `upload_path` (file uploads), `max_bytes` elsewhere."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int | None = None, upload_path: str | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.upload_bytes, self.upload_path = upload_bytes or max_bytes, upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_bytes if self.upload_path and scope["path"] == self.upload_path else self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, int(declared), limit)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, received, limit)


async def _too_large(send: Send, size: int, limit: int) -> None:
    error = ErrorBody(message=f"The request body is too large ({size:,} bytes; the limit is {limit:,}).",
                      type="invalid_request_error", param=None, code="request_too_large")
    body = json.dumps(ErrorResponse(error=error).model_dump()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RecordRequests:
    """After each response: HTTP metrics, and a usage row (finishing the one `admit` opened, if any)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, usage: Any) -> None:
        self.app, self.metrics, self.usage = app, metrics, usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self._record(scope, status, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        handler = getattr(route, "path", None) or ("unmatched" if status == 404 else scope["path"])
        method = scope["method"]
        self.metrics.http_requests.labels(handler, method, str(status)).inc()
        self.metrics.http_request_duration.labels(handler, method).observe(seconds)
        path = scope["path"]
        if path == "/" or path.startswith(_UNRECORDED):
            return
        state = scope.get("state") or {}
        try:
            usage = state.get("usage")
            if usage is not None:
                self.usage.finish(usage.usage_id, status=status, latency_ms=seconds * 1000,
                                  prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            else:
                self.usage.record(key=state.get("key"), endpoint=path, method=method, model=state.get("model"),
                                  status=status, latency_ms=seconds * 1000)
        except Exception:  # a full disk must not turn a served response into an error
            logger.exception("could not record usage for %s %s", method, path)
