"""Vector stores for RAG: SQLite holds files, chunks, metadata and embeddings; FTS5 gives BM25; FAISS
gives nearest neighbours.

Consistency is SQLite's: a file's chunks are replaced in one transaction that also bumps the store's
*generation*, so a crash at any moment leaves either the old version of the file or the new one, never
half. The FAISS index (`lamina.infra.vector_index`) is a cache keyed by that generation and is rebuilt
when it does not match. A file that failed is recorded as failed, with its error, and holds no chunks.

Retrieval modes: `vector` (cosine), `bm25` (FTS5), and `hybrid` (reciprocal rank fusion of the two,
k=60, scaled so that rank 1 in both lists scores 1.0). Filters follow OpenAI's file-search filters
(`eq ne gt gte lt lte in nin`, nested `and`/`or`) over the chunk's attributes and the built-in keys
`filename`, `file_id` and `page`; they are compiled to SQL. A filtered vector search scores the matching
chunks exactly when they are few (so it always finds k, unlike a filtered ANN scan), and uses the index with
an id selector otherwise.

On PostgreSQL the same tables hold the chunks, with pgvector's `vector` for embeddings and a generated
`tsvector` column (English stemming, GIN-indexed) for the keywords, ranked by `ts_rank_cd`. Each store gets
its own HNSW index (partial, over its chunks); an unfiltered vector search walks it, a filtered one scores the
matching chunks exactly. Nothing lives outside the database, so every replica sees every change at once.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.db import Database
from lamina.infra.vector_index import VectorIndex

Mode = Literal["vector", "bm25", "hybrid"]
Scalar = str | int | float | bool
RRF_K = 60
PG_HNSW_MAX_DIM = 2000
"""pgvector's HNSW indexes vectors of up to 2,000 dimensions; wider stores are scanned exactly."""
PG_HNSW_EF_SEARCH = 100
"""pgvector's search beam (its default is 40); at least twice k."""
EXACT_FILTER_LIMIT = 50_000
"""Filtered vector searches over at most this many chunks are scored exactly."""

MIGRATIONS = {
    "sqlite": [
        """
        CREATE TABLE vs_stores (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            last_active_at REAL NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            embedding_model TEXT NOT NULL,
            dim INTEGER NOT NULL,
            chunk_tokens INTEGER NOT NULL,
            chunk_overlap INTEGER NOT NULL,
            generation INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE vs_files (
            store_id TEXT NOT NULL REFERENCES vs_stores (id) ON DELETE CASCADE,
            file_id TEXT NOT NULL,
            filename TEXT NOT NULL,
            source TEXT,
            sha256 TEXT,
            bytes INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            error TEXT,
            attributes TEXT NOT NULL DEFAULT '{}',
            chunk_count INTEGER NOT NULL DEFAULT 0,
            duplicate_chunks INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            PRIMARY KEY (store_id, file_id)
        );
        CREATE TABLE vs_chunks (
            id INTEGER PRIMARY KEY,
            store_id TEXT NOT NULL,
            file_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            text TEXT NOT NULL,
            page INTEGER,
            start_char INTEGER NOT NULL,
            end_char INTEGER NOT NULL,
            n_tokens INTEGER NOT NULL,
            attributes TEXT NOT NULL DEFAULT '{}',
            content_hash TEXT NOT NULL,
            embedding BLOB NOT NULL,
            FOREIGN KEY (store_id, file_id) REFERENCES vs_files (store_id, file_id) ON DELETE CASCADE
        );
        CREATE UNIQUE INDEX vs_chunks_dedupe ON vs_chunks (store_id, content_hash);
        CREATE INDEX vs_chunks_file ON vs_chunks (store_id, file_id);
        CREATE VIRTUAL TABLE vs_chunks_fts USING fts5 (text, content='vs_chunks', content_rowid='id', tokenize='porter unicode61');
        CREATE TRIGGER vs_chunks_ai AFTER INSERT ON vs_chunks BEGIN
            INSERT INTO vs_chunks_fts (rowid, text) VALUES (new.id, new.text);
        END;
        CREATE TRIGGER vs_chunks_ad AFTER DELETE ON vs_chunks BEGIN
            INSERT INTO vs_chunks_fts (vs_chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END
        """,
    ],
    "postgresql": [
        """
        CREATE TABLE vs_stores (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            last_active_at DOUBLE PRECISION NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            embedding_model TEXT NOT NULL,
            dim INTEGER NOT NULL,
            chunk_tokens INTEGER NOT NULL,
            chunk_overlap INTEGER NOT NULL,
            generation BIGINT NOT NULL DEFAULT 0
        );
        CREATE TABLE vs_files (
            store_id TEXT NOT NULL REFERENCES vs_stores (id) ON DELETE CASCADE,
            file_id TEXT NOT NULL,
            filename TEXT NOT NULL,
            source TEXT,
            sha256 TEXT,
            bytes BIGINT NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            error TEXT,
            attributes TEXT NOT NULL DEFAULT '{}',
            chunk_count INTEGER NOT NULL DEFAULT 0,
            duplicate_chunks INTEGER NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (store_id, file_id)
        );
        CREATE TABLE vs_chunks (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            store_id TEXT NOT NULL,
            file_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            text TEXT NOT NULL,
            page INTEGER,
            start_char INTEGER NOT NULL,
            end_char INTEGER NOT NULL,
            n_tokens INTEGER NOT NULL,
            attributes TEXT NOT NULL DEFAULT '{}',
            content_hash TEXT NOT NULL,
            embedding vector NOT NULL,
            tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
            FOREIGN KEY (store_id, file_id) REFERENCES vs_files (store_id, file_id) ON DELETE CASCADE
        );
        CREATE UNIQUE INDEX vs_chunks_dedupe ON vs_chunks (store_id, content_hash);
        CREATE INDEX vs_chunks_file ON vs_chunks (store_id, file_id);
        CREATE INDEX vs_chunks_tsv ON vs_chunks USING GIN (tsv)
        """,
    ],
}


class NotFoundError(LaminaError):
    status_code = 404
    error_type = "invalid_request_error"


@dataclass(frozen=True)
class StoreInfo:
    id: str
    name: str
    created_at: float
    last_active_at: float
    metadata: dict[str, Any]
    embedding_model: str
    dim: int
    chunk_tokens: int
    chunk_overlap: int
    generation: int


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    filename: str
    status: Literal["completed", "failed"]
    source: str | None = None
    sha256: str | None = None
    bytes: int = 0
    error: str | None = None
    attributes: dict[str, Scalar] = field(default_factory=dict)
    chunk_count: int = 0
    duplicate_chunks: int = 0
    created_at: float = 0.0


@dataclass(frozen=True)
class ChunkRecord:
    """A chunk to store: text, where it came from, and its embedding (float32, L2-normalised)."""

    text: str
    page: int | None
    start: int
    end: int
    n_tokens: int
    attributes: dict[str, Scalar]
    content_hash: str
    embedding: np.ndarray


@dataclass(frozen=True)
class SearchHit:
    chunk_id: int
    file_id: str
    filename: str
    score: float
    text: str
    page: int | None
    start: int
    end: int
    attributes: dict[str, Scalar]


class VectorStores:
    """Every vector store in one database; FAISS indexes under `index_dir`."""

    def __init__(self, db: Database, index_dir: Path) -> None:
        self.db = db
        self.index_dir = Path(index_dir)
        self._indexes: dict[str, VectorIndex] = {}
        db.migrate("vectorstore", MIGRATIONS)
        self.pg = db.dialect == "postgresql"
        """On PostgreSQL, pgvector scores the vectors and its full-text search ranks the words: every replica reads
        the same store, with no index file of its own to keep in step."""

    # --- stores ---------------------------------------------------------------------------------------

    def create(
        self,
        name: str | None,
        *,
        embedding_model: str,
        dim: int,
        chunk_tokens: int = 200,
        chunk_overlap: int = 40,
        metadata: dict[str, Any] | None = None,
    ) -> StoreInfo:
        store_id = f"vs_{uuid.uuid4().hex[:24]}"
        name = (name or store_id).strip()
        now = time.time()
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM vs_stores WHERE name = ?", (name,)).fetchone():
                raise InvalidRequestError(f"a vector store named {name!r} already exists; pick another name", param="name")
            conn.execute(
                "INSERT INTO vs_stores (id, name, created_at, last_active_at, metadata, embedding_model, dim, chunk_tokens, "
                "chunk_overlap) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (store_id, name, now, now, json.dumps(metadata or {}), embedding_model, dim, chunk_tokens, chunk_overlap),
            )
            if self.pg and dim <= PG_HNSW_MAX_DIM:  # the store's own HNSW graph, over its chunks only
                conn.execute(f"CREATE INDEX {_hnsw_name(store_id)} ON vs_chunks USING hnsw ((CAST(embedding AS vector({int(dim)}))) "
                             f"vector_ip_ops) WITH (m = 16, ef_construction = 64) WHERE store_id = '{store_id}'")
        return self.get(store_id)

    def get(self, id_or_name: str) -> StoreInfo:
        row = self.db.query_one("SELECT * FROM vs_stores WHERE id = ? OR name = ?", (id_or_name, id_or_name))
        if row is None:
            known = ", ".join(s.name for s in self.list()[:20]) or "none yet"
            raise NotFoundError(f"No vector store {id_or_name!r}; stores: {known}.", param="store", code="store_not_found")
        return _store(row)

    def find(self, id_or_name: str) -> StoreInfo | None:
        row = self.db.query_one("SELECT * FROM vs_stores WHERE id = ? OR name = ?", (id_or_name, id_or_name))
        return _store(row) if row else None

    def list(self) -> list[StoreInfo]:
        return [_store(r) for r in self.db.query("SELECT * FROM vs_stores ORDER BY created_at DESC")]

    def update(self, store_id: str, *, name: str | None = None, metadata: dict[str, Any] | None = None) -> StoreInfo:
        store = self.get(store_id)
        with self.db.transaction() as conn:
            if name and name != store.name and conn.execute("SELECT 1 FROM vs_stores WHERE name = ?", (name,)).fetchone():
                raise InvalidRequestError(f"a vector store named {name!r} already exists", param="name")
            conn.execute("UPDATE vs_stores SET name = ?, metadata = ? WHERE id = ?",
                         (name or store.name, json.dumps(metadata if metadata is not None else store.metadata), store.id))
        return self.get(store.id)

    def delete(self, id_or_name: str) -> StoreInfo:
        store = self.get(id_or_name)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM vs_chunks WHERE store_id = ?", (store.id,))
            conn.execute("DELETE FROM vs_files WHERE store_id = ?", (store.id,))
            conn.execute("DELETE FROM vs_stores WHERE id = ?", (store.id,))
            if self.pg:
                conn.execute(f"DROP INDEX IF EXISTS {_hnsw_name(store.id)}")
        self._indexes.pop(store.id, None)
        VectorIndex.delete_files(self._index_path(store.id))
        return store

    def stats(self, store_id: str) -> dict[str, int]:
        row = self.db.query_one(
            "SELECT COUNT(*) AS files, SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS completed, "
            "SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed, "
            "COALESCE(SUM(bytes), 0) AS bytes, COALESCE(SUM(chunk_count), 0) AS chunks FROM vs_files WHERE store_id = ?",
            (store_id,),
        )
        vector_bytes = "vector_dims(embedding) * 4" if self.pg else "LENGTH(embedding)"
        usage = self.db.query_one(
            f"SELECT COALESCE(SUM(LENGTH(text) + {vector_bytes}), 0) AS usage FROM vs_chunks WHERE store_id = ?", (store_id,)
        )
        return {"files": int(row["files"] or 0), "completed": int(row["completed"] or 0), "failed": int(row["failed"] or 0),
                "bytes": int(row["bytes"]), "chunks": int(row["chunks"]), "usage_bytes": int(usage["usage"])}

    # --- files ----------------------------------------------------------------------------------------

    def files(self, store_id: str) -> list[FileRecord]:
        rows = self.db.query("SELECT * FROM vs_files WHERE store_id = ? ORDER BY created_at, file_id", (store_id,))
        return [_file(r) for r in rows]

    def file(self, store_id: str, file_id: str) -> FileRecord | None:
        row = self.db.query_one("SELECT * FROM vs_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
        return _file(row) if row else None

    def unchanged(self, store_id: str, file_id: str, sha256: str) -> bool:
        """True when this file is already in the store, ingested successfully, with the same content."""
        row = self.db.query_one("SELECT sha256, status FROM vs_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
        return row is not None and row["status"] == "completed" and row["sha256"] == sha256

    def put_file(self, store_id: str, record: FileRecord, chunks: list[ChunkRecord]) -> FileRecord:
        """Replace the file and all its chunks in one transaction; exact-duplicate chunks of the store are dropped."""
        store = self.get(store_id)
        for c in chunks:
            if c.embedding.shape != (store.dim,):
                raise InvalidRequestError(f"embedding of shape {c.embedding.shape} for a store of dimension {store.dim}")
        now = time.time()
        with self.db.transaction() as conn:
            removed = self._delete_file_rows(conn, store.id, record.file_id)
            conn.execute(
                "INSERT INTO vs_files (store_id, file_id, filename, source, sha256, bytes, status, error, attributes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (store.id, record.file_id, record.filename, record.source, record.sha256, record.bytes, record.status,
                 record.error, json.dumps(record.attributes), record.created_at or now),
            )
            added_ids, added_vectors, duplicates = [], [], 0
            vector = "CAST(? AS vector)" if self.pg else "?"
            for seq, c in enumerate(chunks):
                chunk_id = conn.insert(
                    "INSERT INTO vs_chunks (store_id, file_id, seq, text, page, start_char, end_char, n_tokens, "
                    f"attributes, content_hash, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {vector}) ON CONFLICT DO NOTHING",
                    (store.id, record.file_id, seq, c.text, c.page, c.start, c.end, c.n_tokens,
                     json.dumps({**record.attributes, **c.attributes}), c.content_hash, self._vector_param(c.embedding)),
                )
                if chunk_id:
                    added_ids.append(chunk_id)
                    added_vectors.append(c.embedding)
                else:
                    duplicates += 1
            conn.execute("UPDATE vs_files SET chunk_count = ?, duplicate_chunks = ? WHERE store_id = ? AND file_id = ?",
                         (len(added_ids), duplicates, store.id, record.file_id))
            generation = self._bump(conn, store.id)
        self._apply(store, generation, np.array(added_ids, dtype=np.int64),
                    np.stack(added_vectors) if added_vectors else np.zeros((0, store.dim), np.float32), removed)
        result = self.file(store.id, record.file_id)
        assert result is not None
        return result

    def remove_file(self, store_id: str, file_id: str) -> bool:
        """Delete a file and its chunks from the store (database, FTS and vector index); False if absent."""
        store = self.get(store_id)
        with self.db.transaction() as conn:
            if not conn.execute("SELECT 1 FROM vs_files WHERE store_id = ? AND file_id = ?", (store.id, file_id)).fetchone():
                return False
            removed = self._delete_file_rows(conn, store.id, file_id)
            generation = self._bump(conn, store.id)
        self._apply(store, generation, np.zeros(0, np.int64), np.zeros((0, store.dim), np.float32), removed)
        return True

    def _delete_file_rows(self, conn: Any, store_id: str, file_id: str) -> np.ndarray:
        ids = [r[0] for r in conn.execute("SELECT id FROM vs_chunks WHERE store_id = ? AND file_id = ?", (store_id, file_id))]
        conn.execute("DELETE FROM vs_chunks WHERE store_id = ? AND file_id = ?", (store_id, file_id))
        conn.execute("DELETE FROM vs_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
        return np.array(ids, dtype=np.int64)

    def _bump(self, conn: Any, store_id: str) -> int:
        conn.execute("UPDATE vs_stores SET generation = generation + 1, last_active_at = ? WHERE id = ?", (time.time(), store_id))
        return conn.execute("SELECT generation FROM vs_stores WHERE id = ?", (store_id,)).fetchone()[0]

    def _vector_param(self, vector: np.ndarray) -> Any:
        """An embedding as the database takes it: float32 bytes for SQLite, pgvector's text form for PostgreSQL."""
        v = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if self.pg:
            return "[" + ",".join(f"{x:.9g}" for x in v.tolist()) + "]"
        return v.tobytes()

    def _apply(self, store: StoreInfo, generation: int, added: np.ndarray, vectors: np.ndarray, removed: np.ndarray) -> None:
        """Bring a loaded index up to `generation` in place; if it is not loaded, the next search rebuilds it."""
        if self.pg:
            return
        index = self._indexes.get(store.id)
        if index is None or index.generation != generation - 1:
            self._indexes.pop(store.id, None)
            return
        if len(removed) and not index.remove(removed, generation):
            self._indexes.pop(store.id, None)
            return
        index.add(added, vectors, generation)
        index.save()

    # --- search ---------------------------------------------------------------------------------------

    def index(self, store_id: str) -> VectorIndex:
        """The store's FAISS index, loaded or rebuilt so that it matches the database's generation."""
        store = self.get(store_id)
        index = self._indexes.get(store.id)
        if index is not None and index.generation == store.generation:
            return index
        count = self.db.query_one("SELECT COUNT(*) FROM vs_chunks WHERE store_id = ?", (store.id,))[0]
        index = VectorIndex.open(self._index_path(store.id), store.dim, store.generation, count, lambda: self._all_vectors(store))
        self._indexes[store.id] = index
        return index

    def _all_vectors(self, store: StoreInfo) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.query("SELECT id, embedding FROM vs_chunks WHERE store_id = ? ORDER BY id", (store.id,))
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), store.dim) if rows else np.zeros((0, store.dim), np.float32)
        return ids, vectors

    def search(
        self,
        store_id: str,
        *,
        query_vector: np.ndarray | None = None,
        query_text: str | None = None,
        k: int = 10,
        mode: Mode = "hybrid",
        filters: dict[str, Any] | None = None,
        score_threshold: float | None = None,
    ) -> list[SearchHit]:
        store = self.get(store_id)
        if not 1 <= k <= 100:
            raise InvalidRequestError(f"k, the number of results, must be between 1 and 100 (got {k})", param="k")
        if mode not in ("vector", "bm25", "hybrid"):
            raise InvalidRequestError(f"unknown retrieval mode {mode!r}; use vector, bm25 or hybrid", param="mode")
        if mode != "bm25" and query_vector is None:
            raise InvalidRequestError("a vector or hybrid search needs the query's embedding", param="query")
        if mode != "vector" and not (query_text or "").strip():
            raise InvalidRequestError("the query is empty: give some text to search for", param="query")
        where, params = compile_filter(filters, self.db.dialect) if filters else ("1 = 1", [])
        depth = k if mode != "hybrid" else max(3 * k, 30)
        ranked: list[list[tuple[int, float]]] = []
        if mode in ("vector", "hybrid"):
            ranked.append(self._vector(store, query_vector, depth, where, params, bool(filters)))  # type: ignore[arg-type]
        if mode in ("bm25", "hybrid"):
            ranked.append(self._bm25(store, query_text or "", depth, where, params))
        if mode == "hybrid":
            fused: dict[int, float] = {}
            for results in ranked:
                for rank, (chunk_id, _) in enumerate(results, start=1):
                    fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
            best = len(ranked) / (RRF_K + 1)
            scored = sorted(((cid, s / best) for cid, s in fused.items()), key=lambda x: -x[1])
        else:
            scored = ranked[0]
        if score_threshold is not None:
            scored = [(cid, s) for cid, s in scored if s >= score_threshold]
        self.db.execute("UPDATE vs_stores SET last_active_at = ? WHERE id = ?", (time.time(), store.id))
        return self._hits(store, scored[:k])

    def _vector(self, store: StoreInfo, query: np.ndarray, k: int, where: str, params: list, filtered: bool) -> list[tuple[int, float]]:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape != (store.dim,):
            raise InvalidRequestError(f"query embedding has {query.shape[0]} dimensions; the store has {store.dim}")
        if self.pg and not filtered and store.dim <= PG_HNSW_MAX_DIM:  # the store's HNSW graph (pgvector)
            q, dim = self._vector_param(query), int(store.dim)
            _hnsw_name(store.id)  # an id of ours: safe to write into the statement, as the partial index needs
            with self.db.transaction() as tx:
                tx.execute(f"SET LOCAL hnsw.ef_search = {max(PG_HNSW_EF_SEARCH, 2 * k)}")
                rows = tx.execute(
                    f"SELECT c.id, -(CAST(c.embedding AS vector({dim})) <#> CAST(? AS vector({dim}))) FROM vs_chunks c "
                    f"WHERE c.store_id = '{store.id}' ORDER BY CAST(c.embedding AS vector({dim})) <#> CAST(? AS vector({dim})) "
                    "LIMIT ?", [q, q, k]).fetchall()
            return [(int(r[0]), float(r[1])) for r in rows]
        if self.pg:  # filtered: every matching chunk is scored exactly, so a filtered search always finds k
            q = self._vector_param(query)
            rows = self.db.query(f"SELECT c.id, -(c.embedding <#> CAST(? AS vector)) FROM vs_chunks c WHERE c.store_id = ? AND ({where}) "
                                 "ORDER BY c.embedding <#> CAST(? AS vector) LIMIT ?", [q, store.id, *params, q, k])
            return [(int(r[0]), float(r[1])) for r in rows]
        if not filtered:
            scores, ids = self.index(store.id).search(query, k)
            return [(int(i), float(s)) for s, i in zip(scores, ids, strict=True) if i >= 0]
        # One query reads the matching chunks' vectors; only when there are too many to score exactly does the
        # index search them instead, through an id selector.
        rows = self.db.query(f"SELECT c.id, c.embedding FROM vs_chunks c WHERE c.store_id = ? AND ({where}) LIMIT ?",
                             [store.id, *params, EXACT_FILTER_LIMIT + 1])
        if len(rows) <= EXACT_FILTER_LIMIT:
            if not rows:
                return []
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), store.dim)
            scores = vectors @ query
            order = np.argsort(-scores)[:k]
            return [(int(ids[i]), float(scores[i])) for i in order]
        allowed = [r[0] for r in self.db.query(f"SELECT c.id FROM vs_chunks c WHERE c.store_id = ? AND ({where})", [store.id, *params])]
        scores, ids = self.index(store.id).search(query, k, np.array(allowed, dtype=np.int64))
        return [(int(i), float(s)) for s, i in zip(scores, ids, strict=True) if i >= 0]

    def _bm25(self, store: StoreInfo, text: str, k: int, where: str, params: list) -> list[tuple[int, float]]:
        terms = re.findall(r"\w+", text.lower())
        if not terms:
            return []
        if self.pg:  # PostgreSQL's full-text search: English stemming (as FTS5's porter), cover-density rank
            rows = self.db.query(
                f"SELECT c.id, ts_rank_cd(c.tsv, q) AS score FROM vs_chunks c, to_tsquery('english', ?) q "
                f"WHERE c.tsv @@ q AND c.store_id = ? AND ({where}) ORDER BY score DESC, c.id LIMIT ?",
                [" | ".join(dict.fromkeys(terms)), store.id, *params, k])
            return [(int(r[0]), float(r[1])) for r in rows]
        match = " OR ".join(f'"{t}"' for t in dict.fromkeys(terms))
        rows = self.db.query(
            f"SELECT c.id, -bm25(vs_chunks_fts) AS score FROM vs_chunks_fts JOIN vs_chunks c ON c.id = vs_chunks_fts.rowid "
            f"WHERE vs_chunks_fts MATCH ? AND c.store_id = ? AND ({where}) ORDER BY bm25(vs_chunks_fts) LIMIT ?",
            [match, store.id, *params, k],
        )
        return [(r[0], float(r[1])) for r in rows]

    def _hits(self, store: StoreInfo, scored: list[tuple[int, float]]) -> list[SearchHit]:
        if not scored:
            return []
        placeholders = ",".join("?" * len(scored))
        rows = {r["id"]: r for r in self.db.query(
            "SELECT c.id, c.file_id, c.text, c.page, c.start_char, c.end_char, c.attributes, f.filename FROM vs_chunks c"
            f" JOIN vs_files f ON f.store_id = c.store_id AND f.file_id = c.file_id "
            f"WHERE c.id IN ({placeholders})", [cid for cid, _ in scored])}
        return [
            SearchHit(cid, rows[cid]["file_id"], rows[cid]["filename"], score, rows[cid]["text"], rows[cid]["page"],
                      rows[cid]["start_char"], rows[cid]["end_char"], json.loads(rows[cid]["attributes"]))
            for cid, score in scored if cid in rows
        ]

    def _index_path(self, store_id: str) -> Path:
        return self.index_dir / f"{store_id}.faiss"


# --- filters ------------------------------------------------------------------------------------------------

_COMPARISONS = {"eq": "=", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_BUILTIN_KEYS = {"file_id": "c.file_id", "page": "c.page", "filename": "(SELECT filename FROM vs_files f2 WHERE f2.store_id = c.store_id AND f2.file_id = c.file_id)"}
# The key is a parameter, not part of a JSON path: any key (quotes, dots, backslashes) names itself.
_ATTRIBUTE = "(SELECT value FROM json_each(c.attributes) WHERE key = ?)"
# On PostgreSQL both sides are jsonb: comparisons across types (a page against a string) are false, never errors.
_PG_ATTRIBUTE = "(CAST(c.attributes AS jsonb) -> ?)"
MAX_FILTER_DEPTH = 32
MAX_FILTER_VALUES = 10_000
"""Limits that keep a compiled filter within SQLite's (expression depth, bound parameters)."""


def compile_filter(spec: dict[str, Any], dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """A filter -> (SQL boolean expression over `vs_chunks c`, its parameters).

    A filter is a plain structure in the shape of OpenAI's file-search filters: `{"type": "eq"|"ne"|"gt"|
    "gte"|"lt"|"lte", "key", "value": scalar}`, `{"type": "in"|"nin", "key", "value": [scalars]}` or
    `{"type": "and"|"or", "filters": [filters]}`. Callers validate it (the API's models publish that
    schema); what cannot be compiled is refused whole. `dialect` is the database's ("sqlite" or "postgresql")."""
    sql, params = _compile(spec, 0, dialect == "postgresql")
    if len(params) > MAX_FILTER_VALUES:
        raise InvalidRequestError(f"the filter holds {len(params)} keys and values; at most {MAX_FILTER_VALUES}", param="filters")
    return sql, params


def _compile(spec: Any, depth: int, pg: bool = False) -> tuple[str, list[Any]]:
    kind = spec.get("type") if isinstance(spec, dict) else None
    parts, key, value = (spec.get("filters"), spec.get("key"), spec.get("value")) if isinstance(spec, dict) else (None, None, None)
    if depth > MAX_FILTER_DEPTH:
        raise InvalidRequestError(f"filters nest more than {MAX_FILTER_DEPTH} levels deep", param="filters")
    if kind in ("and", "or") and isinstance(parts, list) and parts:
        compiled = [_compile(p, depth + 1, pg) for p in parts]
        return f" {kind.upper()} ".join(f"({s})" for s, _ in compiled), [v for _, ps in compiled for v in ps]
    if isinstance(key, str) and key:
        column, key_params = (_BUILTIN_KEYS[key], []) if key in _BUILTIN_KEYS else (_PG_ATTRIBUTE if pg else _ATTRIBUTE, [key])
        if pg and key in _BUILTIN_KEYS:
            column = f"to_jsonb({column})"
        slot, bind = ("CAST(? AS jsonb)", json.dumps) if pg else ("?", lambda v: v)
        if kind in _COMPARISONS and _scalar(value):
            return f"{column} {_COMPARISONS[kind]} {slot}", [*key_params, bind(value)]
        if kind in ("in", "nin") and isinstance(value, list) and value and all(_scalar(v) for v in value):
            negation = "NOT " if kind == "nin" else ""
            return f"{column} {negation}IN ({','.join([slot] * len(value))})", [*key_params, *map(bind, value)]
    raise InvalidRequestError(
        f"cannot compile the filter {spec!r:.100}: use eq, ne, gt, gte, lt or lte with a key and a string, number or "
        "boolean value; in or nin with a key and a non-empty list of them; and/or with a non-empty list of filters",
        param="filters",
    )


def _scalar(value: Any) -> bool:
    """A value SQLite binds: a string, a float, a boolean, or an integer of 64 bits."""
    return isinstance(value, str | float | bool) or (isinstance(value, int) and -(2**63) <= value < 2**63)


def _hnsw_name(store_id: str) -> str:
    """The name of a store's pgvector index; store ids are made here (vs_ and hex digits), so they are safe in SQL."""
    if not re.fullmatch(r"vs_[0-9a-f]+", store_id):
        raise InvalidRequestError(f"not a vector store id: {store_id!r}")
    return f"vs_hnsw_{store_id.removeprefix('vs_')}"


def _store(row: Any) -> StoreInfo:
    return StoreInfo(row["id"], row["name"], row["created_at"], row["last_active_at"], json.loads(row["metadata"]),
                     row["embedding_model"], row["dim"], row["chunk_tokens"], row["chunk_overlap"], row["generation"])


def _file(row: Any) -> FileRecord:
    return FileRecord(row["file_id"], row["filename"], row["status"], row["source"], row["sha256"], row["bytes"], row["error"],
                      json.loads(row["attributes"]), row["chunk_count"], row["duplicate_chunks"], row["created_at"])
