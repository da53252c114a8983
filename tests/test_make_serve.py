"""`make serve` brings up the server and prints its URL; curl-style requests get answers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("make"), reason="needs make")]
ROOT = Path(__file__).resolve().parent.parent


def test_make_serve_answers_chat_completions(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "LAMINA_HOME": str(tmp_path), "LAMINA_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["make", "--no-print-directory", "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = None
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"make serve exited with {proc.returncode}")
            match = re.search(r"(http://127\.0\.0\.1:\d+)/ ", line)
            url = match.group(1) if match else None
        assert url == f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        # exactly what a curl user sends: no SDK, no extras
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                       content=b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 0}')
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        assert "<title>Lamina chat</title>" in httpx.get(url + "/").text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_langchain_chat_openai_works_unchanged(tmp_path) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from tests.server import start_server

    server = start_server(tmp_path)
    try:
        llm = langchain_openai.ChatOpenAI(base_url=server.api, api_key="unused", model="smollm2-135m-instruct",
                                          temperature=0, max_retries=0)
        assert "Paris" in llm.invoke("What is the capital of France? Answer in one sentence.").content
        streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France? Answer in one sentence."))
        assert "Paris" in streamed
    finally:
        server.stop()
