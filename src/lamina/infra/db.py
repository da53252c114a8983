"""The database: embedded SQLite under LAMINA_HOME by default, PostgreSQL by URL; one interface for both.

`open_database(target)` takes a path (SQLite: one connection per thread, WAL) or a `postgresql://` URL
(psycopg 3: a small pool of connections, shared by every replica that names the same URL). Each component
that stores something (API keys, usage, conversations, ...) owns its tables and brings its own migrations,
per backend: `db.migrate("api_keys", {"sqlite": [v1, v2], "postgresql": [v1, v2]})` (or one list of portable
statements) applies the ones not yet applied, in one transaction each, recorded in `lamina_migrations`.

Statements are written once, with `?` placeholders and SQL both engines speak (`ON CONFLICT`, `CASE`,
`COALESCE`); the PostgreSQL backend rewrites the placeholders. Rows read by name or by position on both.
Writes go through `db.transaction()`, which commits or rolls back as a unit; inside it `tx.insert(...)`
returns the new row's id (`RETURNING id` on PostgreSQL) and `tx.lock(name)` serialises writers that must
see each other (a no-op on SQLite, whose write transactions are already serial; an advisory lock on
PostgreSQL, which is what makes rate limits hold across replicas).
"""

from __future__ import annotations

import functools
import queue
import re
import sqlite3
import threading
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from lamina.errors import InvalidRequestError, LaminaError

Dialect = Literal["sqlite", "postgresql"]
Migrations = Sequence[str] | Mapping[str, Sequence[str]]
Params = Sequence[Any] | Mapping[str, Any]


class DatabaseError(LaminaError):
    code = "database_error"


def open_database(target: str | Path) -> Database:
    """A `postgresql://` (or `postgres://`) URL opens PostgreSQL; anything else is a SQLite file path."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(target)
    if isinstance(target, str) and "://" in target:
        raise DatabaseError(f"unsupported database URL {redact_url(target)}: use postgresql://user:password@host/db or a file path")
    return SQLiteDatabase(target)


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Row(tuple):
    """A result row readable by position (`row[0]`, unpacking) and by column name (`row["id"]`, `dict(row)`)."""

    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


class Tx:
    """A connection inside a transaction: `execute`, `executemany`, `insert` (the new id) and `lock`."""

    def execute(self, sql: str, params: Params = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        raise NotImplementedError

    def insert(self, sql: str, params: Params = (), id_column: str = "id") -> int:
        """Run an INSERT; the new row's `id_column`, or 0 when it inserted nothing (ON CONFLICT DO NOTHING)."""
        raise NotImplementedError

    def lock(self, name: str) -> None:
        """Hold `name` until the transaction ends, against every other connection to this database."""
        raise NotImplementedError


class Database:
    """The interface both backends implement; see the module docstring."""

    dialect: Dialect
    target: str

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        raise NotImplementedError
        yield

    def query(self, sql: str, params: Params = ()) -> list[Any]:
        raise NotImplementedError

    def query_one(self, sql: str, params: Params = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Params = ()) -> int:
        """One statement in its own transaction; returns the number of rows it changed."""
        with self.transaction() as tx:
            return int(tx.execute(sql, params).rowcount or 0)

    def insert(self, sql: str, params: Params = (), id_column: str = "id") -> int:
        """One INSERT in its own transaction; returns the new row's id."""
        with self.transaction() as tx:
            return tx.insert(sql, params, id_column)

    def migrate(self, owner: str, migrations: Migrations) -> None:
        """Apply this backend's `migrations[v:]` for `owner`, where v is how many were applied before."""
        steps = list(migrations[self.dialect] if isinstance(migrations, Mapping) else migrations)
        with self.transaction() as tx:
            tx.lock("lamina_migrations")  # replicas starting at once migrate one after the other
            row = tx.execute("SELECT version FROM lamina_migrations WHERE owner = ?", (owner,)).fetchone()
            done = row[0] if row else 0
            for sql in steps[done:]:
                for statement in self._statements(sql):
                    tx.execute(statement)
            if len(steps) > done:
                tx.execute("INSERT INTO lamina_migrations (owner, version) VALUES (?, ?) "
                           "ON CONFLICT (owner) DO UPDATE SET version = excluded.version", (owner, len(steps)))

    def _statements(self, script: str) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


# --- SQLite -------------------------------------------------------------------------------------------------


class _SQLiteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        self.conn.executemany(sql, rows)

    def insert(self, sql: str, params: Params = (), id_column: str = "id") -> int:
        cursor = self.conn.execute(sql, params)
        return int(cursor.lastrowid or 0) if cursor.rowcount > 0 else 0  # lastrowid is stale after ON CONFLICT DO NOTHING

    def lock(self, name: str) -> None:
        """BEGIN IMMEDIATE already holds the database's one write lock."""


@functools.lru_cache(maxsize=1024)
def _names(columns: tuple[str, ...]) -> dict[str, int]:
    names: dict[str, int] = {}
    for i, c in enumerate(columns):
        names.setdefault(c, i)
    return names


class SQLiteDatabase(Database):
    dialect: Dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.target = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS lamina_migrations (owner TEXT PRIMARY KEY, version INTEGER NOT NULL)")

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot open the database {self.path}: {e}") from None
            conn.row_factory = sqlite3.Row  # by name and by position, like Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SQLiteTx(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: Params = ()) -> list[Any]:
        return self.connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> Any:
        return self.connection().execute(sql, params).fetchone()

    def _statements(self, script: str) -> list[str]:
        """Split a migration into statements (executescript would commit the open transaction).

        Pieces are joined until SQLite says the statement is complete, so triggers (which hold `;`) survive."""
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

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# --- PostgreSQL ---------------------------------------------------------------------------------------------

POOL_SIZE = 8
"""Connections one process keeps to PostgreSQL (threads beyond it wait for one)."""
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")


@functools.lru_cache(maxsize=4096)
def to_pyformat(sql: str) -> str:
    """`?` placeholders to psycopg's `%s` outside quoted strings and names; every literal `%` to `%%` (psycopg reads
    them everywhere, inside quotes too, as queries always go with their parameters, even none)."""
    return _TOKEN.sub(lambda m: "%s" if m.group() == "?" else m.group().replace("%", "%%"), sql)


def _pg_params(params: Params) -> Params:
    """PostgreSQL's text cannot hold NUL: a clear 400 rather than a driver error (SQLite stores it)."""
    values = params.values() if isinstance(params, Mapping) else params
    for v in values:
        if isinstance(v, str) and "\x00" in v:
            raise InvalidRequestError("the text holds a NUL character (\\u0000), which the database (PostgreSQL) cannot store")
    return params


class _PgTx(Tx):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Params = ()) -> Any:
        return self.conn.execute(to_pyformat(sql), _pg_params(params))

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(to_pyformat(sql), [_pg_params(r) for r in rows])

    def insert(self, sql: str, params: Params = (), id_column: str = "id") -> int:
        row = self.execute(f"{sql} RETURNING {id_column}", params).fetchone()
        return int(row[0]) if row else 0

    def lock(self, name: str) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(name.encode()) - 2**31,))


def _pg_row(cursor: Any) -> Any:
    names = _names(tuple(d.name for d in cursor.description)) if cursor.description else {}

    def make(values: Sequence[Any]) -> Row:
        row = Row(values)
        row._names = names
        return row

    return make


class PostgresDatabase(Database):
    dialect: Dialect = "postgresql"

    def __init__(self, url: str, pool_size: int = POOL_SIZE) -> None:
        try:
            import psycopg
        except ImportError:
            raise DatabaseError("PostgreSQL needs psycopg: pip install 'lamina[postgres]'") from None
        self._psycopg = psycopg
        self.target = redact_url(url)
        self._url = url
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._free = threading.Semaphore(pool_size)
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        conn = self._connect()  # fails at once, with the URL (password hidden), if the server is unreachable
        self._pool.put(conn)
        with self.transaction() as tx:
            tx.lock("lamina_migrations")
            tx.execute("CREATE TABLE IF NOT EXISTS lamina_migrations (owner TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            tx.execute("CREATE EXTENSION IF NOT EXISTS vector")

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self._url, autocommit=True, row_factory=_pg_row, connect_timeout=10)
        except self._psycopg.Error as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatabaseError(f"cannot connect to the database {self.target}: {reason} (check LAMINA_DATABASE_URL or --database-url, and that the server is up)") from None
        with self._lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """The thread's connection while it holds one (a query inside a transaction sees its writes), else one
        from the pool; a broken connection is replaced."""
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        self._free.acquire()
        try:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                conn = self._connect()
            if conn.broken or conn.closed:
                conn = self._connect()
            self._local.conn = conn
            try:
                yield conn
            finally:
                self._local.conn = None
                if not (conn.broken or conn.closed):
                    self._pool.put(conn)
        finally:
            self._free.release()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._connection() as conn:
            if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                yield _PgTx(conn)  # already inside this thread's transaction: part of it
                return
            with conn.transaction():
                yield _PgTx(conn)

    def query(self, sql: str, params: Params = ()) -> list[Any]:
        with self._connection() as conn:
            return conn.execute(to_pyformat(sql), _pg_params(params)).fetchall()

    def _statements(self, script: str) -> list[str]:
        """Statements split on `;` outside quotes and dollar-quoted bodies (PL/pgSQL functions hold `;`)."""
        out, start, i, quote = [], 0, 0, None
        while i < len(script):
            if quote:
                if script.startswith(quote, i):
                    i += len(quote) - 1
                    quote = None
            elif script[i] in "'\"":
                quote = script[i]
            elif script[i] == "$" and (m := re.match(r"\$[A-Za-z_]*\$", script[i:])):
                quote = m.group()
                i += len(quote) - 1
            elif script[i] == ";":
                out.append(script[start:i])
                start = i + 1
            i += 1
        out.append(script[start:])
        return [s.strip() for s in out if s.strip()]

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
