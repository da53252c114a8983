"""Retrieval-augmented generation: find passages in vector stores, put them in the prompt, cite them.

`Retriever.search` embeds the question once and searches one or several stores (hybrid by default).
`ground` turns a conversation into one whose system message carries the numbered passages and asks the
model to cite them as [1], [2]; the passages come back as `Citation`s (file, page, snippet, score) for the
API response and the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lamina.errors import InvalidRequestError
from lamina.foundation.embeddings import Embedder
from lamina.infra.vectorstore import Mode, SearchHit, VectorStores

SNIPPET_CHARS = 240
INSTRUCTIONS = (
    "Answer the question using only the numbered passages below. Cite the passages you use with their "
    "numbers in square brackets, like [1] or [2]. If the passages do not contain the answer, say you do not know."
)


@dataclass(frozen=True)
class Citation:
    index: int
    file_id: str
    filename: str
    page: int | None
    score: float
    snippet: str
    text: str
    vector_store_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "file_id": self.file_id, "filename": self.filename, "page": self.page,
                "score": round(self.score, 6), "snippet": self.snippet, "vector_store_id": self.vector_store_id}


class Retriever:
    def __init__(self, stores: VectorStores, embedder: Embedder) -> None:
        self.stores, self.embedder = stores, embedder

    def search(
        self,
        store_ids: Sequence[str],
        query: str,
        *,
        k: int = 5,
        mode: Mode = "hybrid",
        filters: dict[str, Any] | None = None,
        score_threshold: float | None = None,
    ) -> list[tuple[str, SearchHit]]:
        """(store id, hit) pairs, best first, across every store (scores of one mode are comparable)."""
        if not query or not query.strip():
            raise InvalidRequestError("the query is empty: give some text to search for", param="query")
        stores = [self.stores.get(s) for s in store_ids]
        for store in stores:
            if store.embedding_model != self.embedder.name:
                raise InvalidRequestError(f"vector store {store.name!r} was built with {store.embedding_model}, "
                                          f"not {self.embedder.name}", param="vector_store_ids")
        vector = self.embedder.embed([query])[0] if mode != "bm25" else None
        hits = [(store.id, hit) for store in stores for hit in self.stores.search(
            store.id, query_vector=vector, query_text=query, k=k, mode=mode, filters=filters, score_threshold=score_threshold)]
        hits.sort(key=lambda pair: -pair[1].score)
        return hits[:k]


def citations(hits: Sequence[tuple[str, SearchHit]]) -> list[Citation]:
    return [Citation(i, h.file_id, h.filename, h.page, h.score, _snippet(h.text), h.text, store_id)
            for i, (store_id, h) in enumerate(hits, start=1)]


def ground(messages: Sequence[dict[str, Any]], cited: Sequence[Citation]) -> list[dict[str, Any]]:
    """The conversation with the passages in its system message (the model's own system prompt kept)."""
    passages = "\n\n".join(f"[{c.index}] ({_where(c)})\n{c.text}" for c in cited) or "(no passages found)"
    context = f"{INSTRUCTIONS}\n\n{passages}"
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{context}"
        return messages
    return [{"role": "system", "content": context}, *messages]


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str) and m["content"].strip():
            return m["content"]
    raise InvalidRequestError("grounded chat needs a user message to search for", param="messages")


def _where(c: Citation) -> str:
    return f"{c.filename}, page {c.page}" if c.page is not None else c.filename


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1].rsplit(" ", 1)[0] + "…"
