"""OpenAI's Batch API: a JSONL file of requests in, an output file and an error file out, joined on `custom_id`.

`POST /v1/batches` reads the input file (purpose `batch`) at once: every line becomes a row of `batch_lines`, and a
line that is not a request (bad JSON, no custom_id, a repeated custom_id, another method or URL, no body) is
recorded there already failed, with its line number, while the other lines run. The batch is then
`in_progress`, and a runner in every server process (`BatchRunner`) takes it up:

- One replica runs a batch at a time: it holds a lease (`lease_owner`, `lease_until`) that it renews while it
  works; a lease that is not renewed (the process died) lapses, and any replica, this one restarted
  included, takes the batch over.
- Each line is sent through the server's own app (in process, as an HTTP request through `httpx`'s ASGI
  transport), so that it gets exactly what the endpoint gives a client: validation, the 400s, usage rows
  billed to the key that created the batch. The key's per-minute limits do not apply to batch lines; the key
  must still be valid (a revoked key fails the lines that are left).
- A line's result is committed to its row the moment it ends, once (`WHERE status IS NULL`). After a crash,
  the lines in flight have no result and run again, the finished ones are never rerun, so the output holds
  every custom_id exactly once.
- Batches run beside interactive traffic at low priority: at most `concurrency` lines at a time, and no new
  line starts while interactive requests wait for a slot in the engine.
- When no line is left, the batch is `finalizing`: the output file (lines answered 2xx) and the error file
  (the others) are written in input order, and the batch is `completed`. `cancel` makes it `cancelling`; the
  runner stops starting lines, lets the running ones end, writes the files of what was done and marks it
  `cancelled`. A batch still unfinished 24 hours after it was created is `expired`, with the files of what
  was done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from lamina.api.deps import KeyDep, authenticate
from lamina.api.errors import ERRORS, APIError
from lamina.api.keys import APIKey
from lamina.api.wire import WireModel
from lamina.errors import InvalidRequestError
from lamina.infra.db import Database
from lamina.infra.files import FileStore

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_LINES = 50_000
"""Requests one batch may hold (OpenAI's limit)."""
WINDOW_S = 24 * 3600
LEASE_S = 10.0
"""How long a replica's claim on a batch lasts unless renewed (it renews every CHECK_S)."""
CHECK_S = 0.5
"""How often a running batch renews its lease and reads its status (a cancel takes effect within this)."""
BATCH_HEADER = "x-lamina-batch"
"""The header a batch line is sent with: this process's secret and the batch's id. Never leaves the process."""

MIGRATIONS = {
    "sqlite": [
        """
        CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            key_id INTEGER,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            metadata TEXT,
            errors TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at REAL NOT NULL,
            in_progress_at REAL,
            expires_at REAL NOT NULL,
            finalizing_at REAL,
            completed_at REAL,
            failed_at REAL,
            expired_at REAL,
            cancelling_at REAL,
            cancelled_at REAL,
            lease_owner TEXT,
            lease_until REAL
        );
        CREATE INDEX batches_key ON batches (key_id, created_at);
        CREATE TABLE batch_lines (
            batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
            line INTEGER NOT NULL,
            custom_id TEXT,
            body TEXT,
            status INTEGER,
            response TEXT,
            error TEXT,
            PRIMARY KEY (batch_id, line)
        )
        """,
    ],
    "postgresql": [
        """
        CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            key_id BIGINT,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            metadata TEXT,
            errors TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            in_progress_at DOUBLE PRECISION,
            expires_at DOUBLE PRECISION NOT NULL,
            finalizing_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            failed_at DOUBLE PRECISION,
            expired_at DOUBLE PRECISION,
            cancelling_at DOUBLE PRECISION,
            cancelled_at DOUBLE PRECISION,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION
        );
        CREATE INDEX batches_key ON batches (key_id, created_at);
        CREATE TABLE batch_lines (
            batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
            line INTEGER NOT NULL,
            custom_id TEXT,
            body TEXT,
            status INTEGER,
            response TEXT,
            error TEXT,
            PRIMARY KEY (batch_id, line)
        )
        """,
    ],
}

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


# --- the wire ---------------------------------------------------------------------------------------------------


class BatchCreate(BaseModel):
    input_file_id: str = Field(description="A file uploaded with purpose 'batch': one JSON request per line "
                                           '({"custom_id", "method": "POST", "url", "body"}).')
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class BatchError(WireModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(WireModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(WireModel):
    total: int
    completed: int
    failed: int


class Batch(WireModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Status
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(WireModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# --- the record -------------------------------------------------------------------------------------------------


def _key_id(key: APIKey | None) -> int | None:
    return key.id if key is not None else None


class BatchStore:
    """Batches and their lines in the database; the input, output and error files in the file store."""

    def __init__(self, db: Database, files: FileStore) -> None:
        self.db, self.files = db, files
        db.migrate("batches", MIGRATIONS)

    def create(self, req: BatchCreate, key: APIKey | None) -> Batch:
        source = self.files.get(req.input_file_id)
        if source.purpose != "batch":
            raise InvalidRequestError(f"the input file {source.id} has purpose {source.purpose!r}; upload it with purpose 'batch'",
                                      param="input_file_id")
        # split("\n"), not splitlines(): a JSON string may hold a raw U+2028 or U+0085, which splitlines() breaks on
        lines = self.files.content(source.id).decode("utf-8", errors="replace").split("\n")
        rows, seen = [], set()
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            custom_id, body, error = _parse_line(text, number, req.endpoint, seen)
            rows.append((number, custom_id, json.dumps(body) if body is not None else None,
                         json.dumps(error) if error is not None else None))
        if not rows:
            raise InvalidRequestError(f"the input file {source.id} holds no requests", param="input_file_id")
        if len(rows) > MAX_LINES:
            raise InvalidRequestError(f"a batch holds at most {MAX_LINES} requests; the file has {len(rows)}", param="input_file_id")
        now = time.time()
        batch_id = f"batch_{uuid.uuid4().hex}"
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO batches (id, key_id, endpoint, input_file_id, completion_window, status, metadata, created_at, "
                       "in_progress_at, expires_at) VALUES (?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?)",
                       (batch_id, _key_id(key), req.endpoint, source.id, req.completion_window,
                        json.dumps(req.metadata) if req.metadata is not None else None, now, now, now + WINDOW_S))
            tx.executemany("INSERT INTO batch_lines (batch_id, line, custom_id, body, error) VALUES (?, ?, ?, ?, ?)",
                           [(batch_id, *row) for row in rows])
        return self.get(batch_id, key)

    def get(self, batch_id: str, key: APIKey | None) -> Batch:
        row = self.db.query_one("SELECT * FROM batches WHERE id = ? AND key_id IS NOT DISTINCT FROM ?", (batch_id, _key_id(key)))
        if row is None:
            raise APIError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
        return self._batch(row)

    def list(self, key: APIKey | None, after: str | None, limit: int) -> BatchList:
        """Newest first, a page of `limit` after the batch `after` (keyset pagination: one query for the page, one
        for its request counts)."""
        where, params = "key_id IS NOT DISTINCT FROM ?", [_key_id(key)]
        if after is not None:
            mark = self.db.query_one("SELECT created_at, id FROM batches WHERE id = ? AND key_id IS NOT DISTINCT FROM ?",
                                     (after, _key_id(key)))
            if mark is None:
                return BatchList(data=[], first_id=None, last_id=None, has_more=False)
            where += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            params += [mark[0], mark[0], mark[1]]
        rows = self.db.query(f"SELECT * FROM batches WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit + 1))
        counts = self._counts([r["id"] for r in rows[:limit]])
        page = [self._batch(r, counts) for r in rows[:limit]]
        return BatchList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                         has_more=len(rows) > limit)

    def cancel(self, batch_id: str, key: APIKey | None) -> Batch:
        batch = self.get(batch_id, key)
        if batch.status in ("in_progress", "validating", "finalizing"):
            self.db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND status IN "
                            "('validating', 'in_progress', 'finalizing')", (time.time(), batch_id))
        elif batch.status != "cancelling":
            raise APIError(409, f"Cannot cancel a batch that is {batch.status}.", param="batch_id", code="batch_not_cancellable")
        return self.get(batch_id, key)

    def _counts(self, batch_ids: list[str]) -> dict[str, tuple[int, int, int]]:
        """(total, completed, failed) lines of each batch, in one query."""
        if not batch_ids:
            return {}
        rows = self.db.query(
            "SELECT batch_id, COUNT(*), CAST(SUM(CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END) AS BIGINT), "
            "CAST(SUM(CASE WHEN error IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT) FROM batch_lines "
            f"WHERE batch_id IN ({', '.join('?' * len(batch_ids))}) GROUP BY batch_id", tuple(batch_ids))
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    def _batch(self, row: Any, counts: dict[str, tuple[int, int, int]] | None = None) -> Batch:
        if counts is None:
            counts = self._counts([row["id"]])
        total, completed, failed = counts.get(row["id"], (0, 0, 0))
        errors = json.loads(row["errors"]) if row["errors"] else None
        return Batch(
            id=row["id"], endpoint=row["endpoint"], input_file_id=row["input_file_id"], completion_window=row["completion_window"],
            status=row["status"], output_file_id=row["output_file_id"], error_file_id=row["error_file_id"],
            errors=BatchErrors(data=[BatchError(**e) for e in errors]) if errors else None,
            created_at=int(row["created_at"]), expires_at=int(row["expires_at"]),
            **{name: int(row[name]) if row[name] is not None else None for name in _TIMES},
            request_counts=BatchRequestCounts(total=total, completed=completed, failed=failed),
            metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        )

    # --- what the runner uses ------------------------------------------------------------------------------------

    def claim(self, owner: str) -> Any:
        """A batch with work left whose lease is free or lapsed, now leased to `owner`; None if there is none."""
        now = time.time()
        with self.db.transaction() as tx:
            tx.lock("batches:claim")
            row = tx.execute("SELECT id, endpoint, status, expires_at FROM batches WHERE status IN ('in_progress', 'finalizing', "
                             "'cancelling') AND (lease_until IS NULL OR lease_until < ? OR lease_owner = ?) ORDER BY created_at LIMIT 1",
                             (now, owner)).fetchone()
            if row is not None:
                tx.execute("UPDATE batches SET lease_owner = ?, lease_until = ? WHERE id = ?", (owner, now + LEASE_S, row["id"]))
        return row

    def renew(self, batch_id: str, owner: str) -> str | None:
        """Extend the lease; the batch's status, or None if the lease was lost."""
        with self.db.transaction() as tx:
            row = tx.execute("SELECT status, lease_owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["lease_owner"] != owner:
                return None
            tx.execute("UPDATE batches SET lease_until = ? WHERE id = ?", (time.time() + LEASE_S, batch_id))
            return row["status"]

    def pending(self, batch_id: str) -> list[tuple[int, str]]:
        return [(int(r[0]), r[1]) for r in self.db.query(
            "SELECT line, body FROM batch_lines WHERE batch_id = ? AND status IS NULL AND error IS NULL ORDER BY line", (batch_id,))]

    def finish_line(self, batch_id: str, line: int, status: int, response: Any, error: dict[str, Any] | None) -> None:
        self.db.execute("UPDATE batch_lines SET status = ?, response = ?, error = ? WHERE batch_id = ? AND line = ? "
                        "AND status IS NULL AND error IS NULL",
                        (status, json.dumps(response), json.dumps(error) if error else None, batch_id, line))

    def finalize(self, batch_id: str, owner: str, end: Literal["completed", "cancelled", "expired"]) -> None:
        """Write the output and error files in input order, then mark the batch `end` (one transaction)."""
        if end == "completed":
            self.db.execute("UPDATE batches SET status = 'finalizing', finalizing_at = ? WHERE id = ? AND status = 'in_progress'",
                            (time.time(), batch_id))
        out, err = [], []
        for r in self.db.query("SELECT line, custom_id, status, response, error FROM batch_lines WHERE batch_id = ? ORDER BY line",
                               (batch_id,)):
            if r["status"] is None and r["error"] is None:
                continue  # never ran (cancelled or expired)
            body = json.loads(r["response"]) if r["response"] else None
            record = {"id": f"batch_req_{batch_id.removeprefix('batch_')}_{r['line']}", "custom_id": r["custom_id"],
                      "response": {"status_code": r["status"], "request_id": f"req_{batch_id.removeprefix('batch_')}_{r['line']}",
                                   "body": body} if r["status"] is not None else None,
                      "error": json.loads(r["error"]) if r["error"] else None}
            (out if r["status"] is not None and 200 <= r["status"] < 300 else err).append(_jsonl(record))
        output = self.files.create(f"{batch_id}_output.jsonl", ("\n".join(out) + "\n").encode(), "batch_output") if out else None
        errors = self.files.create(f"{batch_id}_error.jsonl", ("\n".join(err) + "\n").encode(), "batch_output") if err else None
        with self.db.transaction() as tx:
            tx.execute(f"UPDATE batches SET status = ?, {end}_at = ?, output_file_id = ?, error_file_id = ?, lease_owner = NULL, "
                       "lease_until = NULL WHERE id = ? AND lease_owner = ?",
                       (end, time.time(), output.id if output else None, errors.id if errors else None, batch_id, owner))


_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl(record: dict[str, Any]) -> str:
    """One output line. The characters that `str.splitlines()` (and JavaScript before ES2019) take for line breaks
    are written escaped, so that a reader which splits on them still gets one record per line; the rest of the
    text stays UTF-8 as it is."""
    return json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS)


def _parse_line(text: str, number: int, endpoint: str, seen: set[str]) -> tuple[str | None, Any, dict[str, Any] | None]:
    """(custom_id, body, error) of one input line; the error names the line, as OpenAI's error file does."""
    def bad(message: str, code: str = "invalid_request") -> tuple[str | None, Any, dict[str, Any]]:
        return custom_id, None, {"code": code, "message": f"line {number}: {message}", "line": number}

    custom_id = None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"not valid JSON ({e.msg} at column {e.colno})", "invalid_json_line")
    if not isinstance(request, dict):
        return bad("a request must be a JSON object with custom_id, method, url and body")
    custom_id = request.get("custom_id") if isinstance(request.get("custom_id"), str) else None
    if not custom_id:
        return bad("custom_id is missing (a string that names the request in the output)", "missing_custom_id")
    if custom_id in seen:
        return bad(f"custom_id {custom_id!r} is used by an earlier line; each must be unique", "duplicate_custom_id")
    seen.add(custom_id)
    if request.get("method", "POST") != "POST":
        return bad(f"method must be POST, not {request.get('method')!r}")
    if request.get("url") != endpoint:
        return bad(f"url {request.get('url')!r} differs from the batch's endpoint {endpoint}", "mismatched_url")
    body = request.get("body")
    if not isinstance(body, dict):
        return bad("body must be a JSON object: the request the endpoint takes")
    if body.get("stream"):
        return bad("a batch request cannot stream: leave out stream")
    return custom_id, body, None


# --- the runner -------------------------------------------------------------------------------------------------


class BatchRunner:
    """Runs the batches of the database, one at a time per process, in the server's event loop."""

    def __init__(self, store: BatchStore, app: Any, ready: Callable[[], bool], waiting: Callable[[], int], *, concurrency: int = 4,
                 poll_s: float = 1.0) -> None:
        self.store, self.app, self.ready, self.waiting = store, app, ready, waiting
        self.concurrency, self.poll_s = concurrency, poll_s
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self.token = secrets.token_urlsafe(32)
        """The secret of BATCH_HEADER: only requests this runner makes carry it."""
        self._key_ids: dict[str, int | None] = {}
        """The key id of each batch seen (it never changes), so that a line costs one query: its key's."""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="lamina-batches")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def line_key(self, request: Request, keys: Any) -> tuple[bool, APIKey | None]:
        """(is a batch line, the key of its batch) for a request; a wrong secret is not a batch line."""
        header = request.headers.get(BATCH_HEADER)
        if header is None:
            return False, None
        token, _, batch_id = header.partition(" ")
        if not secrets.compare_digest(token, self.token):
            return False, None
        if batch_id not in self._key_ids:
            row = self.store.db.query_one("SELECT key_id FROM batches WHERE id = ?", (batch_id,))
            if row is None:
                return True, None
            if len(self._key_ids) >= 1024:
                self._key_ids.clear()
            self._key_ids[batch_id] = row[0]
        key_id = self._key_ids[batch_id]
        if key_id is None:
            return True, None
        key = keys.by_id(int(key_id))
        if key is None or not key.active:
            raise APIError(401, "The API key that created this batch was revoked.", code="invalid_api_key")
        return True, key

    async def _loop(self) -> None:
        import httpx

        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lamina-batch", timeout=None) as client:
            while True:
                try:
                    row = await asyncio.to_thread(self.store.claim, self.owner) if self.ready() else None
                    if row is None:
                        await asyncio.sleep(self.poll_s)
                        continue
                    await self._run(client, row)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("the batch runner failed; retrying")
                    await asyncio.sleep(self.poll_s)

    async def _run(self, client: Any, row: Any) -> None:
        batch_id, endpoint, status = row["id"], row["endpoint"], row["status"]
        pending = await asyncio.to_thread(self.store.pending, batch_id) if status == "in_progress" else []
        running: set[asyncio.Task] = set()
        renewed = time.monotonic()
        while status == "in_progress" and (pending or running):
            if time.time() > row["expires_at"]:
                status = "expired"
                break
            while pending and len(running) < self.concurrency and self.waiting() == 0:
                line, body = pending.pop(0)
                running.add(asyncio.create_task(self._line(client, batch_id, endpoint, line, body)))
            if running:
                done, running = await asyncio.wait(running, timeout=CHECK_S, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
            else:
                await asyncio.sleep(0.05)  # interactive requests are waiting: let them in first
            if time.monotonic() - renewed > CHECK_S:  # renew the lease, and see a cancel soon
                renewed = time.monotonic()
                status = await asyncio.to_thread(self.store.renew, batch_id, self.owner) or "lost"
        if running:  # cancelled or expired: the lines already running finish
            await asyncio.gather(*running, return_exceptions=True)
        if status == "in_progress":  # every line is done; a cancel may have come meanwhile
            status = await asyncio.to_thread(self.store.renew, batch_id, self.owner) or "lost"
        if status == "lost":
            return
        if status in ("in_progress", "finalizing"):
            end = "completed"
        elif status in ("cancelling", "cancelled"):
            end = "cancelled"
        else:
            end = "expired"
        await asyncio.to_thread(self.store.finalize, batch_id, self.owner, end)  # type: ignore[arg-type]

    async def _line(self, client: Any, batch_id: str, endpoint: str, line: int, body: str) -> None:
        try:
            r = await client.post(endpoint, content=body, headers={"content-type": "application/json",
                                                                     BATCH_HEADER: f"{self.token} {batch_id}"})
            try:
                payload = r.json()
            except ValueError:
                payload = {"error": {"message": r.text[:1000], "type": "server_error"}}
            error = None
            if r.status_code >= 300:
                e = payload.get("error") if isinstance(payload, dict) else None
                error = {"code": (e or {}).get("code") or (e or {}).get("type") or "request_failed",
                         "message": (e or {}).get("message") or f"HTTP {r.status_code}"}
            await asyncio.to_thread(self.store.finish_line, batch_id, line, r.status_code, payload, error)
        except Exception as e:  # the line failed inside this process: recorded, the batch goes on
            logger.exception("batch %s line %d failed", batch_id, line)
            await asyncio.to_thread(self.store.finish_line, batch_id, line, 500,
                                    {"error": {"message": str(e), "type": "server_error"}}, {"code": "server_error", "message": str(e)})


# --- the routes -------------------------------------------------------------------------------------------------


def _store(request: Request) -> BatchStore:
    return request.app.state.batch_runner.store


StoreDep = Annotated[BatchStore, Depends(_store)]
router = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


@router.post("/v1/batches", tags=["batches"])
def create_batch(body: BatchCreate, store: StoreDep, key: KeyDep) -> Batch:
    """Create a batch from an uploaded JSONL file (purpose 'batch'); it runs in the background."""
    return store.create(body, key)


@router.get("/v1/batches", tags=["batches"])
def list_batches(store: StoreDep, key: KeyDep, after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> BatchList:
    return store.list(key, after, limit)


@router.get("/v1/batches/{batch_id}", tags=["batches"])
def retrieve_batch(batch_id: str, store: StoreDep, key: KeyDep) -> Batch:
    return store.get(batch_id, key)


@router.post("/v1/batches/{batch_id}/cancel", tags=["batches"])
def cancel_batch(batch_id: str, store: StoreDep, key: KeyDep) -> Batch:
    return store.cancel(batch_id, key)
