"""The logic behind the OpenAI routes: requests to prompts and sampling parameters, engine output to
OpenAI responses and Server-Sent Events, usage and metrics along the way.

Routes stay thin: each hands its validated request to a method here. Every body and every event is built
from the models in `lamina.api.openai.protocol`, the one source of the wire format. Streams follow OpenAI
exactly: the first chunk of each choice carries the role, text follows in `delta.content`, `finish_reason`
arrives on the last chunk of each choice with an empty delta, an optional usage chunk with `choices: []`,
then `data: [DONE]`. An error after the stream began becomes a final `data: {"error": ...}` event.

A request never outlives its client: a stream is cancelled by Starlette when the connection drops, and a
non-streamed request watches for the disconnect itself, so the engine aborts either within moments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import MISSING, BaseModel

from lamina.api.errors import APIError
from lamina.api.keys import APIKey
from lamina.api.loading import Loading
from lamina.api.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Citation,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    DeltaFunction,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCallOut,
    Health,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    ToolCallOut,
    TopLogprob,
    Usage,
    chat_messages,
)
from lamina.api.usage import UsageLog
from lamina.api.wire import ErrorResponse
from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.telemetry import Metrics
from lamina.llm import LLM
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.llm import ToolPlan
from lamina.llm.rag import Citation as Cited
from lamina.llm.text.stream import Delta, TokenLogprob
from lamina.llm.text.tools import CallDelta, ToolStream, split_calls

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
class Choice:
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


@dataclass
class _ChatRun:
    choices: list[Choice]
    admission: dict[str, str]
    head: dict[str, Any]
    cited: list[Citation] | None
    tools: ToolPlan | None
    top: int | None


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

    def health(self) -> Health:
        """200 once the model is loaded, else the 503 of `ready` (never waits: nothing here asks the engine)."""
        self.ready()
        return Health()

    def check_model(self, model: str | None, key: APIKey | None, *, embeddings: bool = False) -> None:
        served = {self.model_name, *self.adapters}
        served |= {self.rag.embedding_model} if embeddings and self.rag is not None else set()
        if model is not None and model not in served:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"{', '.join(repr(s) for s in sorted(served))} (see /v1/models).", code="model_not_found", param="model")
        if key is not None and not key.allows(model or self.model_name):
            raise APIError(403, f"This API key may not use the model '{model}'; it may use: {', '.join(key.models)}.",
                           code="model_not_allowed", param="model")

    def model_cards(self) -> list[ModelCard]:
        """The chat model, and the embedding model when one is served (`task` tells them apart)."""
        max_len = self.llm.config.max_seq_len if self.llm else None
        cards = [ModelCard(id=self.model_name, created=self.created, root=self.model_name, parent=None, max_model_len=max_len,
                           task="generate")]
        cards += [ModelCard(id=name, created=self.created, root=path, parent=self.model_name, max_model_len=max_len, task="generate")
                  for name, path in self.adapters.items()]
        if self.rag is not None and self.rag.embedder is not None:
            e = self.rag.embedder
            cards.append(ModelCard(id=e.name, created=self.created, root=e.name, parent=None, max_model_len=e.max_tokens, task="embed"))
        return cards

    def model_list(self, key: APIKey | None) -> ModelList:
        """The models this key may use."""
        return ModelList(data=[c for c in self.model_cards() if key is None or key.allows(c.id)])

    def model_card(self, model_id: str, key: APIKey | None) -> ModelCard:
        self.check_model(model_id, key, embeddings=True)
        card = next((c for c in self.model_cards() if c.id == model_id), None)
        if card is None:  # the embedding model is still loading
            raise APIError(503, f"The model '{model_id}' is still loading.", code="model_loading")
        return card

    # --- chat -----------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request, key: APIKey | None) -> JSONResponse | StreamingResponse:
        if req.stream:
            admission, chunks = await self.chat_stream(req, request, key)
            return _stream(chunks, "chat", admission)
        run = await self._chat_run(req, request, key)
        await self.collect(request, run.head["id"], run.choices)
        body = ChatCompletion(
            **run.head,
            choices=[ChatChoice(index=c.index, message=_message("".join(c.text), run.tools, c),
                                logprobs=_chat_logprobs(c.logprobs) if run.top is not None else None,
                                finish_reason=c.finish_reason)  # type: ignore[arg-type]
                     for c in run.choices],
            usage=self.usage_of(run.choices),
            citations=MISSING if run.cited is None else run.cited,
        )
        return _json(body, run.admission)

    async def chat_stream(self, req: ChatCompletionRequest, request: Request,
                          key: APIKey | None) -> tuple[dict[str, str], AsyncIterator[ChatCompletionChunk]]:
        """A streamed chat completion as chunk objects (the rate-limit headers, the chunks): what `chat` sends as
        Server-Sent Events, for callers in the server that read the chunks themselves (the web chat)."""
        run = await self._chat_run(req, request, key)
        return run.admission, self._chat_chunks(request, run.head, req, run.choices, run.cited, run.tools)

    async def _chat_run(self, req: ChatCompletionRequest, request: Request, key: APIKey | None) -> _ChatRun:
        """Checked, grounded, tokenised and admitted: a chat request ready to run."""
        self.check_model(req.model, key)
        llm = self.ready()
        messages, cited = req.chat_messages(), None
        if req.vector_store_ids:
            if self.rag is None:
                raise InvalidRequestError("this server has no vector stores", param="vector_store_ids")
            grounding = await run_in_threadpool(self.rag.ground, messages, req.vector_store_ids, req.max_num_results)
            messages, cited = grounding.messages, [_citation(c) for c in grounding.citations]
        plan = llm.tool_plan(req.openai_tools(), req.openai_tool_choice(), req.parallel_tool_calls)
        prompt_ids = llm.encode_chat(messages, tools=plan)
        top = (req.top_logprobs or 0) if req.logprobs else None
        tools = plan if plan is not None and plan.active else None
        choices = self._choices(req, [prompt_ids], req.max_completion_tokens or req.max_tokens, top, tools)
        admission = self._admit(request, key, req, choices)
        return _ChatRun(choices, admission, self._head(f"chatcmpl-{uuid.uuid4().hex}", req), cited, tools, top)

    async def _chat_chunks(self, request: Request, head: dict[str, Any], req: ChatCompletionRequest, choices: list[Choice],
                           cited: list[Citation] | None, tools: ToolPlan | None = None) -> AsyncIterator[ChatCompletionChunk]:
        usage = None if req.include_usage else MISSING  # present (null) on every chunk only when asked for
        citations = MISSING if cited is None else cited

        def chunk(index: int, delta: ChatDelta, finish: str | None = None, lps: list[TokenLogprob] | None = None) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=_chat_logprobs(lps) if lps else None,
                                     finish_reason=finish)  # type: ignore[arg-type]
            return ChatCompletionChunk(**head, usage=usage, choices=[choice], citations=MISSING if finish is None else citations)

        for c in choices:
            yield chunk(c.index, ChatDelta(role="assistant", content="", refusal=None))
        splitters = {c.index: ToolStream(tools.format) for c in choices} if tools is not None else {}
        async for c, delta in self.deltas(request, head["id"], choices):
            lps = delta.logprobs if req.logprobs else None
            if tools is None:
                if delta.text or lps:
                    yield chunk(c.index, ChatDelta(content=delta.text), None, lps)
                if delta.finish_reason is not None:
                    yield chunk(c.index, ChatDelta(), delta.finish_reason)
                continue
            split = splitters[c.index]
            content, calls = split.push(delta.text)
            if delta.finish_reason is not None:
                content += split.finish()
            if content or (lps and not calls):
                yield chunk(c.index, ChatDelta(content=content), None, lps)
                lps = None
            if calls:
                yield chunk(c.index, ChatDelta(tool_calls=_delta_calls(calls)), None, lps)
            if delta.finish_reason is not None:
                c.finish_reason = tools.finish_reason(split.calls, delta.finish_reason)
                yield chunk(c.index, ChatDelta(), c.finish_reason)
        if req.include_usage:
            yield ChatCompletionChunk(**head, usage=self.usage_of(choices), choices=[], citations=citations)

    # --- completions ----------------------------------------------------------------------------------

    async def complete(self, req: CompletionRequest, request: Request, key: APIKey | None) -> JSONResponse | StreamingResponse:
        self.check_model(req.model, key)
        llm = self.ready()
        prompts = self._prompts(req.prompt, llm)
        choices = self._choices(req, prompts, req.max_tokens, req.logprobs)
        admission = self._admit(request, key, req, choices)
        head = self._head(f"cmpl-{uuid.uuid4().hex}", req)
        echo = {c.index: llm.tokenizer.decode(c.prompt_ids) if req.echo else "" for c in choices}
        if req.stream:
            return _stream(self._completion_chunks(request, head, req, choices, echo), "completion", admission)
        await self.collect(request, head["id"], choices)
        body = Completion(
            **head,
            choices=[CompletionChoice(index=c.index, text=echo[c.index] + "".join(c.text),
                                      logprobs=_completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None,
                                      finish_reason=c.finish_reason)  # type: ignore[arg-type]
                     for c in choices],
            usage=self.usage_of(choices),
        )
        return _json(body, admission)

    async def _completion_chunks(self, request: Request, head: dict[str, Any], req: CompletionRequest, choices: list[Choice],
                                 echo: dict[int, str]) -> AsyncIterator[CompletionChunk]:
        usage = None if req.include_usage else MISSING

        def chunk(index: int, text: str, lps: CompletionLogprobs | None = None, finish: str | None = None) -> CompletionChunk:
            choice = CompletionChunkChoice(index=index, text=text, logprobs=lps, finish_reason=finish)  # type: ignore[arg-type]
            return CompletionChunk(**head, usage=usage, choices=[choice])

        offsets = {c.index: len(echo[c.index]) for c in choices}
        for c in choices:
            if echo[c.index]:
                yield chunk(c.index, echo[c.index])
        async for c, delta in self.deltas(request, head["id"], choices):
            lps = _completion_logprobs(delta.logprobs, offsets[c.index]) if req.logprobs is not None else None
            offsets[c.index] += len(delta.text)
            if delta.text or delta.finish_reason is not None or lps is not None:
                yield chunk(c.index, delta.text, lps, delta.finish_reason)
        if req.include_usage:
            yield CompletionChunk(**head, usage=self.usage_of(choices), choices=[])

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]], llm: LLM) -> list[list[int]]:
        tok = llm.tokenizer
        if isinstance(prompt, str):
            return [tok.encode(prompt)]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return [tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[arg-type]

    # --- shared ---------------------------------------------------------------------------------------

    def _head(self, request_id: str, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        """The fields every body and chunk of one response shares."""
        return {"id": request_id, "created": int(time.time()), "model": req.model or self.model_name,
                "system_fingerprint": self.fingerprint}

    def _choices(self, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]], max_tokens: int | None,
                 logprobs: int | None, tools: ToolPlan | None = None) -> list[Choice]:
        llm = self.ready()
        choices = []
        structured = req.structured_output()
        if tools is not None:
            if structured is not None:
                raise InvalidRequestError("give response_format (or structured_outputs) or tools, not both: each constrains the "
                                          "whole answer; use tool_choice none to answer in the format", param="response_format")
            structured = tools.grammar()
        for p, prompt_ids in enumerate(prompts):
            if not prompt_ids:  # text that the tokenizer turns into nothing
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
                    speculative_tokens=req.speculative_tokens,
                    ignore_eos=req.ignore_eos,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    # n choices differ, yet reproduce together; torch's generators are 64-bit and wrap a negative
                    # seed modulo 2**64 themselves, so every seed they took before means what it meant.
                    seed=None if req.seed is None else (req.seed + i) % 2**64,
                    stop=req.stops,
                    logprobs=logprobs,
                    structured=structured,
                )
                adapter = req.model if req.model in self.adapters else None
                llm.validate(prompt_ids, params, adapter)
                choices.append(Choice(p * req.n + i, prompt_ids, params, req.cache_salt or "", adapter))
        llm.check_capacity()
        return choices

    def _admit(self, request: Request, key: APIKey | None, req: ChatCompletionRequest | CompletionRequest,
               choices: list[Choice]) -> dict[str, str]:
        return self.admit(request, key, req.model or self.model_name, req.user, choices, req.unknown_fields())

    def admit(self, request: Request, key: APIKey | None, model: str, user: str | None, choices: list[Choice],
              unknown: list[str] | None = None) -> dict[str, str]:
        """Rate limits and the usage row for a request about to run `choices` (the rate-limit headers back)."""
        prompt_tokens = sum(len(p) for p in {id(c.prompt_ids): c.prompt_ids for c in choices}.values())
        reserve = prompt_tokens + sum(c.params.max_tokens for c in choices)
        admission = self.usage.admit(key, endpoint=request.url.path, method=request.method, model=model,
                                     reserve_tokens=reserve, user=user, limits=not getattr(request.state, "batch", False))
        request.state.usage = RequestUsage(admission.usage_id, prompt_tokens)
        if unknown:
            logger.info("ignoring unknown request fields %s", unknown)
        return admission.headers

    def usage_of(self, choices: list[Choice]) -> Usage:
        prompts = {id(c.prompt_ids): c for c in choices}.values()
        prompt_tokens = sum(len(c.prompt_ids) for c in prompts)
        completion = sum(c.completion_tokens for c in choices)
        cached = sum(c.cached_tokens for c in prompts)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    async def collect(self, request: Request, request_id: str, choices: list[Choice]) -> None:
        """Run every choice to its end, for a non-streamed response. A client that disconnects first cancels the
        run, which aborts the engine's requests (as leaving a stream does): nobody is left to read the answer."""

        async def drain() -> None:
            async for _ in self.deltas(request, request_id, choices):
                pass

        run, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((run, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            run.cancel()  # a no-op once it is done
            await asyncio.gather(run, gone, return_exceptions=True)
        if run.cancelled():
            raise APIError(499, "The client closed the connection before the response was ready.", code="client_closed_request")
        run.result()  # an engine error becomes the request's error

    async def deltas(self, request: Request, request_id: str, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
        """Every choice's deltas as they come (interleaved), with metrics and usage kept up to date."""
        llm = self.ready()
        m, name = self.metrics, self.model_name
        usage: RequestUsage | None = getattr(request.state, "usage", None)
        start = time.perf_counter()
        last: dict[int, float] = {}
        # Tenants never share cached prefixes: the key is part of every salt.
        key = getattr(request.state, "key", None)
        tenant = f"key{key.id}" if key is not None else "open"
        streams = [(c, llm.astream(c.prompt_ids, c.params, request_id=f"{request_id}-{c.index}", cache_salt=f"{tenant}|{c.salt}",
                                   adapter=c.adapter)) for c in choices]
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

    def tokenize(self, req: TokenizeRequest, key: APIKey | None) -> TokenizeResponse:
        self.check_model(req.model, key)
        llm = self.ready()
        if req.messages is not None:
            tokens = llm.encode_chat(chat_messages(req.messages), add_generation_prompt=req.add_generation_prompt)
        else:
            tokens = llm.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=llm.config.max_seq_len, tokens=tokens)

    def detokenize(self, req: DetokenizeRequest, key: APIKey | None) -> DetokenizeResponse:
        self.check_model(req.model, key)
        llm = self.ready()
        vocab = llm.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=llm.tokenizer.decode(req.tokens))


def _message(text: str, tools: ToolPlan | None, c: Choice) -> ChatCompletionMessage:
    """A whole answer: with tools, its calls split from its content (which is null when there is none)."""
    if tools is None:
        return ChatCompletionMessage(content=text)
    content, calls = split_calls(tools.format, text)
    c.finish_reason = tools.finish_reason(calls, c.finish_reason or "stop")
    out = [ToolCallOut(id=t.id, function=FunctionCallOut(name=t.name, arguments=t.arguments)) for t in calls]
    return ChatCompletionMessage(content=content or None, tool_calls=out if out else MISSING)


def _delta_calls(calls: list[CallDelta]) -> list[DeltaToolCall]:
    """Call deltas in OpenAI's form, one entry per call index: id, type and name on its first, then argument fragments."""
    merged: dict[int, tuple[CallDelta | None, str]] = {}
    for d in calls:
        first, args = merged.get(d.index, (None, ""))
        merged[d.index] = (first or (d if d.name is not None else None), args + d.arguments)
    out = []
    for index, (first, args) in merged.items():
        if first is not None:
            out.append(DeltaToolCall(index=index, id=first.id, type="function", function=DeltaFunction(name=first.name, arguments=args)))
        else:
            out.append(DeltaToolCall(index=index, function=DeltaFunction(arguments=args)))
    return out


async def _disconnected(request: Request) -> None:
    """Return once the client has gone. The body has been read, so the next ASGI message can only say so."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(body: BaseModel, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def _sse(payload: BaseModel) -> str:
    # json.dumps of the dumped model rather than `model_dump_json`: the bytes stay what they were (Python's float
    # spelling), which OpenAI-compatible clients and the byte-for-byte tests read.
    return f"data: {json.dumps(payload.model_dump(mode='json'), ensure_ascii=False, separators=(',', ':'))}\n\n"


def _stream(chunks: AsyncIterator[BaseModel], what: str, headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(_events(chunks, what), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def _events(chunks: AsyncIterator[BaseModel], what: str) -> AsyncIterator[str]:
    """The Server-Sent Events of a stream of chunks: each as `data:`, an error as the last one, then [DONE]."""
    async with aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except LaminaError as e:
            yield _sse(ErrorResponse.of(e))
        except Exception:
            logger.exception("error in a %s stream", what)
            yield _sse(ErrorResponse.internal())
    yield "data: [DONE]\n\n"


def _citation(c: Cited) -> Citation:
    return Citation(index=c.index, file_id=c.file_id, filename=c.filename, page=c.page, score=round(c.score, 6),
                    snippet=c.snippet, vector_store_id=c.vector_store_id)


async def _merge(streams: list[tuple[Choice, AsyncIterator[Delta]]]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Interleave several choices' streams; leaving early (or an error in one) closes them all."""
    if len(streams) == 1:
        c, stream = streams[0]
        try:
            async for delta in stream:
                yield c, delta
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[Choice, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(c: Choice, stream: AsyncIterator[Delta]) -> None:
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


def _chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.bytes),
                         top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in lp.top_logprobs])
        for lp in lps])


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(lp.token)
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps],
                              top_logprobs=[{t.token: t.logprob for t in lp.top_logprobs} for lp in lps], text_offset=offsets)
