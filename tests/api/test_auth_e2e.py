"""Keys, per-key limits and usage records, against a real server and the real `lamina keys` commands."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from tests.server import Server, start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Say hi."}]
STATIC = "static-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    s = start_server(tmp_path_factory.mktemp("auth"), "--api-key", STATIC)
    yield s
    s.stop()


def _client(server: Server, key: str):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=120)


def _create(server: Server, *args: str) -> str:
    result = server.lamina("keys", "create", *args)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert secret.startswith("lam-") and "not shown again" in result.stderr
    return secret


def test_missing_or_wrong_key_is_401_but_health_is_open(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.get(f"{server.api}/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").models.list()
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert _client(server, STATIC).models.list().data[0].id == MODEL


def test_keys_are_stored_hashed_and_listed_without_secrets(server: Server) -> None:
    secret = _create(server, "--name", "listed")
    listing = server.lamina("keys", "list")
    assert "listed" in listing.stdout and secret not in listing.stdout and secret[:8] in listing.stdout
    db = sqlite3.connect(server.home / "lamina.db")
    stored = [row for row in db.execute("SELECT * FROM api_keys") for value in row if value == secret]
    assert stored == []


def test_key_limited_to_other_models_is_403(server: Server) -> None:
    secret = _create(server, "--name", "other-models", "--models", "some-other-model")
    with pytest.raises(openai.PermissionDeniedError) as info:
        _client(server, secret).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert info.value.body["code"] == "model_not_allowed"
    assert _client(server, secret).models.list().data == []


def test_requests_per_minute_limit_gives_429_with_headers(server: Server) -> None:
    secret = _create(server, "--name", "rpm2", "--rpm", "2")
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2}
    first = httpx.post(f"{server.api}/chat/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert httpx.post(f"{server.api}/chat/completions", json=body, headers=headers, timeout=60).status_code == 200
    third = httpx.post(f"{server.api}/chat/completions", json=body, headers=headers, timeout=60)
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert third.headers["x-ratelimit-remaining-requests"] == "0" and third.headers["x-ratelimit-reset-requests"].endswith("s")
    with pytest.raises(openai.RateLimitError):
        _client(server, secret).chat.completions.create(**body)


def test_tokens_per_minute_limit(server: Server) -> None:
    secret = _create(server, "--name", "tpm", "--tpm", "200")
    client = _client(server, secret)
    with pytest.raises(openai.RateLimitError, match="more than key"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=500)
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100)
    assert ok.usage.total_tokens <= 200
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=150)


def test_revoked_key_stops_working(server: Server) -> None:
    secret = _create(server, "--name", "short-lived")
    client = _client(server, secret)
    assert client.models.list().data
    result = server.lamina("keys", "revoke", "short-lived")
    assert result.returncode == 0 and "revoked" in result.stdout
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert "revoked" in server.lamina("keys", "list").stdout


def test_usage_rows_match_the_tokens_returned(server: Server) -> None:
    secret = _create(server, "--name", "metered")
    client = _client(server, secret)
    results = [client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=n, temperature=0) for n in (3, 5)]
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, stream=True, stream_options={"include_usage": True})
    streamed = [c for c in stream][-1].usage
    db = sqlite3.connect(server.home / "lamina.db")
    query = ("SELECT prompt_tokens, completion_tokens, status, endpoint, model FROM usage WHERE key_name = 'metered' "
             "AND endpoint = '/v1/chat/completions' ORDER BY id")
    deadline, rows = time.monotonic() + 30, db.execute(query).fetchall()
    while any(status is None for _, _, status, *_ in rows) and time.monotonic() < deadline:
        time.sleep(0.05)  # the row of a stream is finished after its last byte, a moment after the SDK has returned
        rows = db.execute(query).fetchall()
    expected = [(r.usage.prompt_tokens, r.usage.completion_tokens) for r in results] + [(streamed.prompt_tokens, streamed.completion_tokens)]
    assert [(p, c) for p, c, *_ in rows] == expected
    assert all(status == 200 and model == MODEL for _, _, status, _, model in rows)
    report = server.lamina("usage")
    line = next(line for line in report.stdout.splitlines() if line.startswith("metered"))
    assert line.split()[2:6] == ["3", "0", str(sum(p for p, _ in expected)), str(sum(c for _, c in expected))]


def test_refused_requests_are_recorded_too(server: Server) -> None:
    httpx.get(f"{server.api}/models", headers={"authorization": "Bearer nope"})
    db = sqlite3.connect(server.home / "lamina.db")
    assert db.execute("SELECT COUNT(*) FROM usage WHERE status = 401").fetchone()[0] >= 1


def test_non_loopback_without_a_key_is_refused(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LAMINA_HOME": str(tmp_path)}
    env.pop("LAMINA_API_KEY", None)
    result = subprocess.run([sys.executable, "-m", "lamina", "serve", "--host", "0.0.0.0", "--port", "1"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0 without an API key" in result.stderr
