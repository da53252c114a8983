"""The logic behind `/v1/files`, `/v1/vector_stores` and `/v1/embeddings`, and the retrieval step of
grounded chat. Objects come back as the response models of `lamina.api.rag.protocol`; ingestion runs
synchronously (the routes are sync, so FastAPI runs them in its thread pool and the event loop stays free),
so a file is `completed` or `failed` by the time its create call returns, and `create_and_poll` in the SDK
returns at once.

The vector stores below (`lamina.infra.vectorstore`) speak their own words; the API's (`vector_store_id`,
`max_num_results`, OpenAI's filter models, its error codes) are mapped to theirs here.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamina.api.errors import APIError
from lamina.api.keys import APIKey
from lamina.api.loading import Loading
from lamina.api.rag.protocol import (
    ChunkingStrategy,
    ChunkSizes,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    FileCounts,
    FileDeleted,
    FileList,
    FileObject,
    LastError,
    SearchRequest,
    SearchResult,
    SearchResultsPage,
    StaticChunkingObject,
    TextContent,
    VectorStoreCreate,
    VectorStoreDeleted,
    VectorStoreFileCreate,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreFileObject,
    VectorStoreList,
    VectorStoreObject,
    VectorStoreUpdate,
)
from lamina.api.wire import non_blank
from lamina.foundation.embeddings import Embedder
from lamina.foundation.ingest import Ingestor
from lamina.infra.db import Database
from lamina.infra.files import FileStore, StoredFile
from lamina.infra.vectorstore import FileRecord, StoreInfo, VectorStores
from lamina.llm.rag import Citation, Retriever, citations, ground, last_user_text

UNNAMED_UPLOAD = "upload"
"""The name of an upload that came without one (ingestion then goes by its content)."""


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

    def upload(self, filename: str | None, data: bytes, purpose: str) -> FileObject:
        name = Path(filename or "").name or UNNAMED_UPLOAD
        return _file(self.files.create(name, data, purpose))

    def list_files(self, purpose: str | None) -> FileList:
        return FileList(data=[_file(f) for f in self.files.list(purpose)])

    def get_file(self, file_id: str) -> FileObject:
        return _file(self.files.get(file_id))

    def file_content(self, file_id: str) -> bytes:
        return self.files.content(file_id)

    def delete_file(self, file_id: str) -> FileDeleted:
        """Delete the upload and its chunks from every store that holds it."""
        self.files.get(file_id)
        for store in self.stores.list():
            with self._lock(store.id):
                self.stores.remove_file(store.id, file_id)
        self.files.delete(file_id)
        return FileDeleted(id=file_id)

    # --- vector stores --------------------------------------------------------------------------------

    def create_store(self, req: VectorStoreCreate) -> VectorStoreObject:
        embedder = self.ready()
        size, overlap = (req.chunking_strategy or ChunkingStrategy()).sizes(embedder.max_tokens)
        name = (req.name or "").strip() or None  # a blank name is no name: the store is called by its id
        if name is not None:
            self._name_free(name)
        for file_id in req.file_ids:
            self.files.get(file_id)  # 404 before anything is created
        store = self.stores.create(name, embedding_model=embedder.name, dim=embedder.dim, chunk_tokens=size,
                                   chunk_overlap=overlap, metadata=req.metadata)
        for file_id in req.file_ids:
            self.add_file(store.id, VectorStoreFileCreate(file_id=file_id))
        return self.store_object(self.stores.get(store.id))

    def list_stores(self) -> VectorStoreList:
        data = [self.store_object(s) for s in self.stores.list()]
        return VectorStoreList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)

    def get_store(self, store_id: str) -> VectorStoreObject:
        return self.store_object(self._store(store_id))

    def update_store(self, store_id: str, req: VectorStoreUpdate) -> VectorStoreObject:
        store = self._store(store_id)
        if req.name and req.name != store.name:
            self._name_free(req.name, store.id)
        return self.store_object(self.stores.update(store.id, name=req.name, metadata=req.metadata))

    def store_object(self, store: StoreInfo) -> VectorStoreObject:
        stats = self.stores.stats(store.id)
        return VectorStoreObject(
            id=store.id, created_at=int(store.created_at), name=store.name, usage_bytes=stats["usage_bytes"],
            file_counts=FileCounts(completed=stats["completed"], failed=stats["failed"], total=stats["files"]),
            last_active_at=int(store.last_active_at), metadata=store.metadata,
        )

    def delete_store(self, store_id: str) -> VectorStoreDeleted:
        store = self._store(store_id)
        with self._lock(store.id):
            self.stores.delete(store.id)
        return VectorStoreDeleted(id=store.id)

    # --- files in a store -------------------------------------------------------------------------------

    def add_file(self, store_id: str, req: VectorStoreFileCreate) -> VectorStoreFileObject:
        embedder = self.ready()
        store = self._store(store_id)
        stored = self.files.get(req.file_id)
        if req.chunking_strategy is not None:
            size, overlap = req.chunking_strategy.sizes(embedder.max_tokens)
            store = StoreInfo(**{**store.__dict__, "chunk_tokens": size, "chunk_overlap": overlap})
        with self._lock(store.id):
            record = Ingestor(self.stores, store, embedder).ingest_bytes(
                stored.id, stored.filename, self.files.content(stored.id), attributes=req.attributes or {})
        return self.file_object(store.id, record)

    def list_store_files(self, store_id: str) -> VectorStoreFileList:
        store = self._store(store_id)
        data = [self.file_object(store.id, f) for f in self.stores.files(store.id)]
        return VectorStoreFileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)

    def get_store_file(self, store_id: str, file_id: str) -> VectorStoreFileObject:
        store = self._store(store_id)
        record = self.stores.file(store.id, file_id)
        if record is None:
            raise APIError(404, f"No file {file_id!r} in vector store {store.id!r}.", code="file_not_found", param="file_id")
        return self.file_object(store.id, record)

    def remove_store_file(self, store_id: str, file_id: str) -> VectorStoreFileDeleted:
        store = self._store(store_id)
        with self._lock(store.id):
            if not self.stores.remove_file(store.id, file_id):
                raise APIError(404, f"No file {file_id!r} in vector store {store.id!r}.", code="file_not_found", param="file_id")
        return VectorStoreFileDeleted(id=file_id)

    def file_object(self, store_id: str, record: FileRecord) -> VectorStoreFileObject:
        store = self.stores.get(store_id)
        return VectorStoreFileObject(
            id=record.file_id, created_at=int(record.created_at), vector_store_id=store_id, status=record.status,
            usage_bytes=record.bytes, last_error=LastError(message=record.error or "") if record.status == "failed" else None,
            attributes=record.attributes, filename=record.filename, chunk_count=record.chunk_count,
            chunking_strategy=StaticChunkingObject(static=ChunkSizes(max_chunk_size_tokens=store.chunk_tokens,
                                                                    chunk_overlap_tokens=store.chunk_overlap)),
        )

    # --- search, embeddings, grounding ------------------------------------------------------------------

    def search(self, store_id: str, req: SearchRequest) -> SearchResultsPage:
        store = self._store(store_id)
        hits = Retriever(self.stores, self.ready()).search(
            [store.id], req.text, k=req.max_num_results, mode=req.ranking_options.mode, filters=req.filter_spec(),
            score_threshold=req.ranking_options.score_threshold)
        data = [SearchResult(file_id=h.file_id, filename=h.filename, score=h.score,
                             attributes={**h.attributes, **({"page": h.page} if h.page is not None else {})},
                             content=[TextContent(text=h.text)]) for _, h in hits]
        return SearchResultsPage(search_query=req.query, data=data)

    def embeddings(self, req: EmbeddingRequest, key: APIKey | None) -> EmbeddingList:
        if key is not None and not key.allows(req.model):
            raise APIError(403, f"This API key may not use the model '{req.model}'.", code="model_not_allowed", param="model")
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
            data.append(Embedding(index=i, embedding=value))
        tokens = sum(result.token_counts)
        return EmbeddingList(data=data, model=embedder.name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    def ground(self, messages: list[dict[str, Any]], store_ids: list[str], k: int) -> Grounding:
        """The conversation with passages from `store_ids` for its last user message, and their citations. A
        conversation with no user text has nothing to search for: it is grounded in no passages."""
        ids = [self._store(s).id for s in store_ids]
        asked = any(m.get("role") == "user" and non_blank(m.get("content") or "") for m in messages)
        cited = citations(Retriever(self.stores, self.ready()).search(ids, last_user_text(messages), k=k)) if asked else []
        return Grounding(ground(messages, cited), cited)

    # --- helpers --------------------------------------------------------------------------------------

    def _store(self, store_id: str) -> StoreInfo:
        """The store by id or name, or the API's 404 for it."""
        store = self.stores.find(store_id)
        if store is None:
            known = ", ".join(s.name for s in self.stores.list()[:20]) or "none yet"
            raise APIError(404, f"No vector store {store_id!r}; stores: {known}.", code="vector_store_not_found",
                           param="vector_store_id")
        return store

    def _name_free(self, name: str, own: str | None = None) -> None:
        """A 409 when another store is already called (or has the id) `name`: stores are found by either."""
        found = self.stores.find(name)
        if found is not None and found.id != own:
            raise APIError(409, f"A vector store named {name!r} already exists; pick another name.", code="name_taken",
                           param="name")

    def _lock(self, store_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._store_locks.setdefault(store_id, threading.Lock())


def _file(f: StoredFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose)
