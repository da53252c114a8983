"""Uploaded files (`/v1/files`): on SQLite, bytes under LAMINA_HOME/files and the record in the database; on
PostgreSQL, both in the database, in one row, so that every replica serves the same files.

On SQLite the blob is written (atomically) before its row is committed, and deleted after its row is, so a
crash leaves at worst an unreferenced blob, never a row without its bytes; `sweep()` removes such leftovers.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.db import Database
from lamina.infra.fs import atomic_write_bytes

MIGRATIONS = {
    "sqlite": [
        """
        CREATE TABLE files (
            id TEXT PRIMARY KEY,
            filename TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            purpose TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            created_at REAL NOT NULL
        )
        """,
    ],
    "postgresql": [
        """
        CREATE TABLE files (
            id TEXT PRIMARY KEY,
            filename TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            data BYTEA,
            purpose TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )
        """,
    ],
}
PURPOSES = ("assistants", "user_data", "batch", "fine-tune", "vision", "evals")
"""What an upload may be for."""
OUTPUT_PURPOSES = ("batch_output",)
"""What the server writes: a batch's output and error files."""


class FileNotFound(LaminaError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "file_not_found"


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    bytes: int
    purpose: str
    sha256: str
    created_at: float


class FileStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db, self.root = db, Path(root)
        db.migrate("files", MIGRATIONS)
        self.in_database = db.dialect == "postgresql"
        """On PostgreSQL the bytes live in the database (shared by replicas); on SQLite in files under `root`."""

    def create(self, filename: str, data: bytes, purpose: str = "assistants") -> StoredFile:
        if purpose not in PURPOSES + OUTPUT_PURPOSES:
            raise InvalidRequestError(f"purpose must be one of {', '.join(PURPOSES)} (got {purpose!r})", param="purpose")
        name = Path(filename or "").name
        if not name:
            raise InvalidRequestError("the upload has no filename", param="file")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        record = StoredFile(file_id, name, len(data), purpose, hashlib.sha256(data).hexdigest(), time.time())
        if self.in_database:  # every replica reads the same bytes
            self.db.execute(
                "INSERT INTO files (id, filename, bytes, data, purpose, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.filename, record.bytes, data, record.purpose, record.sha256, record.created_at),
            )
            return record
        atomic_write_bytes(self._path(file_id), data)
        try:
            self.db.execute(
                "INSERT INTO files (id, filename, bytes, purpose, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.filename, record.bytes, record.purpose, record.sha256, record.created_at),
            )
        except BaseException:
            self._path(file_id).unlink(missing_ok=True)
            raise
        return record

    def get(self, file_id: str) -> StoredFile:
        row = self.db.query_one("SELECT id, filename, bytes, purpose, sha256, created_at FROM files WHERE id = ?", (file_id,))
        if row is None:
            raise FileNotFound(f"No file with id {file_id!r}.", param="file_id")
        return StoredFile(row["id"], row["filename"], row["bytes"], row["purpose"], row["sha256"], row["created_at"])

    def list(self, purpose: str | None = None) -> list[StoredFile]:
        columns = "id, filename, bytes, purpose, sha256, created_at"
        rows = (self.db.query(f"SELECT {columns} FROM files ORDER BY created_at DESC") if purpose is None else
                self.db.query(f"SELECT {columns} FROM files WHERE purpose = ? ORDER BY created_at DESC", (purpose,)))
        return [StoredFile(*r) for r in rows]

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        if self.in_database:
            return bytes(self.db.query_one("SELECT data FROM files WHERE id = ?", (file_id,))[0])
        return self._path(file_id).read_bytes()

    def delete(self, file_id: str) -> StoredFile:
        record = self.get(file_id)
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self._path(file_id).unlink(missing_ok=True)
        return record

    def sweep(self) -> int:
        """Remove blobs whose row never committed (a crash between the two writes)."""
        if self.in_database or not self.root.is_dir():
            return 0
        known = {r["id"] for r in self.db.query("SELECT id FROM files")}
        removed = 0
        for blob in self.root.iterdir():
            if blob.is_file() and blob.name.startswith("file-") and blob.name not in known:
                blob.unlink()
                removed += 1
        return removed

    def _path(self, file_id: str) -> Path:
        return self.root / file_id
