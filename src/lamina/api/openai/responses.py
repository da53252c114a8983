"""OpenAI's Responses API over the same engine as chat completions: `POST /v1/responses` (streamed or not),
`GET` and `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

A response turns into a chat: `instructions` become the system message (for this response only, as OpenAI has
it), the input items and, with `previous_response_id`, the stored input and output of every earlier response
of the thread become the conversation (a `function_call` item an assistant turn with that call, a
`function_call_output` the tool message answering it). Function tools, `tool_choice` and `text.format` go through
the chat path's tools and grammars, so calls and formats are enforced the same way.

`file_search` is a hosted tool: when a response offers it (and tool_choice is not none or a named function), the
server searches the given vector stores for the last user message before the model answers, inside the one
response; the answer is grounded in the passages, a `file_search_call` item records the search (with its results
when `include` asks for `file_search_call.results`), and each [n] the answer cites becomes a `file_citation`
annotation. Lamina searches on every such turn rather than letting the model decide: a 135M model cannot judge
when to search, and a search it does not need costs milliseconds. (OpenAI lets the model choose; none of the open
servers offers file_search at all.)

Stored responses (`store`, true by default) live in the `responses` table, per API key: another key's response is
a 404, as is an unknown `previous_response_id`. Nothing is stored for a request that fails validation.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from lamina.api.errors import APIError
from lamina.api.keys import APIKey
from lamina.api.openai.responses_protocol import (
    FileCitation,
    FileSearchCallOut,
    FileSearchResult,
    FileSearchTool,
    FunctionCallItem,
    FunctionCallOut,
    FunctionCallOutputItem,
    FunctionTool,
    HostedToolChoice,
    IncompleteDetails,
    InputItemList,
    InputMessage,
    InputTokensDetails,
    NamedFunctionChoice,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    Response,
    ResponseCreate,
    ResponseDeleted,
    ResponseError,
    ResponseUsage,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)
from lamina.api.openai.serving import SSE_HEADERS, Choice, OpenAIService
from lamina.api.wire import ErrorResponse
from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.db import Database
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.llm import ToolPlan, structured_output
from lamina.llm.text.tools import ToolStream, split_calls

if TYPE_CHECKING:
    from lamina.api.rag.service import RagService

MIGRATIONS = {
    "sqlite": [
        """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key_id INTEGER NOT NULL,
            created_at REAL NOT NULL,
            previous_response_id TEXT,
            input_items TEXT NOT NULL,
            response TEXT NOT NULL
        );
        CREATE INDEX responses_key ON responses (key_id, created_at)
        """,
    ],
    "postgresql": [
        """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key_id BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            previous_response_id TEXT,
            input_items TEXT NOT NULL,
            response TEXT NOT NULL
        );
        CREATE INDEX responses_key ON responses (key_id, created_at)
        """,
    ],
}
NO_KEY = -1
"""The key id of responses stored while the server has no API keys."""
MAX_THREAD = 256
"""Earlier responses followed through previous_response_id at most."""


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _text(content: str | list[Any]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


class ResponseStore:
    """Stored responses, one row each: the request's input items and the response object, per API key."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("responses", MIGRATIONS)

    def put(self, key: APIKey | None, response: Response, items: list[dict[str, Any]]) -> None:
        self.db.execute(
            "INSERT INTO responses (id, key_id, created_at, previous_response_id, input_items, response) VALUES (?, ?, ?, ?, ?, ?)",
            (response.id, _key(key), time.time(), response.previous_response_id, json.dumps(items), response.model_dump_json()))

    def get(self, key: APIKey | None, response_id: str, param: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The response object and its input items, or a 404 (an unknown id, or another key's)."""
        row = self.db.query_one("SELECT response, input_items FROM responses WHERE id = ? AND key_id = ?", (response_id, _key(key)))
        if row is None:
            what = "Previous response" if param == "previous_response_id" else "Response"
            raise APIError(404, f"{what} with id '{response_id}' not found.", param=param,
                           code="previous_response_not_found" if param else "response_not_found")
        return json.loads(row["response"]), json.loads(row["input_items"])

    def delete(self, key: APIKey | None, response_id: str) -> None:
        self.get(key, response_id)
        self.db.execute("DELETE FROM responses WHERE id = ? AND key_id = ?", (response_id, _key(key)))

    def thread(self, key: APIKey | None, response_id: str) -> list[dict[str, Any]]:
        """The items of a thread up to and including `response_id`: each response's input items, then its output."""
        chain: list[list[dict[str, Any]]] = []
        current: str | None = response_id
        while current is not None and len(chain) < MAX_THREAD:
            response, items = self.get(key, current, "previous_response_id")
            chain.append(items + response["output"])
            current = response.get("previous_response_id")
        return [item for part in reversed(chain) for item in part]


def _key(key: APIKey | None) -> int:
    return key.id if key is not None else NO_KEY


class ResponsesService:
    def __init__(self, openai: OpenAIService, db: Database, rag: RagService | None = None) -> None:
        self.openai = openai
        self.store = ResponseStore(db)
        self.rag = rag

    # --- create -------------------------------------------------------------------------------------------

    async def create(self, req: ResponseCreate, request: Request, key: APIKey | None) -> JSONResponse | StreamingResponse:
        self.openai.check_model(req.model, key)
        llm = self.openai.ready()
        earlier = self.store.thread(key, req.previous_response_id) if req.previous_response_id else []
        items = _input_items(req)
        messages = _messages(earlier + items)
        if req.instructions:
            messages.insert(0, {"role": "system", "content": req.instructions})
        if not messages:
            raise InvalidRequestError("the input holds no message to answer (only earlier searches)", param="input")
        functions = [t for t in req.tools or [] if isinstance(t, FunctionTool)]
        searches = [t for t in req.tools or [] if isinstance(t, FileSearchTool)]
        choice = req.tool_choice
        if isinstance(choice, HostedToolChoice) and not searches:
            raise InvalidRequestError("tool_choice file_search needs a file_search tool", param="tool_choice")
        fn_choice: Any = choice.model_dump() if isinstance(choice, NamedFunctionChoice) else choice
        if isinstance(choice, HostedToolChoice) or (not functions and choice in ("auto", "required") and searches):
            fn_choice = "none"  # the choice is over the hosted search alone
        plan = llm.tool_plan([t.model_dump(exclude_none=True) for t in functions], fn_choice, req.parallel_tool_calls)
        tools = plan if plan is not None and plan.active else None
        structured = _format(req)
        if tools is not None and structured is not None:
            raise InvalidRequestError("give text.format or function tools, not both: each constrains the whole answer", param="text")
        search_call, cited = None, []
        searched = searches and choice not in ("none",) and not isinstance(choice, NamedFunctionChoice)
        if searched and (_asks_for_search(choice) or _user_text(messages)):  # with no user message, nothing to search for
            search_call, messages, cited = await self._search(searches, messages, req)
        prompt_ids = llm.encode_chat(messages, tools=plan)
        limit = req.max_output_tokens or max(1, llm.config.max_seq_len - len(prompt_ids))
        params = SamplingParams(max_tokens=limit, temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=None if req.seed is None else req.seed % 2**64,
                                structured=tools.grammar() if tools is not None else structured)
        llm.validate(prompt_ids, params)
        llm.check_capacity()
        c = Choice(0, prompt_ids, params)
        admission = self.openai.admit(request, key, req.model, req.user, [c], sorted(set(req.model_extra or {}) - {"stream_options"}))
        base = self._base(req, functions, searches)
        if req.stream:
            events = self._events(request, req, key, base, items, c, tools, search_call, cited)
            return StreamingResponse(_sse_events(events), media_type="text/event-stream", headers={**SSE_HEADERS, **admission})
        await self.openai.collect(request, base.id, [c])
        out = _output("".join(c.text), tools, search_call, cited)
        response = self._finish(base, c, out)
        if req.store:
            self.store.put(key, response, items)
        return JSONResponse(response.model_dump(mode="json"), headers=admission)

    async def _search(self, tools: list[FileSearchTool], messages: list[dict[str, Any]], req: ResponseCreate) -> tuple[Any, Any, Any]:
        from fastapi.concurrency import run_in_threadpool

        from lamina.llm.rag import last_user_text

        if self.rag is None:
            raise InvalidRequestError("this server has no vector stores", param="tools")
        store_ids = [s for t in tools for s in t.vector_store_ids]
        k = max(t.max_num_results for t in tools)
        grounding = await run_in_threadpool(self.rag.ground, messages, store_ids, k)
        with_results = "file_search_call.results" in (req.include or [])
        results = [FileSearchResult(file_id=c.file_id, filename=c.filename, score=round(c.score, 6), text=c.text,
                                    attributes={"vector_store_id": c.vector_store_id, **({"page": c.page} if c.page else {})})
                   for c in grounding.citations] if with_results else None
        call = FileSearchCallOut(id=_id("fs"), status="completed", queries=[last_user_text(messages)], results=results)
        return call, grounding.messages, grounding.citations

    def _base(self, req: ResponseCreate, functions: list[FunctionTool], searches: list[FileSearchTool]) -> Response:
        choice = req.tool_choice
        fmt = req.text.format.model_dump(by_alias=True) if req.text is not None and req.text.format is not None else {"type": "text"}
        return Response(
            id=_id("resp"), created_at=int(time.time()), status="in_progress", model=req.model, output=[], usage=None,
            instructions=req.instructions, tools=[t.model_dump(exclude_none=True) for t in [*functions, *searches]],
            tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else (choice or ("auto" if req.tools else "none")),
            parallel_tool_calls=req.parallel_tool_calls is not False, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, max_output_tokens=req.max_output_tokens,
            previous_response_id=req.previous_response_id, text={"format": fmt}, metadata=req.metadata or {}, store=req.store,
            user=req.user)

    def _finish(self, base: Response, c: Choice, output: list[Any]) -> Response:
        cut = c.finish_reason == "length"
        for item in output:
            if cut and item.status in ("in_progress", "completed") and item.type != "file_search_call":
                item.status = "incomplete"
        usage = self.openai.usage_of([c])
        return base.model_copy(update={
            "status": "incomplete" if cut else "completed", "output": output,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if cut else None,
            "usage": ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                   total_tokens=usage.total_tokens,
                                   input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
                                   output_tokens_details=OutputTokensDetails())})

    # --- streaming ----------------------------------------------------------------------------------------

    async def _events(self, request: Request, req: ResponseCreate, key: APIKey | None, base: Response, items: list[dict[str, Any]],
                      c: Choice, tools: ToolPlan | None, search_call: Any, cited: list[Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI's event sequence for one response (the `sequence_number`s are added by `_sse_events`)."""
        yield {"type": "response.created", "response": _dump(base)}
        yield {"type": "response.in_progress", "response": _dump(base)}
        output: list[Any] = []
        if search_call is not None:
            i = len(output)
            searching = search_call.model_copy(update={"status": "in_progress", "results": None})
            yield {"type": "response.output_item.added", "output_index": i, "item": _dump(searching)}
            for step in ("in_progress", "searching", "completed"):
                yield {"type": f"response.file_search_call.{step}", "output_index": i, "item_id": search_call.id}
            yield {"type": "response.output_item.done", "output_index": i, "item": _dump(search_call)}
            output.append(search_call)
        split = ToolStream(tools.format) if tools is not None else None
        message: OutputMessage | None = None
        calls: dict[int, FunctionCallOut] = {}
        call_at: dict[int, int] = {}
        text = ""

        def open_message() -> list[dict[str, Any]]:
            nonlocal message
            message = OutputMessage(id=_id("msg"), status="in_progress", content=[])
            output.append(message)
            part = OutputText(text="", annotations=[])
            return [{"type": "response.output_item.added", "output_index": len(output) - 1, "item": _dump(message)},
                    {"type": "response.content_part.added", "item_id": message.id, "output_index": len(output) - 1,
                     "content_index": 0, "part": _dump(part)}]

        def close_message() -> list[dict[str, Any]]:
            nonlocal message
            if message is None:
                return []
            i = output.index(message)
            annotations = _annotations(text, cited)
            events = [{"type": "response.output_text.annotation.added", "item_id": message.id, "output_index": i, "content_index": 0,
                       "annotation_index": n, "annotation": _dump(a)} for n, a in enumerate(annotations)]
            part = OutputText(text=text, annotations=annotations)
            message.content = [part]
            message.status = "incomplete" if c.finish_reason == "length" else "completed"
            events += [{"type": "response.output_text.done", "item_id": message.id, "output_index": i, "content_index": 0, "text": text,
                        "logprobs": []},
                       {"type": "response.content_part.done", "item_id": message.id, "output_index": i, "content_index": 0,
                        "part": _dump(part)},
                       {"type": "response.output_item.done", "output_index": i, "item": _dump(message)}]
            message = None
            return events

        try:
            async for _, delta in self.openai.deltas(request, base.id, [c]):
                content, call_deltas = (delta.text, []) if split is None else split.push(delta.text)
                if delta.finish_reason is not None and split is not None:
                    content += split.finish()
                if content:
                    if message is None and not calls:
                        for e in open_message():
                            yield e
                    if message is not None:
                        text += content
                        yield {"type": "response.output_text.delta", "item_id": message.id, "output_index": output.index(message),
                               "content_index": 0, "delta": content, "logprobs": []}
                for d in call_deltas:
                    if d.name is not None:
                        for e in close_message():
                            yield e
                        item = FunctionCallOut(id=_id("fc"), call_id=d.id or _id("call"), name=d.name, arguments="", status="in_progress")
                        calls[d.index] = item
                        output.append(item)
                        call_at[d.index] = len(output) - 1
                        yield {"type": "response.output_item.added", "output_index": call_at[d.index], "item": _dump(item)}
                    if d.arguments:
                        item = calls[d.index]
                        item.arguments += d.arguments
                        yield {"type": "response.function_call_arguments.delta", "item_id": item.id, "output_index": call_at[d.index],
                               "delta": d.arguments}
                for index, item in calls.items():  # a call whose object has closed is done
                    if item.status == "in_progress" and split is not None and index < len(split.calls):
                        for e in _close_call(item, call_at[index], "completed"):
                            yield e
        except LaminaError as e:
            failed = base.model_copy(update={"status": "failed", "output": output, "error": ResponseError(code=e.code or "server_error",
                                                                                                          message=e.message)})
            yield {"type": "response.failed", "response": _dump(failed)}
            return
        for e in close_message():
            yield e
        for index, item in calls.items():
            if item.status == "in_progress":
                for e in _close_call(item, call_at[index], "incomplete" if c.finish_reason == "length" else "completed"):
                    yield e
        response = self._finish(base, c, output)
        if req.store:
            self.store.put(key, response, items)
        yield {"type": "response.incomplete" if response.status == "incomplete" else "response.completed", "response": _dump(response)}

    # --- reading ------------------------------------------------------------------------------------------

    def get(self, response_id: str, key: APIKey | None) -> dict[str, Any]:
        return self.store.get(key, response_id)[0]

    def delete(self, response_id: str, key: APIKey | None) -> ResponseDeleted:
        self.store.delete(key, response_id)
        return ResponseDeleted(id=response_id)

    def input_items(self, response_id: str, key: APIKey | None, *, limit: int = 20, order: str = "desc",
                    after: str | None = None) -> InputItemList:
        _, items = self.store.get(key, response_id)
        items = items if order == "asc" else list(reversed(items))
        if after is not None:
            ids = [i.get("id") for i in items]
            if after not in ids:
                raise InvalidRequestError(f"no input item {after!r} in this response", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                             has_more=len(items) > limit)


def _close_call(item: FunctionCallOut, index: int, status: str) -> list[dict[str, Any]]:
    item.status = status  # type: ignore[assignment]
    return [{"type": "response.function_call_arguments.done", "item_id": item.id, "output_index": index, "name": item.name,
             "arguments": item.arguments},
            {"type": "response.output_item.done", "output_index": index, "item": _dump(item)}]


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


async def _sse_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Typed Server-Sent Events (`event:` and `data:`), numbered; an unexpected error ends the stream with
    response.failed's error body. There is no [DONE] in this API."""
    n = 0
    try:
        async for event in events:
            event["sequence_number"] = n
            n += 1
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
    except Exception:
        import logging

        logging.getLogger(__name__).exception("error in a responses stream")
        body = {"type": "error", "sequence_number": n, **ErrorResponse.internal().model_dump()["error"]}
        yield f"event: error\ndata: {json.dumps(body)}\n\n"


def _input_items(req: ResponseCreate) -> list[dict[str, Any]]:
    """The request's input as items with ids (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "id": _id("msg"), "role": "user", "content": [{"type": "input_text", "text": req.input}]}]
    out = []
    for item in req.input:
        d = item.model_dump(exclude_none=True)
        d.setdefault("type", "message")
        d.setdefault("id", _id({"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(d["type"], "item")))
        if isinstance(item, InputMessage) and isinstance(item.content, str):
            kind = "output_text" if item.role == "assistant" else "input_text"
            d["content"] = [{"type": kind, "text": item.content}]
        out.append(d)
    return out


def _messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from items: consecutive function calls one assistant turn; outputs tool messages."""
    out: list[dict[str, Any]] = []
    made: set[str] = set()
    for i, d in enumerate(items):
        kind = d.get("type", "message")
        if kind == "message":
            content = d.get("content")
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])
            role = "system" if d["role"] == "developer" else d["role"]
            out.append({"role": role, "content": text})
        elif kind == "function_call":
            call = FunctionCallItem.model_validate(d)
            made.add(call.call_id)
            entry = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None and not out[-1]["content"]:
                out[-1]["tool_calls"].append(entry)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [entry]})
        elif kind == "function_call_output":
            result = FunctionCallOutputItem.model_validate(d)
            if result.call_id not in made:
                raise InvalidRequestError(f"input[{i}]: no function_call with call_id {result.call_id!r} precedes this output",
                                          param="input")
            out.append({"role": "tool", "tool_call_id": result.call_id, "content": _text(result.output)})
    return out


def _format(req: ResponseCreate) -> Any:
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, TextFormatJSONObject):
        return structured_output({"type": "json_object"}, param="text")
    if isinstance(fmt, TextFormatJSONSchema):
        return structured_output({"type": "json_schema", "json_schema": {"schema": fmt.schema_, "strict": fmt.strict is not False}},
                                 param="text")
    return None


_MARKER = re.compile(r"\[(\d{1,3})\]")


def _annotations(text: str, cited: list[Any]) -> list[FileCitation]:
    """A file citation for each [n] in the text that names one of the passages."""
    by_index = {c.index: c for c in cited}
    return [FileCitation(file_id=by_index[int(m.group(1))].file_id, filename=by_index[int(m.group(1))].filename, index=m.start())
            for m in _MARKER.finditer(text) if int(m.group(1)) in by_index]


def _output(text: str, tools: ToolPlan | None, search_call: Any, cited: list[Any]) -> list[Any]:
    """The output items of a whole answer."""
    out: list[Any] = [search_call] if search_call is not None else []
    content, calls = split_calls(tools.format, text) if tools is not None else (text, [])
    if content or not calls:
        out.append(OutputMessage(id=_id("msg"), status="completed", content=[OutputText(text=content, annotations=_annotations(content, cited))]))
    out += [FunctionCallOut(id=_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments, status="completed") for c in calls]
    return out


def _user_text(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "user" and isinstance(m.get("content"), str) and m["content"].strip() for m in messages)


def _asks_for_search(choice: Any) -> bool:
    """tool_choice names the hosted file_search (then a search there must be)."""
    return getattr(choice, "type", None) == "file_search" or (isinstance(choice, dict) and choice.get("type") == "file_search")
