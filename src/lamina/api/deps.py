"""FastAPI dependencies: the server's services and the caller's API key, as typed aliases for routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lamina.api.errors import APIError
from lamina.api.keys import APIKey, KeyStore
from lamina.api.openai.responses import ResponsesService
from lamina.api.openai.serving import OpenAIService
from lamina.api.rag.service import RagService
from lamina.api.usage import UsageLog
from lamina.infra.db import Database
from lamina.infra.telemetry import Metrics


@dataclass
class Services:
    """Everything the routes use, built once in the app factory and kept on `app.state.services`."""

    db: Database
    keys: KeyStore
    usage: UsageLog
    metrics: Metrics
    openai: OpenAIService
    rag: RagService
    responses: ResponsesService


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_openai(request: Request) -> OpenAIService:
    return request.app.state.services.openai


OpenAIDep = Annotated[OpenAIService, Depends(get_openai)]


def get_responses(request: Request) -> ResponsesService:
    return request.app.state.services.responses


ResponsesDep = Annotated[ResponsesService, Depends(get_responses)]


def authenticate(request: Request, services: ServicesDep) -> APIKey | None:
    """The caller's key; 401 when keys exist and the request has none or a wrong one. None: no keys exist.

    A line of a batch, sent by this process's batch runner, runs under the key that created the batch."""
    runner = getattr(request.app.state, "batch_runner", None)
    if runner is not None:
        is_line, key = runner.line_key(request, services.keys)
        if is_line:
            request.state.batch = True
            if key is not None:
                request.state.key = key
            return key
    if not services.keys.auth_required():
        return None
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.", code="missing_api_key")
    key = services.keys.lookup(secret.strip())
    if key is None:
        raise APIError(401, "Incorrect or revoked API key provided.", code="invalid_api_key")
    request.state.key = key
    return key


KeyDep = Annotated[APIKey | None, Depends(authenticate)]
