"""A web chat reply: one request that streams the answer (and any tool calls) and saves the conversation.

`POST /api/conversations/{id}/reply` takes the conversation as the page holds it (ending with the new user
message) and the reply's settings, and answers with Server-Sent Events, each a JSON object with a `type`:

    delta        {"content": "..."}                      text of the answer as it is generated
    tool_call    {"id", "name", "arguments"}             a call the model made (tools enabled)
    tool_result  {"id", "name", "result", "is_error"}    what the tool gave back
    citations    {"citations": [...]}                    the passages of a grounded answer (a store, no tools)
    done         {"message": {...}}                      the saved reply: content and meta (tokens, tok/s, tools)
    error        {"message": "..."}                      what went wrong (the partial reply is still saved)

The server saves the conversation when the reply ends, also when the page stops it (meta.stopped), so a reply
costs the page one request. Without tools the reply is a chat completion through the API's own service (rate
limits, usage, grounding in a store); with tools it is an agent run (`ToolRunner`, given by the composition
root, so the web chat imports no other application) whose turns go through the same service.
Tokens per second are generated tokens (the engine's count) over the time from the first one to the last.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from pydantic import MISSING, BaseModel, Field, ValidationError

from lamina.api.openai.protocol import ChatCompletionRequest
from lamina.apps.webchat.store import ConversationStore
from lamina.errors import InvalidRequestError, LaminaError
from lamina.llm.text.tools import ToolCall

TurnFn = Callable[[list[dict[str, Any]], list[dict[str, Any]], str, Any], Awaitable[Any]]


class ToolRunner(Protocol):
    """Tools for the web chat: what can be enabled, and an agent run over the enabled ones."""

    model: str | None
    """The served model the tool turns ask for (a tool-use adapter), or None for the page's model."""

    async def available(self, store: str | None) -> list[dict[str, Any]]:
        """[{"name", "description", "source"}] of the tools a conversation can enable (with `store` chosen)."""
        ...

    async def run(self, history: list[dict[str, Any]], task: str, enabled: list[str], store: str | None, turn: TurnFn,
                  on_step: Callable[[str, dict[str, Any]], None], temperature: float, top_p: float) -> Any:
        """An agent run whose turns go through `turn` and whose steps reach `on_step(kind, data)`; returns the run
        (`answer`, `status`, `completion_tokens`)."""
        ...


class StoredMessage(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str
    meta: dict[str, Any] = Field(default_factory=dict)


class ReplyRequest(BaseModel):
    messages: list[StoredMessage] = Field(min_length=1, max_length=10_000)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    system: str = Field(default="", max_length=20_000)
    store: str | None = None
    tools: list[str] = Field(default_factory=list, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1)
    reply_id: str = Field(default="", max_length=64)
    """The page's name for this reply, saved in its meta (how the page finds it after a stop)."""


def _event(kind: str, **data: Any) -> str:
    return f"data: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class Replies:
    def __init__(self, store: ConversationStore, openai: Any, tools: ToolRunner | None) -> None:
        self.store, self.openai, self.tools = store, openai, tools

    def sampling(self, body: ReplyRequest) -> tuple[float, float]:
        """The reply's temperature and top_p: what the page sent, else the model's defaults."""
        defaults = self.openai.ready().sampling_defaults
        temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 0.7)
        top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
        return temperature, top_p

    async def stream(self, request: Request, key: Any, owner: int | None, conversation_id: str,
                     body: ReplyRequest) -> AsyncIterator[str]:
        self.store.get(owner, conversation_id)  # a 404 before anything streams
        if body.messages[-1].role != "user":
            raise InvalidRequestError("the conversation must end with the user's message", param="messages")
        if body.tools and self.tools is None:
            raise InvalidRequestError("this server offers no tools to the web chat", param="tools")
        if body.tools:
            offered = {t["name"] for t in await self.tools.available(body.store)}
            unknown = [t for t in body.tools if t not in offered]
            if unknown:
                raise InvalidRequestError(f"no tool {', '.join(map(repr, unknown))} here; the tools are: "
                                          f"{', '.join(sorted(offered))} (file_search needs a store)", param="tools")
        reply: dict[str, Any] = {"role": "assistant", "content": "", "meta": {"reply_id": body.reply_id} if body.reply_id else {}}
        saved = [m.model_dump() for m in body.messages]
        clock = {"first": None, "last": None}
        return self._events(request, key, owner, conversation_id, body, reply, saved, clock)

    async def _events(self, request: Request, key: Any, owner: int | None, conversation_id: str, body: ReplyRequest,
                      reply: dict[str, Any], saved: list[dict[str, Any]], clock: dict[str, Any]) -> AsyncIterator[str]:
        meta = reply["meta"]
        temperature, top_p = self.sampling(body)
        history = [{"role": m.role, "content": m.content} for m in body.messages]
        if body.system.strip():
            history.insert(0, {"role": "system", "content": body.system.strip()})
        finished = False
        try:
            if body.tools:
                async for text in self._agent(request, key, body, history, reply, clock, temperature, top_p):
                    yield text
            else:
                async for text in self._chat(request, key, body, history, reply, clock, temperature, top_p):
                    yield text
            finished = True
        except LaminaError as e:
            meta["error"] = e.message
            yield _event("error", message=e.message)
            finished = True
        except ValidationError as e:  # a request built from the page's values that the API refuses
            meta["error"] = str(e.errors()[0].get("msg")) if e.errors() else str(e)
            yield _event("error", message=meta["error"])
            finished = True
        finally:
            if not finished:
                meta["stopped"] = True  # the page went away or pressed stop
            first, last = clock["first"], clock["last"]
            tokens = meta.get("completion_tokens", 0)
            if first is not None and last is not None and last > first and tokens > 1:
                meta["tokens_per_second"] = (tokens - 1) / (last - first)
            stored = self.store.replace_messages(owner, conversation_id, [*saved, reply])
            if stored["title"] == "New chat":  # named after its first message, here: the page makes no request for it
                first = next((m["content"] for m in saved if m["role"] == "user"), "")
                title = " ".join(first.split())[:48] or "New chat"
                stored = self.store.update(owner, conversation_id, title, None)
        yield _event("done", message=reply, title=stored["title"])

    async def _chat(self, request: Request, key: Any, body: ReplyRequest, history: list[dict[str, Any]], reply: dict[str, Any],
                    clock: dict[str, Any], temperature: float, top_p: float) -> AsyncIterator[str]:
        req = ChatCompletionRequest.model_validate({
            "model": body.model or self.openai.model_name, "messages": history, "temperature": temperature, "top_p": top_p,
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": body.max_tokens,
            **({"vector_store_ids": [body.store]} if body.store else {}),
        })
        _, chunks = await self.openai.chat_stream(req, request, key)
        async for chunk in chunks:
            reply["meta"]["completion_tokens"] = _generated(request)  # kept current: a stopped reply has its count too
            if _got(chunk.usage):
                reply["meta"]["completion_tokens"] = chunk.usage.completion_tokens
            citations = _got(getattr(chunk, "citations", None))
            if isinstance(citations, list) and citations:
                reply["meta"]["citations"] = [c.model_dump(mode="json") for c in citations]
                yield _event("citations", citations=reply["meta"]["citations"])
            for choice in chunk.choices:
                text = _got(choice.delta.content)
                if text:
                    clock["first"] = clock["first"] or time.perf_counter()
                    clock["last"] = time.perf_counter()
                    reply["content"] += text
                    yield _event("delta", content=text)

    async def _agent(self, request: Request, key: Any, body: ReplyRequest, history: list[dict[str, Any]], reply: dict[str, Any],
                     clock: dict[str, Any], temperature: float, top_p: float) -> AsyncIterator[str]:
        """The agent runs as a task; its turns and steps put events in a queue that this generator empties."""
        assert self.tools is not None
        events: asyncio.Queue[str | None] = asyncio.Queue()
        steps: list[dict[str, Any]] = []
        reply["meta"]["tools"] = steps
        tokens = {"n": 0}

        async def turn(messages: list[dict[str, Any]], specs: list[dict[str, Any]], choice: str, params: Any) -> Any:
            req = ChatCompletionRequest.model_validate({
                "model": self.tools.model or body.model or self.openai.model_name, "messages": messages, "tools": specs, "tool_choice": choice,
                "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}})
            _, chunks = await self.openai.chat_stream(req, request, key)
            content, calls, finish, usage = [], {}, "stop", None
            started = time.perf_counter()
            try:
                async for chunk in chunks:
                    usage = _got(chunk.usage) or usage
                    reply["meta"]["completion_tokens"] = tokens["n"] + _generated(request)
                    self._turn_chunk(chunk, content, calls, clock, events)
                    finish = next((c.finish_reason for c in chunk.choices if _got(c.finish_reason)), finish)
            finally:
                self._finish_turn(request, started)
            made = [ToolCall(c["name"], c["arguments"], c["id"]) for _, c in sorted(calls.items())]
            prompt_tokens = usage.prompt_tokens if usage else 0
            completion_tokens = usage.completion_tokens if usage else 0
            tokens["n"] += completion_tokens
            reply["meta"]["completion_tokens"] = tokens["n"]
            return _Turn("".join(content), made, prompt_tokens, completion_tokens, finish)

        def on_step(kind: str, data: dict[str, Any]) -> None:
            if kind == "model":
                for call in data["tool_calls"]:
                    steps.append({"id": call["id"], "name": call["name"], "arguments": call["arguments"]})
                    events.put_nowait(_event("tool_call", **call))
                if data["tool_calls"] and data["content"]:
                    events.put_nowait(_event("delta", content="\n\n"))
            elif kind == "tool":
                for s in steps:
                    if s["id"] == data["call_id"]:
                        s.update(result=data["result"], is_error=data["is_error"])
                events.put_nowait(_event("tool_result", id=data["call_id"], name=data["name"], result=data["result"],
                                         is_error=data["is_error"]))

        async def go() -> Any:
            try:
                return await self.tools.run(history[:-1], history[-1]["content"], body.tools, body.store, turn, on_step,
                                            temperature, top_p)
            finally:
                events.put_nowait(None)

        task = asyncio.ensure_future(go())
        try:
            while (item := await events.get()) is not None:
                yield item
            run = await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        reply["content"] = run.answer
        reply["meta"]["status"] = run.status

    @staticmethod
    def _turn_chunk(chunk: Any, content: list[str], calls: dict[int, dict[str, str]], clock: dict[str, Any],
                    events: asyncio.Queue[str | None]) -> None:
        for choice in chunk.choices:
            text, made = _got(choice.delta.content), _got(choice.delta.tool_calls)
            if text or made:
                clock["first"] = clock["first"] or time.perf_counter()
                clock["last"] = time.perf_counter()
            if text:
                content.append(text)
                events.put_nowait(_event("delta", content=text))
            for call in made or []:
                slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = _got(call.id) or slot["id"]
                fn = _got(call.function)
                if fn is not None:
                    slot["name"] += _got(fn.name) or ""
                    slot["arguments"] += _got(fn.arguments) or ""

    def _finish_turn(self, request: Request, started: float) -> None:
        """Close the usage row of one agent turn (a reply with tools makes several chat requests in one HTTP
        request; the API's middleware closes only the last one it sees)."""
        usage = getattr(request.state, "usage", None)
        if usage is not None:
            self.openai.usage.finish(usage.usage_id, status=200, latency_ms=(time.perf_counter() - started) * 1000,
                                     prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            request.state.usage = None


def _got(value: Any) -> Any:
    """A chunk field's value, None where OpenAI's shape omits it (pydantic's MISSING)."""
    return None if value is MISSING else value


def _generated(request: Request) -> int:
    """Tokens generated so far for the request being streamed (the engine's count, which the API keeps)."""
    usage = getattr(request.state, "usage", None)
    return usage.completion_tokens if usage is not None else 0


class _Turn:
    """A turn's result in the shape the agent loop reads (content, calls, token counts, finish reason)."""

    def __init__(self, content: str, calls: list[ToolCall], prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        self.content, self.calls = content, calls
        self.prompt_tokens, self.completion_tokens, self.finish_reason = prompt_tokens, completion_tokens, finish_reason
