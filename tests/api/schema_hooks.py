"""Schemathesis hooks for tests/api/schema_run.py (loaded by `st run` through SCHEMATHESIS_HOOKS).

Before each call they make the generated request what a client that read /v1/models sends: the served
model's id, token ids within its vocabulary, a short `max_tokens` (the tiny model's context is long, and a
case must take milliseconds), a static chunk the embedding model can read with an overlap of at most half
of it, `best_of` equal to `n`, `dimensions` of the embedding model's own, the served model in
`/v1/models/{model_id}`; output constraints llguidance can compile (a made-up regex, grammar or JSON Schema, in
`response_format`, `structured_outputs`, `guided_*`, `text.format` or a tool's `parameters`, is replaced by a small
valid one), at most one of them and none beside tools; unique tool names and a named tool_choice among them; tool
messages and function_call_outputs answering a call made earlier in the conversation. These are the rules the schema
documents on its fields but cannot state (they depend on the loaded models, or tie one field to another).
Everything else is sent as generated. Ids in paths are the seeded store, file and batch (DELETEs get their own
ids, so that deleting does not empty what the other operations read). After each call the response's
status is logged per operation, for the totals.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import schemathesis

MODEL = os.environ.get("LAMINA_SCHEMA_MODEL", "")
EMBEDDER = os.environ.get("LAMINA_SCHEMA_EMBEDDER", "")
EMBEDDING_DIM = 384
EMBEDDER_TOKENS = 254
"""What MiniLM reads of a chunk: its 256 positions less [CLS] and [SEP]."""
VOCAB = int(os.environ.get("LAMINA_SCHEMA_VOCAB", "400"))
IDS: dict[str, Any] = json.loads(os.environ.get("LAMINA_SCHEMA_IDS", "{}"))
RESPONSES = os.environ.get("LAMINA_SCHEMA_RESPONSES")
MAX_TOKENS = 4
_lock = threading.Lock()


def _int(value: Any) -> int | None:
    """The integer a JSON number stands for (JSON Schema's integers include 3.0), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if float(value).is_integer() else None


def _token_ids(value: Any) -> Any:
    n = _int(value)
    if n is not None and n >= VOCAB:
        return n % VOCAB
    return [_token_ids(v) for v in value] if isinstance(value, list) else value


def _generation(body: dict[str, Any], completions: bool) -> None:
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for name in ("max_tokens", "max_completion_tokens"):
        n = _int(body.get(name))
        if n is not None and n > MAX_TOKENS:
            body[name] = n % MAX_TOKENS + 1
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # else the completion runs to the end of the context
    if completions:
        if isinstance(body.get("prompt"), list):
            body["prompt"] = _token_ids(body["prompt"])
        if _int(body.get("best_of")) is not None:
            body["best_of"] = body.get("n", 1)


SCHEMA = {"type": "object", "properties": {"x": {"type": "string", "maxLength": 4}}}
CONSTRAINTS = {"structured_outputs": {"choice": ["yes", "no"]}, "guided_json": SCHEMA, "guided_regex": "[ab]{1,3}",
               "guided_choice": ["a", "b"], "guided_grammar": 'start: "a" | "b"'}


def _tools(body: dict[str, Any], flat: bool) -> list[str]:
    """Function tools with compilable parameters and unique names, at most 4 (128 tools' prompt does not fit the tiny
    model's context, a rule documented on the field); their names."""
    if isinstance(body.get("tools"), list):
        body["tools"] = body["tools"][:4]
    names: list[str] = []
    for i, tool in enumerate(body.get("tools") if isinstance(body.get("tools"), list) else []):
        fn = tool if flat else tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or (flat and tool.get("type") != "function"):
            if flat and isinstance(tool, dict) and tool.get("type") == "file_search" and isinstance(IDS.get("store_id"), str):
                tool["vector_store_ids"] = [IDS["store_id"]]
            continue
        if fn.get("parameters") is not None:
            fn["parameters"] = SCHEMA
        if isinstance(fn.get("name"), str):
            fn["name"] = f"f{i}"
            names.append(fn["name"])
    return names


def _tool_choice(body: dict[str, Any], names: list[str], hosted: bool) -> None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not names:
            body["tool_choice"] = None
        elif isinstance(choice.get("function"), dict):
            choice["function"]["name"] = names[0]
        else:
            choice["name"] = names[0]
    elif (isinstance(choice, dict) and choice.get("type") == "file_search" and not hosted) or (choice in ("auto", "required") and not names and not hosted):
        body["tool_choice"] = None


def _constraints(body: dict[str, Any], tools: bool) -> None:
    rf = body.get("response_format")
    given = isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")
    if isinstance(rf, dict) and rf.get("type") == "json_schema" and isinstance(rf.get("json_schema"), dict) \
            and rf["json_schema"].get("schema") is not None:
        rf["json_schema"]["schema"] = SCHEMA
    for name, value in CONSTRAINTS.items():
        if body.get(name) is not None:
            body[name] = None if given or tools else value
            given = True
    if tools and isinstance(rf, dict):
        body["response_format"] = None


def _answered(messages: Any, role_key: str) -> None:
    """Tool results answer an earlier call (else they become user turns, or lose their call id)."""
    made: list[str] = []
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict):
            continue
        if role_key == "role":
            calls = m.get("tool_calls") if isinstance(m.get("tool_calls"), list) else []  # /tokenize's messages are loose
            made += [c["id"] for c in calls if isinstance(c, dict) and isinstance(c.get("id"), str)]
            if m.get("role") == "tool" and m.get("tool_call_id") not in made:
                if made:
                    m["tool_call_id"] = made[0]
                else:
                    m["role"] = "user"
                    m.pop("tool_call_id", None)
        else:
            if m.get("type") == "function_call" and isinstance(m.get("call_id"), str):
                made.append(m["call_id"])
            if m.get("type") == "function_call_output" and m.get("call_id") not in made:
                if made:
                    m["call_id"] = made[0]
                else:
                    m["type"], m["role"], m["content"] = "message", "user", "hi"


def _responses(body: dict[str, Any]) -> None:
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    n = _int(body.get("max_output_tokens"))
    body["max_output_tokens"] = n % MAX_TOKENS + 1 if n is not None and n >= 1 else MAX_TOKENS
    names = _tools(body, flat=True)
    hosted = any(isinstance(t, dict) and t.get("type") == "file_search" for t in body.get("tools") or [])
    _tool_choice(body, names, hosted)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt["schema"] = SCHEMA
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object") and names:
        text["format"] = None  # none beside function tools (each constrains the whole answer)
    _answered(body.get("input"), "type")
    if isinstance(body.get("input"), list) and all(isinstance(i, dict) and i.get("type") == "file_search_call" for i in body["input"]):
        body["input"].append({"role": "user", "content": "hi"})


def _chunking(body: dict[str, Any]) -> None:
    strategy = body.get("chunking_strategy")
    static = strategy.get("static") if isinstance(strategy, dict) else None
    if not isinstance(static, dict):
        return
    size = _int(static.get("max_chunk_size_tokens"))
    if size is not None and size > EMBEDDER_TOKENS:
        static["max_chunk_size_tokens"] = size = EMBEDDER_TOKENS
    overlap = _int(static.get("chunk_overlap_tokens"))
    limit = (size if size is not None else 200) // 2  # 200: the default size; an absent overlap keeps to it
    if overlap is not None and overlap > limit:
        static["chunk_overlap_tokens"] = limit


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    path, body = case.operation.path, case.body
    if case.path_parameters and isinstance(case.path_parameters.get("model_id"), str):
        case.path_parameters["model_id"] = MODEL  # a made-up id is a 404, which the e2e tests cover
    ids = IDS.get(f"{case.method.upper()} {path}", IDS) if case.method.upper() == "DELETE" else IDS
    for name in ("store_id", "file_id", "batch_id"):
        if case.path_parameters and name in case.path_parameters and isinstance(ids.get(name), str):
            case.path_parameters[name] = ids[name]
    if not isinstance(body, dict):
        return
    if path in ("/v1/chat/completions", "/v1/completions"):
        _generation(body, completions=path == "/v1/completions")
        names = _tools(body, flat=False) if path == "/v1/chat/completions" else []
        _tool_choice(body, names, hosted=False)
        _constraints(body, tools=bool(names))
        _answered(body.get("messages"), "role")
    elif path == "/v1/responses":
        _responses(body)
    elif path == "/tokenize":
        _answered(body.get("messages"), "role")
    elif path == "/detokenize" and isinstance(body.get("tokens"), list):
        body["tokens"] = _token_ids(body["tokens"])
    elif path == "/v1/embeddings":
        if isinstance(body.get("model"), str):
            body["model"] = EMBEDDER
        if _int(body.get("dimensions")) is not None:
            body["dimensions"] = EMBEDDING_DIM
    elif path == "/v1/batches" and isinstance(body.get("input_file_id"), str):
        body["input_file_id"] = IDS.get("batch_file_id", body["input_file_id"])  # a JSONL file of requests
    elif path == "/v1/vector_stores/{store_id}/files" and isinstance(body.get("file_id"), str):
        body["file_id"] = IDS.get("file_id", body["file_id"])
    _chunking(body)


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if RESPONSES:
        with _lock, open(RESPONSES, "a") as log:
            log.write(f"{case.method.upper()}\t{case.operation.path}\t{response.status_code}\n")
