"""API keys: one static key (`--api-key`, like vLLM) and managed keys stored hashed in SQLite.

A managed key is shown once, at creation (`lam-` + 43 URL-safe characters, 256 bits); the database keeps
its SHA-256 and an 8-character prefix to recognise it in listings. A key may carry requests-per-minute and
tokens-per-minute limits and a list of models it may use. When any key exists (static or active managed),
every API route needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from lamina.errors import InvalidRequestError
from lamina.infra.db import Database

MIGRATIONS = [
    """
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        rpm INTEGER,
        tpm INTEGER,
        models TEXT,
        created_at REAL NOT NULL,
        revoked_at REAL
    )
    """,
]

STATIC_KEY_ID = 0  # the --api-key key: no row, no limits, every model


@dataclass(frozen=True)
class APIKey:
    id: int
    name: str
    prefix: str
    rpm: int | None
    tpm: int | None
    models: tuple[str, ...]
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


STATIC_KEY = APIKey(STATIC_KEY_ID, "static (--api-key)", "", None, None, (), 0.0, None)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _row(row) -> APIKey:  # type: ignore[no-untyped-def]
    return APIKey(
        row["id"], row["name"], row["prefix"], row["rpm"], row["tpm"], tuple(json.loads(row["models"] or "[]")),
        row["created_at"], row["revoked_at"],
    )


class KeyStore:
    def __init__(self, db: Database, static_key: str | None = None) -> None:
        self.db = db
        self.static_key = static_key or None
        db.migrate("api_keys", MIGRATIONS)

    def create(self, name: str, *, rpm: int | None = None, tpm: int | None = None, models: list[str] | None = None) -> tuple[APIKey, str]:
        """A new key; returns the record and the secret, which is not stored and cannot be shown again."""
        name = name.strip()
        if not name:
            raise InvalidRequestError("a key needs a name: --name NAME", param="name")
        for label, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise InvalidRequestError(f"--{label} must be at least 1 (got {value})", param=label)
        secret = "lam-" + secrets.token_urlsafe(32)
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone():
                raise InvalidRequestError(f"a key named {name!r} already exists; pick another name or revoke it first", param="name")
            conn.execute(
                "INSERT INTO api_keys (name, prefix, key_hash, rpm, tpm, models, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, secret[:8], _hash(secret), rpm, tpm, json.dumps(sorted(set(models or []))), time.time()),
            )
        key = self.get(name)
        assert key is not None
        return key, secret

    def get(self, name_or_prefix: str) -> APIKey | None:
        row = self.db.query_one("SELECT * FROM api_keys WHERE name = ? OR prefix = ? ORDER BY id DESC", (name_or_prefix, name_or_prefix))
        return _row(row) if row else None

    def list(self) -> list[APIKey]:
        return [_row(r) for r in self.db.query("SELECT * FROM api_keys ORDER BY id")]

    def revoke(self, name_or_prefix: str) -> APIKey:
        key = self.get(name_or_prefix)
        if key is None:
            names = ", ".join(k.name for k in self.list()) or "none"
            raise InvalidRequestError(f"no key named {name_or_prefix!r}; keys: {names}", param="name")
        if key.active:
            self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key.id))
        return self.get(key.name) or key

    def auth_required(self) -> bool:
        if self.static_key:
            return True
        return self.db.query_one("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1") is not None

    def lookup(self, secret: str) -> APIKey | None:
        """The active key for this secret, or None."""
        if self.static_key and hmac.compare_digest(secret.encode(), self.static_key.encode()):
            return STATIC_KEY
        row = self.db.query_one("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (_hash(secret),))
        return _row(row) if row else None
