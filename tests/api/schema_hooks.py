"""Schemathesis hooks for tests/api/schema_run.py (loaded by `st run` through SCHEMATHESIS_HOOKS).

Before each call they make the generated request what a client that read /v1/models sends: the served
model's id, token ids within its vocabulary, a short `max_tokens` (the tiny model's context is long, and a
case must take milliseconds), a static chunk the embedding model can read with an overlap of at most half
of it, `best_of` equal to `n`, `dimensions` of the embedding model's own, the served model in
`/v1/models/{model_id}`. These are the rules the schema
documents on its fields but cannot state (they depend on the loaded models, or tie one field to another).
Everything else is sent as generated. Ids in paths are the seeded store and file (DELETEs get their own
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
    for name in ("store_id", "file_id"):
        if case.path_parameters and name in case.path_parameters and isinstance(ids.get(name), str):
            case.path_parameters[name] = ids[name]
    if not isinstance(body, dict):
        return
    if path in ("/v1/chat/completions", "/v1/completions"):
        _generation(body, completions=path == "/v1/completions")
    elif path == "/detokenize" and isinstance(body.get("tokens"), list):
        body["tokens"] = _token_ids(body["tokens"])
    elif path == "/v1/embeddings":
        if isinstance(body.get("model"), str):
            body["model"] = EMBEDDER
        if _int(body.get("dimensions")) is not None:
            body["dimensions"] = EMBEDDING_DIM
    elif path == "/v1/vector_stores/{store_id}/files" and isinstance(body.get("file_id"), str):
        body["file_id"] = IDS.get("file_id", body["file_id"])
    _chunking(body)


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if RESPONSES:
        with _lock, open(RESPONSES, "a") as log:
            log.write(f"{case.method.upper()}\t{case.operation.path}\t{response.status_code}\n")
