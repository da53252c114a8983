"""Usage records and rate limits, driven by one counter: the `usage` table.

Every request leaves a row (time, key, model, endpoint, tokens, latency, status). A request that costs
tokens is admitted by `admit()`, which, in one transaction, reads the key's last 60 seconds of rows,
refuses with 429 if the requests or tokens per minute would be exceeded, and otherwise inserts the
request's row with its tokens reserved (prompt + max_tokens), so requests in flight count at once. When the
request ends its row gets the real tokens. Enforcement, the `x-ratelimit-*` headers and `lamina usage` all
read the same rows, so they cannot disagree (LiteLLM's drift between tracked and enforced spend is the
failure this avoids).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from lamina.api.errors import APIError
from lamina.api.keys import APIKey
from lamina.infra.db import Database

MIGRATIONS = [
    """
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        key_id INTEGER,
        key_name TEXT,
        model TEXT,
        endpoint TEXT NOT NULL,
        method TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        reserved_tokens INTEGER NOT NULL DEFAULT 0,
        latency_ms REAL,
        status INTEGER,
        user TEXT
    );
    CREATE INDEX usage_key_ts ON usage (key_id, ts)
    """,
]

WINDOW_S = 60.0


@dataclass
class Admission:
    usage_id: int
    headers: dict[str, str]


class UsageLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("usage", MIGRATIONS)

    def admit(
        self,
        key: APIKey | None,
        *,
        endpoint: str,
        method: str,
        model: str | None,
        reserve_tokens: int,
        user: str | None = None,
    ) -> Admission:
        """Check the key's per-minute limits and record the request as started; 429 if over a limit."""
        now = time.time()
        with self.db.transaction() as conn:
            headers: dict[str, str] = {}
            if key is not None and (key.rpm or key.tpm):
                count, tokens, oldest = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status IS NULL "
                    "THEN MAX(reserved_tokens, prompt_tokens + completion_tokens) "
                    "ELSE prompt_tokens + completion_tokens END), 0), MIN(ts) FROM usage WHERE key_id = ? AND ts > ?",
                    (key.id, now - WINDOW_S),
                ).fetchone()
                reset = max(0.0, (oldest + WINDOW_S - now) if oldest else 0.0)
                if key.rpm:
                    headers |= _limit_headers("requests", key.rpm, key.rpm - count - 1, reset if count + 1 >= key.rpm else 0.0)
                if key.tpm:
                    headers |= _limit_headers("tokens", key.tpm, key.tpm - tokens - reserve_tokens, reset if tokens else 0.0)
                if key.rpm and count >= key.rpm:
                    raise _limited(f"Rate limit reached for key {key.name!r}: {key.rpm} requests per minute. "
                                   f"Retry after {math.ceil(reset)} s.", reset, headers)
                if key.tpm and reserve_tokens > key.tpm:
                    raise _limited(f"This request needs up to {reserve_tokens} tokens (prompt + max_tokens), more than key "
                                   f"{key.name!r} may use in a minute ({key.tpm}); lower max_tokens.", 0.0, headers)
                if key.tpm and tokens + reserve_tokens > key.tpm:
                    raise _limited(f"Rate limit reached for key {key.name!r}: {key.tpm} tokens per minute "
                                   f"({tokens} used, this request needs up to {reserve_tokens}). Retry after {math.ceil(reset)} s.",
                                   reset, headers)
            cursor = conn.execute(
                "INSERT INTO usage (ts, key_id, key_name, model, endpoint, method, reserved_tokens, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, key.id if key else None, key.name if key else None, model, endpoint, method, reserve_tokens, user),
            )
            return Admission(int(cursor.lastrowid or 0), headers)

    def finish(self, usage_id: int, *, status: int, latency_ms: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.db.execute(
            "UPDATE usage SET status = ?, latency_ms = ?, prompt_tokens = ?, completion_tokens = ?, reserved_tokens = 0 WHERE id = ?",
            (status, latency_ms, prompt_tokens, completion_tokens, usage_id),
        )

    def record(self, *, key: APIKey | None, endpoint: str, method: str, model: str | None, status: int, latency_ms: float) -> None:
        """A request that was never admitted (refused before, or costs nothing)."""
        self.db.execute(
            "INSERT INTO usage (ts, key_id, key_name, model, endpoint, method, latency_ms, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), key.id if key else None, key.name if key else None, model, endpoint, method, latency_ms, status),
        )

    def totals(self, since: float | None = None) -> list[dict]:
        """Per key and model: requests, errors, tokens, mean latency."""
        rows = self.db.query(
            "SELECT COALESCE(key_name, '(no key)') AS key, COALESCE(model, '-') AS model, COUNT(*) AS requests, "
            "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors, SUM(prompt_tokens) AS prompt_tokens, "
            "SUM(completion_tokens) AS completion_tokens, AVG(latency_ms) AS mean_latency_ms "
            "FROM usage WHERE ts >= ? GROUP BY key, model ORDER BY key, model",
            (since or 0.0,),
        )
        return [dict(r) for r in rows]


def _limit_headers(kind: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": format_duration(reset_s),
    }


def _limited(message: str, reset_s: float, headers: dict[str, str]) -> APIError:
    return APIError(429, message, code="rate_limit_exceeded", headers={**headers, "retry-after": str(max(1, math.ceil(reset_s)))})


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{int(rest)}s"
