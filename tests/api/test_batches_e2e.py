"""The Batch API end to end through the official `openai` SDK, against a real `lamina serve` (a tiny random Llama:
what is tested is the batch machinery, not the answers): output and error files joined on custom_id, bad lines
reported with their line numbers while the others run, cancel, and kill -9 mid-batch, then a restart that
completes the batch with every custom_id exactly once."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.api.schema_run import write_tiny_model
from tests.server import Server, start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"


def _args(folder) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    return ("--model", str(folder), "--device", "cpu", "--dtype", "float32", "--tool-adapter", "none")


ENV = {"LAMINA_NATIVE": "0", "LAMINA_THREADS": "1"}


def _client(server: Server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def _line(custom_id: str, url: str = "/v1/chat/completions", **body) -> str:  # type: ignore[no-untyped-def]
    # raw U+2028 and U+0085 in a JSON string are valid JSON Lines, though str.splitlines() breaks on them
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {custom_id}\u2028\x85 ünï"}], "max_tokens": 3, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, ensure_ascii=False)


def _wait(client, batch_id: str, until=("completed", "failed", "cancelled", "expired"), timeout: float = 180):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s: {batch.request_counts}")


def _lines(client, file_id: str | None) -> list[dict]:  # type: ignore[no-untyped-def]
    """The records of an output file, read as a naive reader does (splitlines): the random model's text holds any
    character, so the server must write U+2028 and U+0085 escaped."""
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    return write_tiny_model(tmp_path_factory.mktemp("batch-model") / MODEL)


def test_a_batch_through_the_sdk_with_bad_lines_reported_by_number(folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(tmp_path / "home", *_args(folder), env=ENV)
    try:
        client = _client(server)
        rows = [_line("a"), _line("b"), "{not json", _line("a"), _line("c", url="/v1/completions"),
                _line("d", max_tokens=-1), "", _line("e", n=2)]
        upload = client.files.create(file=("requests.jsonl", "\n".join(rows).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                      metadata={"job": "nightly"})
        assert batch.object == "batch" and batch.metadata == {"job": "nightly"} and batch.request_counts.total == 7
        done = _wait(client, batch.id)
        assert done.status == "completed" and done.completed_at and done.output_file_id and done.error_file_id
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 3, 4)
        out = _lines(client, done.output_file_id)
        assert [o["custom_id"] for o in out] == ["a", "b", "e"]  # input order, each once
        for o in out:
            assert o["error"] is None and o["response"]["status_code"] == 200
            assert o["response"]["body"]["object"] == "chat.completion" and o["response"]["body"]["model"] == MODEL
        assert len(out[2]["response"]["body"]["choices"]) == 2
        errors = {e["custom_id"]: e for e in _lines(client, done.error_file_id)}
        assert errors[None]["error"]["code"] == "invalid_json_line" and "line 3" in errors[None]["error"]["message"]
        assert errors["a"]["error"]["code"] == "duplicate_custom_id" and "line 4" in errors["a"]["error"]["message"]
        assert errors["c"]["error"]["code"] == "mismatched_url"
        assert errors["d"]["response"]["status_code"] == 400 and errors["d"]["response"]["body"]["error"]["param"]
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        assert [b.id for b in client.batches.list()] == [batch.id]  # (more come below)
        assert client.batches.retrieve(batch.id).request_counts.completed == 3
        with pytest.raises(openai.APIStatusError) as info:
            client.batches.cancel(batch.id)
        assert info.value.status_code == 409

        # embeddings in a batch; a file of another purpose and an unknown file are refused at once
        lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": "all-minilm-l6-v2", "input": f"text {i}"}}) for i in range(3)]
        upload = client.files.create(file=("emb.jsonl", "\n".join(lines).encode()), purpose="batch")
        done = _wait(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h").id)
        vectors = [o["response"]["body"]["data"][0]["embedding"] for o in _lines(client, done.output_file_id)]
        assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
        # the same from the command line: `lamina batch create --wait` writes the output lines
        requests, results = tmp_path / "cli.jsonl", tmp_path / "cli-out.jsonl"
        requests.write_text("\n".join(_line(f"k{i}") for i in range(3)))
        made = server.lamina("batch", "create", str(requests), "--url", server.url, "--wait", "-o", str(results))
        assert made.returncode == 0, made.stderr
        assert sorted(json.loads(x)["custom_id"] for x in results.read_text().splitlines()) == ["k0", "k1", "k2"]
        listed = server.lamina("batch", "list", "--url", server.url)
        assert made.stdout.strip() in listed.stdout and "completed" in listed.stdout
        gone = server.lamina("batch", "list", "--url", "http://127.0.0.1:1")
        assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1 and "cannot reach" in gone.stderr
        other = client.files.create(file=("notes.txt", b"x"), purpose="assistants")
        for file_id, status in ((other.id, 400), ("file-nope", 404)):
            with pytest.raises(openai.APIStatusError) as info:
                client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
            assert info.value.status_code == status

        # cancel mid-batch: the lines running finish, the rest never start, and what was done is kept
        rows = [_line(f"r{i}", max_tokens=64, ignore_eos=True) for i in range(60)]
        upload = client.files.create(file=("long.jsonl", "\n".join(rows).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            time.sleep(0.05)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        done = _wait(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at
        out = _lines(client, done.output_file_id)
        assert 2 <= len(out) < 60 and len(out) == done.request_counts.completed

        # the list pages by `after`, newest first: the SDK's iterator, one batch a page, sees every batch once
        every = client.batches.list(limit=100)
        assert not every.has_more and every.data[0].id == batch.id and len(every.data) == 4
        assert [b.id for b in client.batches.list(limit=1)] == [b.id for b in every.data]
        assert [b.request_counts for b in client.batches.list(limit=3).data] == [b.request_counts for b in every.data[:3]]
        assert client.batches.list(after="batch_nope").data == []
    finally:
        server.stop()


def test_kill_9_mid_batch_then_restart_completes_every_custom_id_exactly_once(folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    server = start_server(home, *_args(folder), env=ENV)
    count = 40
    try:
        client = _client(server)
        rows = [_line(f"r{i}", max_tokens=48, ignore_eos=True) for i in range(count)]
        upload = client.files.create(file=("big.jsonl", "\n".join(rows).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while client.batches.retrieve(batch.id).request_counts.completed < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        partial = None
        server = start_server(home, *_args(folder), env=ENV)
        client = _client(server)
        partial = client.batches.retrieve(batch.id)
        assert partial.status == "in_progress" and 5 <= partial.request_counts.completed < count
        done = _wait(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == count and done.error_file_id is None
        out = _lines(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(count))  # each exactly once
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == 48 for o in out)
    finally:
        server.stop()
