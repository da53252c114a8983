"""The embedded database: SQLite under LAMINA_HOME, one connection per thread, WAL, migrations per owner.

Each component that stores something (API keys, usage, conversations, ...) owns its tables and brings its
own migrations: `db.migrate("api_keys", [sql_v1, sql_v2, ...])` applies the ones not yet applied, in one
transaction each, and records them in `lamina_migrations`. Writes go through `db.transaction()`, which
commits or rolls back as a unit.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lamina.errors import LaminaError


class DatabaseError(LaminaError):
    code = "database_error"


class Database:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS lamina_migrations (owner TEXT PRIMARY KEY, version INTEGER NOT NULL)")

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot open the database {self.path}: {e}") from None
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        return self.connection().execute(sql, params).fetchone()

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """One statement in its own transaction; returns lastrowid."""
        with self.transaction() as conn:
            return conn.execute(sql, params).lastrowid or 0

    def migrate(self, owner: str, migrations: Sequence[str]) -> None:
        """Apply `migrations[v:]` for `owner`, where v is how many were applied before."""
        with self._lock, self.transaction() as conn:
            row = conn.execute("SELECT version FROM lamina_migrations WHERE owner = ?", (owner,)).fetchone()
            done = row["version"] if row else 0
            for sql in migrations[done:]:
                for statement in _statements(sql):
                    conn.execute(statement)
            if len(migrations) > done:
                conn.execute(
                    "INSERT INTO lamina_migrations (owner, version) VALUES (?, ?) "
                    "ON CONFLICT(owner) DO UPDATE SET version = excluded.version",
                    (owner, len(migrations)),
                )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit the open transaction).

    Pieces are joined until SQLite says the statement is complete, so triggers (which hold `;`) survive.
    """
    statements, buffer = [], ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n\t;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip(" \n\t;"):
        statements.append(buffer.strip())
    return statements
