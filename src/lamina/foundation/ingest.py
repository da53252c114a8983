"""Ingestion: files -> cleaned, chunked, de-duplicated, embedded chunks -> a vector store.

Each file is one unit of work and one transaction in the store: a file is either fully in the store (all
its chunks, searchable) or not at all, whatever happens to the process. A file whose content hash is
already in the store is skipped; a changed one replaces its old version. A file that cannot be read is
recorded as failed with its one-line error, and the others go on.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lamina.errors import InvalidRequestError
from lamina.foundation.chunking import chunk_document, dedupe_chunks
from lamina.foundation.documents import SUPPORTED_SUFFIXES, load_document
from lamina.foundation.embeddings import Embedder
from lamina.foundation.readers import DocumentError
from lamina.infra.vectorstore import ChunkRecord, FileRecord, Scalar, StoreInfo, VectorStores

logger = logging.getLogger(__name__)


@dataclass
class IngestReport:
    added: list[FileRecord] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[FileRecord] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


class Ingestor:
    """Puts documents into one vector store with one embedding model."""

    def __init__(self, stores: VectorStores, store: StoreInfo, embedder: Embedder, batch_size: int = 32) -> None:
        if store.embedding_model != embedder.name or store.dim != embedder.dim:
            raise InvalidRequestError(
                f"vector store {store.name!r} holds {store.embedding_model} embeddings ({store.dim}-d); "
                f"this embedder is {embedder.name} ({embedder.dim}-d)"
            )
        self.stores, self.store, self.embedder, self.batch_size = stores, store, embedder, batch_size

    def ingest_bytes(
        self,
        file_id: str,
        filename: str,
        data: bytes,
        *,
        attributes: dict[str, Scalar] | None = None,
        source: str | None = None,
    ) -> FileRecord:
        """One file, start to finish; a file that cannot be read is stored as failed (and raises nothing)."""
        sha = hashlib.sha256(data).hexdigest()
        base = FileRecord(file_id, Path(filename).name, "completed", source=source, sha256=sha, bytes=len(data),
                          attributes=dict(attributes or {}))
        try:
            doc = load_document(source or filename, data=data, filename=filename)
            chunks = dedupe_chunks(chunk_document(doc, self.embedder.tokenizer, max_tokens=self.store.chunk_tokens,
                                                  overlap=self.store.chunk_overlap))
            vectors = self.embedder.embed([c.text for c in chunks], batch_size=self.batch_size) if chunks else np.zeros((0, self.embedder.dim))
        except DocumentError as e:
            failed = FileRecord(**{**base.__dict__, "status": "failed", "error": e.message})
            return self.stores.put_file(self.store.id, failed, [])
        records = [
            ChunkRecord(c.text, c.page, c.start, c.end, c.n_tokens, dict(c.attributes), c.content_hash, v.astype(np.float32))
            for c, v in zip(chunks, vectors, strict=True)
        ]
        return self.stores.put_file(self.store.id, base, records)

    def ingest_paths(
        self,
        paths: Iterable[str | Path],
        *,
        attributes: dict[str, Scalar] | None = None,
        on_file: Callable[[Path, FileRecord | None], None] | None = None,
    ) -> IngestReport:
        """Files and folders (recursively; only supported types inside folders). Unchanged files are skipped."""
        report = IngestReport()
        start = time.perf_counter()
        for path in expand_paths(paths):
            file_id = path_file_id(path)
            try:
                data = path.read_bytes()
            except OSError as e:
                record = self.stores.put_file(self.store.id, FileRecord(file_id, path.name, "failed", source=str(path),
                                                                       error=f"{path}: cannot read ({e.strerror})"), [])
                report.failed.append(record)
                _notify(on_file, path, record)
                continue
            if self.stores.unchanged(self.store.id, file_id, hashlib.sha256(data).hexdigest()):
                report.unchanged.append(str(path))
                _notify(on_file, path, None)
                continue
            record = self.ingest_bytes(file_id, path.name, data, attributes=attributes, source=str(path))
            if record.status == "failed":
                report.failed.append(record)
            else:
                report.added.append(record)
                report.chunks += record.chunk_count
            _notify(on_file, path, record)
        report.seconds = time.perf_counter() - start
        return report


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Given files as they are; folders walked for supported files, in a stable order."""
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser().resolve()
        if path.is_dir():
            out += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES and not f.name.startswith("."))
        elif path.exists():
            out.append(path)
        else:
            raise InvalidRequestError(f"no such file or folder: {p}", param="paths")
    return list(dict.fromkeys(out))


def path_file_id(path: Path) -> str:
    """A stable id for a local file: the same path is the same file across runs."""
    return "path-" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:24]


def _notify(callback: Callable[[Path, FileRecord | None], None] | None, path: Path, record: FileRecord | None) -> None:
    if callback is not None:
        callback(path, record)

