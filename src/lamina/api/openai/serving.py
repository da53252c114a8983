"""The logic behind the OpenAI routes: requests to prompts and sampling parameters, engine output to
OpenAI responses and Server-Sent Events, usage and metrics along the way.

Routes stay thin: each hands its validated request to a method here. Streams follow OpenAI exactly: the
first chunk of each choice carries the role, text follows in `delta.content`, `finish_reason` arrives on the
last chunk of each choice with an empty delta, an optional usage chunk with `choices: []`, then
`data: [DONE]`. An error after the stream began becomes a final `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from lamina.api.errors import APIError
from lamina.api.keys import APIKey
from lamina.api.loading import Loading
from lamina.api.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lamina.api.usage import UsageLog
from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.telemetry import Metrics
from lamina.llm import LLM
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.text.stream import Delta, TokenLogprob

if TYPE_CHECKING:
    from lamina.api.rag.service import RagService

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass
class RequestUsage:
    """What the usage middleware writes when the response is done; filled in as tokens are produced."""

    usage_id: int
    prompt_tokens: int
    completion_tokens: int = 0


@dataclass
class _Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    salt: str = ""
    adapter: str | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


class OpenAIService:
    def __init__(self, model_name: str, usage: UsageLog, metrics: Metrics, fingerprint: str, llm: Loading[LLM], *,
                 rag: RagService | None = None, adapters: dict[str, str] | None = None) -> None:
        self.model_name = model_name
        self.usage = usage
        self.metrics = metrics
        self.fingerprint = fingerprint
        self.loading = llm
        """The chat model, filled by the app's loader thread (503 until then)."""
        self.created = int(time.time())
        self.rag = rag
        """Retrieval for grounded chat (`vector_store_ids`)."""
        self.adapters = dict(adapters or {})
        """LoRA adapters served beside the base model: name (a request's `model`) -> folder."""

    # --- state ----------------------------------------------------------------------------------------

    @property
    def llm(self) -> LLM | None:
        """The loaded model, or None while it loads (or failed to)."""
        return self.loading.value

    def ready(self) -> LLM:
        return self.loading.get()

    def check_model(self, model: str | None, key: APIKey | None, *, embeddings: bool = False) -> None:
        served = {self.model_name, *self.adapters}
        served |= {self.rag.embedding_model} if embeddings and self.rag is not None else set()
        if model is not None and model not in served:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"{', '.join(repr(s) for s in sorted(served))} (see /v1/models).", code="model_not_found", param="model")
        if key is not None and not key.allows(model or self.model_name):
            raise APIError(403, f"This API key may not use the model '{model}'; it may use: {', '.join(key.models)}.",
                           code="model_not_allowed", param="model")

    def model_cards(self) -> list[dict[str, Any]]:
        """The chat model, and the embedding model when one is served (`task` tells them apart)."""
        max_len = self.llm.config.max_seq_len if self.llm else None
        cards = [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lamina",
                  "root": self.model_name, "parent": None, "max_model_len": max_len, "task": "generate"}]
        cards += [{"id": name, "object": "model", "created": self.created, "owned_by": "lamina", "root": path,
                   "parent": self.model_name, "max_model_len": max_len, "task": "generate"}
                  for name, path in self.adapters.items()]
        if self.rag is not None and self.rag.embedder is not None:
            e = self.rag.embedder
            cards.append({"id": e.name, "object": "model", "created": self.created, "owned_by": "lamina", "root": e.name,
                          "parent": None, "max_model_len": e.max_tokens, "task": "embed"})
        return cards

    # --- chat -----------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request, key: APIKey | None) -> JSONResponse | StreamingResponse:
        self.check_model(req.model, key)
        llm = self.ready()
        messages, cited = req.chat_messages(), []
        if req.vector_store_ids:
            if self.rag is None:
                raise InvalidRequestError("this server has no vector stores", param="vector_store_ids")
            grounding = await run_in_threadpool(self.rag.ground, messages, req.vector_store_ids, req.max_num_results)
            messages, cited = grounding.messages, [c.to_dict() for c in grounding.citations]
        prompt_ids = llm.encode_chat(messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        choices = self._choices(req, [prompt_ids], max_tokens, top)
        admission = self._admit(request, key, req, choices)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            stream = self._chat_events(request, request_id, req, choices, cited)
            return StreamingResponse(stream, media_type="text/event-stream", headers={**SSE_HEADERS, **admission})
        await self._run(request, choices)
        body = {
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": req.model or self.model_name,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                 "logprobs": {"content": [_chat_logprob(lp) for lp in c.logprobs]} if top is not None else None,
                 "finish_reason": c.finish_reason}
                for c in choices
            ],
            "usage": self._usage(choices),
        }
        if req.vector_store_ids:
            body["citations"] = cited
        return JSONResponse(body, headers=admission)

    async def _chat_events(self, request: Request, request_id: str, req: ChatCompletionRequest, choices: list[_Choice],
                           cited: list[dict[str, Any]]) -> AsyncIterator[str]:
        base: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": req.model or self.model_name, "system_fingerprint": self.fingerprint}
        if req.include_usage:
            base["usage"] = None
        logprobs = req.logprobs

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lps: list[TokenLogprob] | None = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": {"content": [_chat_logprob(lp) for lp in lps]} if lps else None,
                      "finish_reason": finish}
            extra = {"citations": cited} if finish is not None and req.vector_store_ids else {}
            return _sse({**base, "choices": [choice], **extra})

        try:
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": "", "refusal": None})
            async for c, delta in self._deltas(request, choices):
                if delta.text or (logprobs and delta.logprobs):
                    yield chunk(c.index, {"content": delta.text}, None, delta.logprobs if logprobs else None)
                if delta.finish_reason is not None:
                    yield chunk(c.index, {}, delta.finish_reason)
            if req.include_usage:
                extra = {"citations": cited} if req.vector_store_ids else {}
                yield _sse({**base, "choices": [], "usage": self._usage(choices), **extra})
        except LaminaError as e:
            yield _sse(e.to_dict())
        except Exception:
            logger.exception("error in a chat stream")
            yield _sse({"error": {"message": "The server had an internal error; it has been logged.", "type": "server_error",
                                  "param": None, "code": "internal_error"}})
        yield "data: [DONE]\n\n"

    # --- completions ----------------------------------------------------------------------------------

    async def complete(self, req: CompletionRequest, request: Request, key: APIKey | None) -> JSONResponse | StreamingResponse:
        self.check_model(req.model, key)
        llm = self.ready()
        if req.echo and req.logprobs is not None:
            raise InvalidRequestError("echo with logprobs is not supported by Lamina yet (no prompt logprobs)", param="echo")
        prompts = self._prompts(req.prompt, llm)
        choices = self._choices(req, prompts, req.max_tokens, req.logprobs)
        admission = self._admit(request, key, req, choices)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        echo = {c.index: llm.tokenizer.decode(c.prompt_ids) if req.echo else "" for c in choices}
        if req.stream:
            return StreamingResponse(self._completion_events(request, request_id, req, choices, echo), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **admission})
        await self._run(request, choices)
        body = {
            "id": request_id, "object": "text_completion", "created": int(time.time()), "model": req.model or self.model_name,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": c.index, "text": echo[c.index] + "".join(c.text),
                         "logprobs": _completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": self._usage(choices),
        }
        return JSONResponse(body, headers=admission)

    async def _completion_events(self, request: Request, request_id: str, req: CompletionRequest, choices: list[_Choice],
                                 echo: dict[int, str]) -> AsyncIterator[str]:
        base: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                                "model": req.model or self.model_name, "system_fingerprint": self.fingerprint}
        if req.include_usage:
            base["usage"] = None
        offsets = {c.index: len(echo[c.index]) for c in choices}
        try:
            for c in choices:
                if echo[c.index]:
                    yield _sse({**base, "choices": [{"index": c.index, "text": echo[c.index], "logprobs": None, "finish_reason": None}]})
            async for c, delta in self._deltas(request, choices):
                lps = _completion_logprobs(delta.logprobs, offsets[c.index]) if req.logprobs is not None else None
                offsets[c.index] += len(delta.text)
                if delta.text or delta.finish_reason is not None or lps:
                    yield _sse({**base, "choices": [{"index": c.index, "text": delta.text, "logprobs": lps,
                                                     "finish_reason": delta.finish_reason}]})
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage(choices)})
        except LaminaError as e:
            yield _sse(e.to_dict())
        except Exception:
            logger.exception("error in a completion stream")
            yield _sse({"error": {"message": "The server had an internal error; it has been logged.", "type": "server_error",
                                  "param": None, "code": "internal_error"}})
        yield "data: [DONE]\n\n"

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]], llm: LLM) -> list[list[int]]:
        tok = llm.tokenizer
        if isinstance(prompt, str):
            return [tok.encode(prompt)]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        out = []
        for p in prompt:
            ids = tok.encode(p) if isinstance(p, str) else list(p)  # type: ignore[arg-type]
            if not ids:
                raise InvalidRequestError("a prompt is empty: give some text or token ids", param="prompt")
            out.append(ids)
        return out

    # --- shared ---------------------------------------------------------------------------------------

    def _choices(self, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]], max_tokens: int | None,
                 logprobs: int | None) -> list[_Choice]:
        llm = self.ready()
        choices = []
        for p, prompt_ids in enumerate(prompts):
            if not prompt_ids:
                raise InvalidRequestError("the prompt is empty: give some text", param="prompt")
            limit = max_tokens or max(1, llm.config.max_seq_len - len(prompt_ids))
            for i in range(req.n):
                params = SamplingParams(
                    max_tokens=limit,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=req.top_k or 0,
                    min_p=req.min_p or 0.0,
                    repetition_penalty=req.repetition_penalty or 1.0,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    seed=None if req.seed is None else req.seed + i,  # n choices differ, yet reproduce together
                    stop=tuple([req.stop] if isinstance(req.stop, str) else req.stop or ()),
                    logprobs=logprobs,
                )
                adapter = req.model if req.model in self.adapters else None
                llm.validate(prompt_ids, params, adapter)
                choices.append(_Choice(p * req.n + i, prompt_ids, params, req.cache_salt or "", adapter))
        llm.check_capacity()
        return choices

    def _admit(self, request: Request, key: APIKey | None, req: ChatCompletionRequest | CompletionRequest,
               choices: list[_Choice]) -> dict[str, str]:
        prompt_tokens = sum(len(p) for p in {id(c.prompt_ids): c.prompt_ids for c in choices}.values())
        reserve = prompt_tokens + sum(c.params.max_tokens for c in choices)
        admission = self.usage.admit(key, endpoint=request.url.path, method=request.method, model=req.model or self.model_name,
                                     reserve_tokens=reserve, user=req.user)
        request.state.usage = RequestUsage(admission.usage_id, prompt_tokens)
        unknown = req.unknown_fields()
        if unknown:
            logger.info("ignoring unknown request fields %s", unknown)
        return admission.headers

    def _usage(self, choices: list[_Choice]) -> dict[str, Any]:
        prompts = {id(c.prompt_ids): c for c in choices}.values()
        prompt_tokens = sum(len(c.prompt_ids) for c in prompts)
        completion = sum(c.completion_tokens for c in choices)
        cached = sum(c.cached_tokens for c in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _run(self, request: Request, choices: list[_Choice]) -> None:
        async for _ in self._deltas(request, choices):
            pass

    async def _deltas(self, request: Request, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Delta]]:
        """Every choice's deltas as they come (interleaved), with metrics and usage kept up to date."""
        llm = self.ready()
        m, name = self.metrics, self.model_name
        usage: RequestUsage | None = getattr(request.state, "usage", None)
        start = time.perf_counter()
        last: dict[int, float] = {}
        # Tenants never share cached prefixes: the key is part of every salt.
        key = getattr(request.state, "key", None)
        tenant = f"key{key.id}" if key is not None else "open"
        streams = [(c, llm.astream(c.prompt_ids, c.params, cache_salt=f"{tenant}|{c.salt}", adapter=c.adapter)) for c in choices]
        for c in {id(c.prompt_ids): c for c in choices}.values():
            m.prompt_tokens.labels(name).inc(len(c.prompt_ids))
            m.request_prompt_tokens.labels(name).observe(len(c.prompt_ids))
        async for c, delta in _merge(streams):
            now = time.perf_counter()
            if c.index in last:
                m.inter_token_latency.labels(name).observe(now - last[c.index])
            else:
                m.time_to_first_token.labels(name).observe(now - start)
                c.cached_tokens = delta.cached_tokens
            last[c.index] = now
            n = len(delta.token_ids)
            c.completion_tokens += n
            c.text.append(delta.text)
            c.logprobs += delta.logprobs
            m.generation_tokens.labels(name).inc(n)
            if usage is not None:
                usage.completion_tokens += n
            if delta.finish_reason is not None:
                c.finish_reason = delta.finish_reason
                m.request_success.labels(name, delta.finish_reason).inc()
                m.request_generation_tokens.labels(name).observe(c.completion_tokens)
                m.e2e_request_latency.labels(name).observe(now - start)
            yield c, delta

    # --- tokenizer ------------------------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest, key: APIKey | None) -> dict[str, Any]:
        self.check_model(req.model, key)
        llm = self.ready().llm
        if req.messages is not None:
            chat = ChatCompletionRequest(model=self.model_name, messages=req.messages)
            tokens = llm.encode_chat(chat.chat_messages(), add_generation_prompt=req.add_generation_prompt)
        else:
            tokens = llm.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": llm.config.max_seq_len, "tokens": tokens}

    def detokenize(self, req: DetokenizeRequest, key: APIKey | None) -> dict[str, Any]:
        self.check_model(req.model, key)
        llm = self.ready().llm
        vocab = llm.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens)}


async def _merge(streams: list[tuple[_Choice, AsyncIterator[Delta]]]) -> AsyncIterator[tuple[_Choice, Delta]]:
    """Interleave several choices' streams; leaving early (or an error in one) closes them all."""
    if len(streams) == 1:
        c, stream = streams[0]
        try:
            async for delta in stream:
                yield c, delta
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[_Choice, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(c: _Choice, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((c, delta))
        except Exception as e:
            await queue.put((c, e))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c, s)) for c, s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            c, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in lp.top_logprobs]}


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(lp.token)
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in lps], "text_offset": offsets}

