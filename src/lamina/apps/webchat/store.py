"""Conversations of the web chat, persisted in SQLite and scoped to the API key that made them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from lamina.errors import LaminaError
from lamina.infra.db import Database

MIGRATIONS = {
    "sqlite": [
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner INTEGER,
            title TEXT NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX conversations_owner ON conversations (owner, updated_at);
        CREATE TABLE conversation_messages (
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (conversation_id, position)
        )
        """,
    ],
    "postgresql": [
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner BIGINT,
            title TEXT NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX conversations_owner ON conversations (owner, updated_at);
        CREATE TABLE conversation_messages (
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (conversation_id, position)
        )
        """,
    ],
}


class NotFound(LaminaError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "conversation_not_found"


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("webchat", MIGRATIONS)

    def list(self, owner: int | None) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT id, title, created_at, updated_at FROM conversations WHERE owner IS NOT DISTINCT FROM ? ORDER BY updated_at DESC", (owner,)
        )
        return [dict(r) for r in rows]

    def create(self, owner: int | None, title: str, settings: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        cid = f"conv_{uuid.uuid4().hex[:20]}"
        self.db.execute(
            "INSERT INTO conversations (id, owner, title, settings, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (cid, owner, title, json.dumps(settings), now, now),
        )
        return self.get(owner, cid)

    def get(self, owner: int | None, cid: str) -> dict[str, Any]:
        row = self.db.query_one("SELECT * FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (cid, owner))
        if row is None:
            raise NotFound(f"No conversation with id {cid!r}.", param="conversation_id")
        messages = self.db.query(
            "SELECT role, content, meta FROM conversation_messages WHERE conversation_id = ? ORDER BY position", (cid,)
        )
        return {
            "id": row["id"], "title": row["title"], "settings": json.loads(row["settings"]),
            "created_at": row["created_at"], "updated_at": row["updated_at"],
            "messages": [{"role": m["role"], "content": m["content"], "meta": json.loads(m["meta"])} for m in messages],
        }

    def update(self, owner: int | None, cid: str, title: str | None, settings: dict[str, Any] | None) -> dict[str, Any]:
        current = self.get(owner, cid)
        self.db.execute(
            "UPDATE conversations SET title = ?, settings = ?, updated_at = ? WHERE id = ?",
            (title if title is not None else current["title"], json.dumps(settings if settings is not None else current["settings"]),
             time.time(), cid),
        )
        return self.get(owner, cid)

    def replace_messages(self, owner: int | None, cid: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Replace the whole message list in one transaction (edits and regenerations rewrite the tail)."""
        self.get(owner, cid)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM conversation_messages WHERE conversation_id = ?", (cid,))
            conn.executemany(
                "INSERT INTO conversation_messages (conversation_id, position, role, content, meta) VALUES (?, ?, ?, ?, ?)",
                [(cid, i, m["role"], m["content"], json.dumps(m.get("meta") or {})) for i, m in enumerate(messages)],
            )
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))
        return self.get(owner, cid)

    def delete(self, owner: int | None, cid: str) -> None:
        self.get(owner, cid)
        self.db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
