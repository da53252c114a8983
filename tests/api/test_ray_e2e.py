"""`lamina serve --ray` on a real local Ray cluster of two nodes (a head and a worker, one CPU each): two engine
replicas as Ray Serve deployments behind the prefix-aware router, the same OpenAI API in front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.schema_run import write_tiny_model
from tests.server import free_port, start_server

pytest.importorskip("ray", reason="Ray is optional: `make test-ray` installs lamina[ray] and runs this test")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")
SYSTEM_A = "You are the support agent of a bicycle shop; answer about repairs and parts. " * 8
SYSTEM_B = "You translate English sentences into French, keeping names as they are. " * 8


def _chat(url: str, system: str, question: str, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": "tiny-llama", "max_tokens": 4, "messages": [{"role": "system", "content": system},
                                                                   {"role": "user", "content": question}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_lamina_serve_on_a_two_node_ray_cluster(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = write_tiny_model(tmp_path / "tiny-llama")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "LAMINA_NATIVE": "0", "LAMINA_THREADS": "1"}
    gcs = free_port()
    head = subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false",
                           "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stderr
    server = None
    try:
        worker = subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1"], env=env, capture_output=True,
                                text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr
        server = start_server(tmp_path / "home", "--model", str(folder), "--device", "cpu", "--dtype", "float32",
                              "--tool-adapter", "none", "--ray", "--ray-address", f"127.0.0.1:{gcs}", "--replicas", "2",
                              timeout=180, env={"LAMINA_NATIVE": "0", "LAMINA_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"})
        url = server.url
        # the same long system prompt stays on one replica (its prefix cache); another prompt goes to the other one
        first = [_chat(url, SYSTEM_A, f"question {i}") for i in range(4)]
        assert all(r.status_code == 200 for r in first), first[0].text
        replicas_a = {r.headers["x-lamina-replica"] for r in first}
        assert len(replicas_a) == 1
        other = _chat(url, SYSTEM_B, "hello")
        assert other.status_code == 200 and other.headers["x-lamina-replica"] not in replicas_a

        # through the official SDK: models, a streamed chat (chunks, then usage), a stored response read back
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert "tiny-llama" in [m.id for m in client.models.list()]
        chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "go"}],
                                                     max_tokens=12, stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == 12 and len(chunks) > 3
        stored = client.responses.create(model="tiny-llama", input="hi", max_output_tokens=3, store=True)
        for _ in range(4):  # whichever replica serves the read, the response is in the shared database
            assert client.responses.retrieve(stored.id).id == stored.id
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-llama", "messages": "nope"}, timeout=60)
        assert bad.status_code == 400 and json.loads(bad.text)["error"]["type"] == "invalid_request_error"
    finally:
        if server is not None:
            server.stop()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
