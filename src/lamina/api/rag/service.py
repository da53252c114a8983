"""The logic behind `/v1/files`, `/v1/vector_stores` and `/v1/embeddings`, and the retrieval step of
grounded chat. Objects come back in OpenAI's shapes; ingestion runs synchronously (the routes are sync, so
FastAPI runs them in its thread pool and the event loop stays free), so a file is `completed` or `failed`
by the time its create call returns, and `create_and_poll` in the SDK returns at once.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamina.api.errors import APIError
from lamina.api.loading import Loading
from lamina.api.rag.protocol import (
    ChunkingStrategy,
    EmbeddingRequest,
    SearchRequest,
    VectorStoreCreate,
    VectorStoreFileCreate,
)
from lamina.foundation.embeddings import Embedder
from lamina.foundation.ingest import Ingestor
from lamina.infra.db import Database
from lamina.infra.files import FileStore, StoredFile
from lamina.infra.vectorstore import FileRecord, StoreInfo, VectorStores
from lamina.llm.rag import Citation, Retriever, citations, ground, last_user_text


@dataclass
class Grounding:
    messages: list[dict[str, Any]]
    citations: list[Citation]


class RagService:
    def __init__(self, db: Database, home: Path, embedding_model: str, embedder: Loading[Embedder]) -> None:
        self.files = FileStore(db, home / "files")
        self.stores = VectorStores(db, home / "vector_stores")
        self.embedding_model = embedding_model
        self.loading = embedder
        """The embedding model, filled by the app's loader thread (503 until then)."""
        # One ingestion per store at a time: two uploads to one store must not interleave their transactions'
        # index updates in this process (SQLite already serialises the writes themselves).
        self._store_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.files.sweep()

    @property
    def embedder(self) -> Embedder | None:
        """The loaded embedding model, or None while it loads (or failed to)."""
        return self.loading.value

    def ready(self) -> Embedder:
        return self.loading.get()

    # --- files ----------------------------------------------------------------------------------------

    def upload(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        return _file(self.files.create(filename, data, purpose))

    def list_files(self, purpose: str | None) -> dict[str, Any]:
        return {"object": "list", "data": [_file(f) for f in self.files.list(purpose)], "has_more": False}

    def get_file(self, file_id: str) -> dict[str, Any]:
        return _file(self.files.get(file_id))

    def delete_file(self, file_id: str) -> dict[str, Any]:
        """Delete the upload and its chunks from every store that holds it."""
        self.files.get(file_id)
        for store in self.stores.list():
            with self._lock(store.id):
                self.stores.remove_file(store.id, file_id)
        self.files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- vector stores --------------------------------------------------------------------------------

    def create_store(self, req: VectorStoreCreate) -> dict[str, Any]:
        embedder = self.ready()
        size, overlap = (req.chunking_strategy or ChunkingStrategy()).sizes(embedder.max_tokens)
        for file_id in req.file_ids:
            self.files.get(file_id)  # 404 before anything is created
        store = self.stores.create(req.name, embedding_model=embedder.name, dim=embedder.dim, chunk_tokens=size,
                                   chunk_overlap=overlap, metadata=req.metadata)
        for file_id in req.file_ids:
            self.add_file(store.id, VectorStoreFileCreate(file_id=file_id))
        return self.store_object(self.stores.get(store.id))

    def list_stores(self) -> dict[str, Any]:
        data = [self.store_object(s) for s in self.stores.list()]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    def store_object(self, store: StoreInfo) -> dict[str, Any]:
        stats = self.stores.stats(store.id)
        return {
            "id": store.id, "object": "vector_store", "created_at": int(store.created_at), "name": store.name,
            "usage_bytes": stats["usage_bytes"],
            "file_counts": {"in_progress": 0, "completed": stats["completed"], "failed": stats["failed"], "cancelled": 0,
                            "total": stats["files"]},
            "status": "completed", "expires_after": None, "expires_at": None,
            "last_active_at": int(store.last_active_at), "metadata": store.metadata,
        }

    def delete_store(self, store_id: str) -> dict[str, Any]:
        with self._lock(self.stores.get(store_id).id):
            store = self.stores.delete(store_id)
        return {"id": store.id, "object": "vector_store.deleted", "deleted": True}

    # --- files in a store -------------------------------------------------------------------------------

    def add_file(self, store_id: str, req: VectorStoreFileCreate) -> dict[str, Any]:
        embedder = self.ready()
        store = self.stores.get(store_id)
        stored = self.files.get(req.file_id)
        if req.chunking_strategy is not None:
            size, overlap = req.chunking_strategy.sizes(embedder.max_tokens)
            store = StoreInfo(**{**store.__dict__, "chunk_tokens": size, "chunk_overlap": overlap})
        with self._lock(store.id):
            record = Ingestor(self.stores, store, embedder).ingest_bytes(
                stored.id, stored.filename, self.files.content(stored.id), attributes=req.attributes or {})
        return self.file_object(store.id, record)

    def list_store_files(self, store_id: str) -> dict[str, Any]:
        store = self.stores.get(store_id)
        data = [self.file_object(store.id, f) for f in self.stores.files(store.id)]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    def get_store_file(self, store_id: str, file_id: str) -> dict[str, Any]:
        store = self.stores.get(store_id)
        record = self.stores.file(store.id, file_id)
        if record is None:
            raise APIError(404, f"No file {file_id!r} in vector store {store.id!r}.", code="file_not_found", param="file_id")
        return self.file_object(store.id, record)

    def remove_store_file(self, store_id: str, file_id: str) -> dict[str, Any]:
        store = self.stores.get(store_id)
        with self._lock(store.id):
            if not self.stores.remove_file(store.id, file_id):
                raise APIError(404, f"No file {file_id!r} in vector store {store.id!r}.", code="file_not_found", param="file_id")
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    def file_object(self, store_id: str, record: FileRecord) -> dict[str, Any]:
        store = self.stores.get(store_id)
        return {
            "id": record.file_id, "object": "vector_store.file", "created_at": int(record.created_at), "vector_store_id": store_id,
            "status": record.status, "usage_bytes": record.bytes,
            "last_error": {"code": "invalid_file", "message": record.error} if record.status == "failed" else None,
            "attributes": record.attributes, "filename": record.filename, "chunk_count": record.chunk_count,
            "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": store.chunk_tokens,
                                                               "chunk_overlap_tokens": store.chunk_overlap}},
        }

    # --- search, embeddings, grounding ------------------------------------------------------------------

    def search(self, store_id: str, req: SearchRequest) -> dict[str, Any]:
        store = self.stores.get(store_id)
        hits = Retriever(self.stores, self.ready()).search(
            [store.id], req.text, k=req.max_num_results, mode=req.ranking_options.mode, filters=req.filters,
            score_threshold=req.ranking_options.score_threshold)
        return {
            "object": "vector_store.search_results.page", "search_query": req.query,
            "data": [{"file_id": h.file_id, "filename": h.filename, "score": h.score,
                      "attributes": {**h.attributes, **({"page": h.page} if h.page is not None else {})},
                      "content": [{"type": "text", "text": h.text}]} for _, h in hits],
            "has_more": False, "next_page": None,
        }

    def embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        embedder = self.ready()
        if req.model != embedder.name:
            raise APIError(404, f"The model '{req.model}' does not exist; embeddings come from '{embedder.name}'.",
                           code="model_not_found", param="model")
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise APIError(400, f"{embedder.name} returns {embedder.dim} dimensions; 'dimensions' cannot change that",
                           param="dimensions")
        result = embedder.embed_with_info(req.texts)
        data = []
        for i, vector in enumerate(result.vectors):
            value: Any = (base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
                          if req.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(result.token_counts)
        return {"object": "list", "data": data, "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def ground(self, messages: list[dict[str, Any]], store_ids: list[str], k: int) -> Grounding:
        retriever = Retriever(self.stores, self.ready())
        cited = citations(retriever.search(store_ids, last_user_text(messages), k=k))
        return Grounding(ground(messages, cited), cited)

    def _lock(self, store_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._store_locks.setdefault(store_id, threading.Lock())


def _file(f: StoredFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None}
