"""The HTTP routes: thin, each hands its validated request to a service (`lamina.api.openai.serving`).

Each declares its response model, so /openapi.json describes the bytes sent; streams (`"stream": true`)
send the chunk models of `lamina.api.openai.protocol` as Server-Sent Events, published under
`text/event-stream` beside the JSON body.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from lamina.api.deps import KeyDep, OpenAIDep, ResponsesDep, ServicesDep, authenticate
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
from lamina.api.openai.responses_protocol import InputItemList, ResponseCreate, ResponseDeleted, ResponseEvent
from lamina.api.openai.responses_protocol import Response as ResponseObject
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


@api.post("/v1/responses", tags=["openai"], response_model=ResponseObject, responses=event_stream(ResponseEvent))
async def create_response(body: ResponseCreate, request: Request, responses: ResponsesDep, key: KeyDep) -> Response:
    """OpenAI's Responses API: input items, function tools, hosted file_search, text.format, stored threads."""
    return await responses.create(body, request, key)


@api.get("/v1/responses/{response_id}", tags=["openai"], response_model=ResponseObject)
async def get_response(response_id: str, responses: ResponsesDep, key: KeyDep) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse(responses.get(response_id, key))


@api.delete("/v1/responses/{response_id}", tags=["openai"])
async def delete_response(response_id: str, responses: ResponsesDep, key: KeyDep) -> ResponseDeleted:
    return responses.delete(response_id, key)


@api.get("/v1/responses/{response_id}/input_items", tags=["openai"])
async def list_input_items(response_id: str, responses: ResponsesDep, key: KeyDep, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None) -> InputItemList:
    return responses.input_items(response_id, key, limit=limit, order=order, after=after)
