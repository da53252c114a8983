"""The HTTP routes: thin, each hands its validated request to a service (`lamina.api.openai.serving`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lamina.api.deps import KeyDep, OpenAIDep, ServicesDep, authenticate
from lamina.api.errors import APIError
from lamina.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from lamina.infra.telemetry import CONTENT_TYPE

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 500, 503)}

public = APIRouter()
api = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


@public.get("/health", tags=["server"])
async def health(openai: OpenAIDep) -> dict[str, str]:
    """200 once the model is loaded; 503 (OpenAI error body) while it loads."""
    openai.ready()
    return {"status": "ok"}


@api.get("/metrics", tags=["server"], response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


@api.get("/v1/models", tags=["openai"], response_model=ModelList)
async def list_models(openai: OpenAIDep, key: KeyDep) -> dict[str, Any]:
    cards = [c for c in openai.model_cards() if key is None or key.allows(c["id"])]
    return {"object": "list", "data": cards}


@api.get("/v1/models/{model_id:path}", tags=["openai"], response_model=ModelCard)
async def retrieve_model(model_id: str, openai: OpenAIDep, key: KeyDep) -> dict[str, Any]:
    openai.check_model(model_id, key, embeddings=True)
    card = next((c for c in openai.model_cards() if c["id"] == model_id), None)
    if card is None:  # the embedding model is still loading
        raise APIError(503, f"The model '{model_id}' is still loading.", code="model_loading")
    return card


@api.post("/v1/chat/completions", tags=["openai"], responses={200: {"model": ChatCompletion}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, openai: OpenAIDep, key: KeyDep) -> Response:
    return await openai.chat(body, request, key)


@api.post("/v1/completions", tags=["openai"], responses={200: {"model": Completion}})
async def create_completion(body: CompletionRequest, request: Request, openai: OpenAIDep, key: KeyDep) -> Response:
    return await openai.complete(body, request, key)


@api.post("/tokenize", tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, openai: OpenAIDep, key: KeyDep) -> dict[str, Any]:
    return openai.tokenize(body, key)


@api.post("/detokenize", tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, openai: OpenAIDep, key: KeyDep) -> dict[str, Any]:
    return openai.detokenize(body, key)

