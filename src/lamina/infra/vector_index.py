"""The FAISS index of one vector store: a cache of SQLite's embeddings, persisted beside the database.

SQLite is the system of record; this index can always be rebuilt from it. Each store's index is saved as
`<root>/<store_id>.faiss` with a `<store_id>.json` sidecar naming the store *generation* it reflects (a
counter SQLite bumps in the same transaction as every change to the store's chunks). An index whose
sidecar is missing, unreadable or of another generation is stale and is rebuilt, which is what makes a
crash between "commit to SQLite" and "save the index" harmless.

Stores use exact inner-product search (`IndexFlatIP`) up to `HNSW_THRESHOLD` vectors and HNSW above.
The threshold is measured (`bench/search.py`): exact search over 100k 384-d vectors takes about 5 ms a
query on two cores, while HNSW needs a large search beam to keep recall@10 above 0.9 on unstructured data,
so the exact path stays exact until its latency, growing linearly, reaches about 10 ms. Vectors are
L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lamina.infra.fs import atomic_write_text

logger = logging.getLogger(__name__)

HNSW_THRESHOLD = 200_000
"""Vectors from which a store switches from exact search to HNSW (see bench/search.py)."""
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256


class VectorIndex:
    def __init__(self, path: Path, dim: int, generation: int, index: object, kind: str) -> None:
        self.path, self.dim, self.generation, self.index, self.kind = path, dim, generation, index, kind

    @property
    def size(self) -> int:
        return int(self.index.ntotal)  # type: ignore[attr-defined]

    @classmethod
    def open(
        cls,
        path: Path,
        dim: int,
        generation: int,
        count: int,
        load_all: Callable[[], tuple[np.ndarray, np.ndarray]],
    ) -> VectorIndex:
        """The saved index if it reflects `generation` and holds `count` vectors, else one rebuilt by `load_all`.

        load_all() returns (ids int64 (N,), vectors float32 (N, dim)) from the system of record.
        """
        import faiss

        meta = _read_meta(path)
        if meta is not None and meta.get("generation") == generation and meta.get("count") == count and meta.get("dim") == dim:
            try:
                index = faiss.read_index(str(path))
                if index.ntotal == count and index.d == dim:
                    return cls(path, dim, generation, index, meta.get("kind", "flat"))
                logger.warning("vector index %s holds %d vectors, expected %d: rebuilding", path, index.ntotal, count)
            except RuntimeError as e:  # faiss reports a corrupt file as RuntimeError
                logger.warning("vector index %s is unreadable (%s): rebuilding", path, e)
        elif meta is not None:
            logger.info("vector index %s is stale (generation %s, database %s): rebuilding", path, meta.get("generation"), generation)
        ids, vectors = load_all()
        built = cls.build(path, dim, generation, ids, vectors)
        built.save()
        return built

    @classmethod
    def build(cls, path: Path, dim: int, generation: int, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        import faiss

        kind = "hnsw" if len(ids) >= HNSW_THRESHOLD else "flat"
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            inner = faiss.IndexFlatIP(dim)
        index = faiss.IndexIDMap2(inner)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        return cls(path, dim, generation, index, kind)

    def add(self, ids: np.ndarray, vectors: np.ndarray, generation: int) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))  # type: ignore[attr-defined]
        self.generation = generation

    def remove(self, ids: np.ndarray, generation: int) -> bool:
        """Drop ids in place; False when the index kind cannot (HNSW), and the caller must rebuild."""
        if self.kind != "flat":
            return False
        import faiss

        if len(ids):
            self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))  # type: ignore[attr-defined]
        self.generation = generation
        return True

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest, optionally only among `allowed` ids; ids are -1 past the end."""
        import faiss

        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        k = max(1, min(k, max(self.size, 1)))
        selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)) if allowed is not None else None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=HNSW_EF_SEARCH)
            if selector is not None:
                params.sel = selector
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        scores, ids = self.index.search(query, k, params=params)  # type: ignore[attr-defined]
        return scores[0], ids[0]

    def save(self) -> None:
        """Write the index, then the sidecar naming its generation (both atomically, sidecar last)."""
        import faiss

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"generation": self.generation, "count": self.size, "dim": self.dim, "kind": self.kind}
        atomic_write_text(_meta_path(self.path), json.dumps(meta))

    @staticmethod
    def delete_files(path: Path) -> None:
        path.unlink(missing_ok=True)
        _meta_path(path).unlink(missing_ok=True)


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(_meta_path(path).read_text())
    except (OSError, ValueError):
        return None
