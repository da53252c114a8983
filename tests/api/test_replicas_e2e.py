"""Four `lamina serve` replicas on one real PostgreSQL (pgvector): one rate limit across all of them, a revoked key
refused by every one at once, responses stored on one and read from another, and kill -9 of one replica while
streams run on the others, which finish, with usage that adds up."""

from __future__ import annotations

import concurrent.futures as futures
import os
import signal
import time

import httpx
import pytest

from tests.api.schema_run import write_tiny_model
from tests.server import Server, start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

REPLICAS = 4
RPM = 6


def _chat(server: Server, key: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **kwargs}
    return httpx.post(f"{server.api}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_replicas_share_keys_limits_responses_and_survive_a_kill(postgres_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lamina.infra.db import open_database

    folder = write_tiny_model(tmp_path / "tiny-llama")
    env = {"LAMINA_DATABASE_URL": postgres_url, "LAMINA_NATIVE": "0", "LAMINA_THREADS": "1"}
    args = ("--model", str(folder), "--device", "cpu", "--dtype", "float32", "--tool-adapter", "none")
    with futures.ThreadPoolExecutor(REPLICAS) as pool:
        servers = list(pool.map(lambda i: start_server(tmp_path / f"home{i}", *args, env=env), range(REPLICAS)))
    try:
        created = servers[0].lamina("keys", "create", "--name", "shared", "--rpm", str(RPM))
        assert created.returncode == 0, created.stderr
        limited = created.stdout.strip()
        free = servers[1].lamina("keys", "create", "--name", "free").stdout.strip()  # made on another replica's home

        # 16 requests over the four replicas at once: the limit is the key's, not each replica's
        with futures.ThreadPoolExecutor(8) as pool:
            statuses = sorted(pool.map(lambda i: _chat(servers[i % REPLICAS], limited).status_code, range(16)))
        assert statuses == [200] * RPM + [429] * (16 - RPM)

        # revoked on one replica's command line: refused by every replica at once
        assert servers[2].lamina("keys", "revoke", "shared").returncode == 0
        assert [_chat(s, limited).status_code for s in servers] == [401] * REPLICAS

        # a response stored on one replica, continued and read on others
        clients = [openai.OpenAI(base_url=s.api, api_key=free, max_retries=0, timeout=120) for s in servers]
        first = clients[0].responses.create(model="tiny-llama", input="hi", max_output_tokens=3, store=True)
        assert clients[3].responses.retrieve(first.id).id == first.id
        second = clients[1].responses.create(model="tiny-llama", input="more", previous_response_id=first.id, max_output_tokens=3)
        assert [i.id for i in clients[2].responses.input_items.list(second.id)] != []

        # kill -9 of one replica while every replica streams: the others' streams finish, and their usage is recorded
        def stream(i: int, started: futures.Future | None = None) -> int | None:
            chunks = clients[i].chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "go"}], max_tokens=300, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            usage = None
            for n, chunk in enumerate(chunks):
                if n == 0 and started is not None:
                    started.set_result(True)
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return usage

        victim = servers[-1]
        with futures.ThreadPoolExecutor(REPLICAS) as pool:
            flowing = [futures.Future() for _ in servers]
            runs = [pool.submit(stream, i, flowing[i]) for i in range(REPLICAS)]
            for f in flowing:
                f.result(timeout=120)
            os.kill(victim.proc.pid, signal.SIGKILL)
            finished = [runs[i].result(timeout=300) for i in range(REPLICAS - 1)]
            with pytest.raises(Exception):  # noqa: B017 -- the killed replica's client sees its connection drop
                runs[-1].result(timeout=120)
        assert finished == [300] * (REPLICAS - 1)
        db = open_database(postgres_url)
        # a replica writes a stream's usage once its response has ended; the SDK returns at `[DONE]`, a moment before
        query = "SELECT status, completion_tokens FROM usage WHERE key_name = 'free' AND endpoint = '/v1/chat/completions'"
        deadline, rows = time.monotonic() + 30, db.query(query)
        while sum(r[0] is not None for r in rows) < REPLICAS - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            rows = db.query(query)
        assert sorted((r[0], r[1]) for r in rows if r[0] is not None) == [(200, 300)] * (REPLICAS - 1)
        assert [r[0] for r in rows if r[0] is None] == [None]  # the killed replica's request: admitted, never finished
        db.close()
        assert all(httpx.get(f"{s.url}/health").status_code == 200 for s in servers[:-1])
    finally:
        for s in servers:
            s.stop()
