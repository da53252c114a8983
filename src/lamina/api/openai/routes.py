"""The HTTP routes: thin, each hands its validated request to a service (`lamina.api.openai.serving`).

Each declares its response model, so /openapi.json describes the bytes sent; streams (`"stream": true`)
send the chunk models of `lamina.api.openai.protocol` as Server-Sent Events, published under
`text/event-stream` beside the JSON body.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lamina.api.deps import KeyDep, OpenAIDep, ServicesDep, authenticate
from lamina.api.errors import ERRORS
from lamina.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from lamina.api.wire import event_stream
from lamina.infra.telemetry import CONTENT_TYPE

public = APIRouter()
api = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


@public.get("/health", tags=["server"], responses={503: ERRORS[503]})
async def health(openai: OpenAIDep) -> Health:
    """200 once the model is loaded; 503 (OpenAI error body) while it loads."""
    return openai.health()


@api.get("/metrics", tags=["server"], response_class=Response,
         responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus' text format."}})
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


@api.get("/v1/models", tags=["openai"])
async def list_models(openai: OpenAIDep, key: KeyDep) -> ModelList:
    return openai.model_list(key)


@api.get("/v1/models/{model_id:path}", tags=["openai"])
async def retrieve_model(model_id: str, openai: OpenAIDep, key: KeyDep) -> ModelCard:
    return openai.model_card(model_id, key)


@api.post("/v1/chat/completions", tags=["openai"], response_model=ChatCompletion, responses=event_stream(ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request, openai: OpenAIDep, key: KeyDep) -> Response:
    return await openai.chat(body, request, key)


@api.post("/v1/completions", tags=["openai"], response_model=Completion, responses=event_stream(CompletionChunk))
async def create_completion(body: CompletionRequest, request: Request, openai: OpenAIDep, key: KeyDep) -> Response:
    return await openai.complete(body, request, key)


@api.post("/tokenize", tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, openai: OpenAIDep, key: KeyDep) -> TokenizeResponse:
    return openai.tokenize(body, key)


@api.post("/detokenize", tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, openai: OpenAIDep, key: KeyDep) -> DetokenizeResponse:
    return openai.detokenize(body, key)
