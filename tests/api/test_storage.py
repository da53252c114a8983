"""Everything the database holds, on both backends, seen from several replicas (several `Database` objects on one
SQLite file or one PostgreSQL URL, as several `lamina serve` processes are): keys, usage and rate limits,
conversations, files and agent runs. The vector stores' own tests are tests/infra/test_vectorstore.py."""

from __future__ import annotations

import threading

import pytest

from lamina.api.errors import APIError
from lamina.api.keys import KeyStore
from lamina.api.usage import UsageLog
from lamina.apps.agents.agent import AgentRun, AgentRuns, Step
from lamina.apps.webchat.store import ConversationStore, NotFound
from lamina.infra.db import open_database
from lamina.infra.files import FileNotFound, FileStore


@pytest.fixture
def replicas(database_url: str):  # type: ignore[no-untyped-def]
    dbs = [open_database(database_url) for _ in range(4)]
    yield dbs
    for db in dbs:
        db.close()


def test_a_key_created_or_revoked_on_one_replica_holds_on_every_other(replicas) -> None:  # type: ignore[no-untyped-def]
    stores = [KeyStore(db) for db in replicas]
    key, secret = stores[0].create("team", rpm=10, models=["m"])
    assert all(s.lookup(secret) == key for s in stores) and stores[3].auth_required()
    with pytest.raises(Exception, match="already exists"):
        stores[2].create("team")
    stores[1].revoke("team")
    assert all(s.lookup(secret) is None for s in stores)  # at once, everywhere: every lookup reads the database
    assert [k.name for k in stores[3].list()] == ["team"] and not stores[3].list()[0].active


def test_four_replicas_under_one_key_admit_no_more_than_its_rpm_in_total(replicas) -> None:  # type: ignore[no-untyped-def]
    key, _ = KeyStore(replicas[0]).create("limited", rpm=7)
    logs = [UsageLog(db) for db in replicas]
    admitted, refused = [], []

    def client(log: UsageLog) -> None:
        for _ in range(5):
            try:
                admission = log.admit(key, endpoint="/v1/chat/completions", method="POST", model="m", reserve_tokens=10)
                admitted.append(admission.usage_id)
            except APIError as e:
                assert e.status_code == 429
                refused.append(e)

    threads = [threading.Thread(target=client, args=(logs[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 7 and len(set(admitted)) == 7 and len(refused) == 33
    for usage_id in admitted[:3]:
        logs[2].finish(usage_id, status=200, latency_ms=5.0, prompt_tokens=4, completion_tokens=6)
    totals = {(t["key"], t["model"]): t for t in logs[3].totals()}
    row = totals[("limited", "m")]
    assert row["requests"] == 7 and row["prompt_tokens"] == 12 and row["completion_tokens"] == 18 and row["errors"] == 0
    assert isinstance(row["prompt_tokens"], int)


def test_a_token_limit_counts_reservations_of_every_replica(replicas) -> None:  # type: ignore[no-untyped-def]
    key, _ = KeyStore(replicas[0]).create("tokens", tpm=100)
    a, b = UsageLog(replicas[0]), UsageLog(replicas[1])
    first = a.admit(key, endpoint="/v1/completions", method="POST", model="m", reserve_tokens=60)
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(APIError, match="tokens per minute"):
        b.admit(key, endpoint="/v1/completions", method="POST", model="m", reserve_tokens=60)
    a.finish(first.usage_id, status=200, latency_ms=1.0, prompt_tokens=5, completion_tokens=5)  # it used only 10
    assert b.admit(key, endpoint="/v1/completions", method="POST", model="m", reserve_tokens=60).usage_id


def test_conversations_are_visible_from_any_replica_and_private_to_their_owner(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = ConversationStore(replicas[0]), ConversationStore(replicas[1])
    mine = a.create(None, "New chat", {"temperature": 0.2})
    theirs = a.create(7, "Theirs", {})
    b.replace_messages(None, mine["id"], [{"role": "user", "content": "hi ‘quoted’ 100%?"}, {"role": "assistant", "content": "hello"}])
    got = a.get(None, mine["id"])
    assert [m["content"] for m in got["messages"]] == ["hi ‘quoted’ 100%?", "hello"] and got["settings"] == {"temperature": 0.2}
    assert [c["id"] for c in b.list(None)] == [mine["id"]] and [c["id"] for c in b.list(7)] == [theirs["id"]]
    with pytest.raises(NotFound):
        b.get(None, theirs["id"])
    b.update(7, theirs["id"], "Renamed", None)
    assert a.get(7, theirs["id"])["title"] == "Renamed"
    a.delete(None, mine["id"])
    with pytest.raises(NotFound):
        b.get(None, mine["id"])


def test_files_are_read_back_from_any_replica(replicas, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # on PostgreSQL the bytes are in the database, so a replica with a folder of its own reads them; SQLite's
    # replicas share one LAMINA_HOME
    shared = replicas[0].dialect == "sqlite"
    a = FileStore(replicas[0], tmp_path / "files-a")
    b = FileStore(replicas[1], tmp_path / ("files-a" if shared else "files-b"))
    data = bytes(range(256)) * 40
    record = a.create("notes.bin", data, purpose="assistants")
    assert b.content(record.id) == data and b.get(record.id) == record
    assert [f.id for f in b.list("assistants")] == [record.id] and b.list("batch") == [] and b.list() == [record]
    b.delete(record.id)
    with pytest.raises(FileNotFound):
        a.content(record.id)


def test_agent_runs_are_recorded_step_by_step(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = AgentRuns(replicas[0]), AgentRuns(replicas[1])
    run = AgentRun("run_1", "What is 2+2?", ["calculator"])
    a.start(run)
    for step in (Step("model", {"text": ""}), Step("tool", {"name": "calculator", "arguments": {"expression": "2+2"}, "result": "4"})):
        run.steps.append(step)
        run.prompt_tokens += 10
        a.add_step(run, step)
    assert b.get("run_1").calls() == ["calculator"] and b.get("run_1").status == "running"
    run.status, run.answer, run.finished_at = "answered", "4", run.started_at + 1
    a.finish(run)
    got = b.get("run_1")
    assert (got.status, got.answer, got.prompt_tokens, len(got.steps)) == ("answered", "4", 20, 2)
    assert [r.id for r in b.list()] == ["run_1"]


def test_batches_list_by_key_newest_first_in_pages_with_their_counts(replicas, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from lamina.api.batches import BatchCreate, BatchStore

    key, _ = KeyStore(replicas[0]).create("team")
    a, b = BatchStore(replicas[0], FileStore(replicas[0], tmp_path / "files")), BatchStore(replicas[1], FileStore(replicas[1], tmp_path / "files"))

    def batch(lines: int, owner=key):  # type: ignore[no-untyped-def]
        rows = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
                for i in range(lines)]
        upload = a.files.create("in.jsonl", "\n".join(rows).encode(), "batch")
        return a.create(BatchCreate(input_file_id=upload.id, endpoint="/v1/embeddings"), owner).id

    made = [batch(n) for n in (1, 2, 3, 4, 5)]
    batch(6, owner=None)  # another owner's: never listed with the key's
    every = b.list(key, None, 100)
    assert [x.id for x in every.data] == made[::-1] and not every.has_more
    assert [x.request_counts.total for x in every.data] == [5, 4, 3, 2, 1]
    pages, after = [], None
    while True:
        page = b.list(key, after, 2)
        pages.append([x.id for x in page.data])
        if not page.has_more:
            break
        after = page.last_id
    assert pages == [made[:2:-1], made[2:0:-1], made[:1]]
    assert b.list(key, "batch_nope", 2).data == [] and [x.request_counts.total for x in b.list(None, None, 10).data] == [6]
