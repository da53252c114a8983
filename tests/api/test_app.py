"""The API app in-process (Starlette's TestClient runs its lifespan): loading, failures, overload, 500s."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from lamina.api.app import ServeArgs, create_app
from lamina.llm import LLM
from lamina.llm.engine.core import EngineArgs
from lamina.settings import Settings
from tests.tiny import hf_llama_folder

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("tiny-llm")
    hf_llama_folder(folder, "llama")
    return folder


def _args(tmp_path, tiny_folder, **kw) -> ServeArgs:  # type: ignore[no-untyped-def]
    return ServeArgs(Settings(model=str(tiny_folder), home=tmp_path, device="cpu", dtype="float32"), **kw)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)


def test_health_is_503_while_loading_then_200(tmp_path, tiny_folder) -> None:
    release = threading.Event()

    def slow_load(args: ServeArgs) -> LLM:
        release.wait(30)
        return LLM.load(str(tiny_folder), device="cpu", dtype="float32", home=tmp_path)

    with TestClient(create_app(_args(tmp_path, tiny_folder), load=slow_load)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        chat = client.post("/v1/chat/completions", json={"model": tiny_folder.name, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and chat.headers["retry-after"] == "2"
        release.set()
        _wait_ready(client)
        assert client.get("/health").json() == {"status": "ok"}
        ok = client.post("/v1/chat/completions", json={"model": tiny_folder.name, "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_model_that_fails_to_load_is_reported(tmp_path, tiny_folder) -> None:
    def broken(args: ServeArgs) -> LLM:
        raise RuntimeError("weights eaten by a grue")

    with TestClient(create_app(_args(tmp_path, tiny_folder), load=broken)) as client:
        deadline = time.monotonic() + 10
        while "grue" not in client.get("/health").text and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.get("/health")
        assert r.status_code == 503 and "weights eaten by a grue" in r.json()["error"]["message"]


def test_overloaded_server_answers_503(tmp_path, tiny_folder) -> None:
    args = _args(tmp_path, tiny_folder, engine=EngineArgs(max_waiting=0))
    with TestClient(create_app(args)) as client:
        _wait_ready(client)
        r = client.post("/v1/chat/completions", json={"model": tiny_folder.name, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"


def test_unexpected_errors_are_500_without_internals(tmp_path, tiny_folder) -> None:
    app = create_app(_args(tmp_path, tiny_folder))

    @app.get("/v1/explode")
    def explode() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/explode")
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "The server had an internal error; it has been logged.",
                                      "type": "server_error", "param": None, "code": "internal_error"}}
        assert "secret" not in r.text and "Traceback" not in r.text


def test_sdk_maps_statuses_to_its_exception_classes(tmp_path, tiny_folder) -> None:
    openai = pytest.importorskip("openai")
    args = _args(tmp_path, tiny_folder, engine=EngineArgs(max_waiting=0))
    with TestClient(create_app(args)) as http:
        _wait_ready(http)
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:  # 503: overloaded
            client.chat.completions.create(model=tiny_folder.name, messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        with pytest.raises(openai.APIStatusError) as too_big:
            client.chat.completions.create(model=tiny_folder.name, messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}])
        assert too_big.value.status_code == 413


def test_an_error_after_the_stream_began_is_a_final_error_event(tmp_path, tiny_folder) -> None:
    """Once a 200 is on the wire the status cannot change: the error arrives as data: {"error": ...}."""
    import json

    app = create_app(_args(tmp_path, tiny_folder))
    with TestClient(app) as client:
        _wait_ready(client)
        runner = app.state.services.openai.llm.engine.call(lambda engine: engine.runner)
        real, calls = runner.execute, []

        def failing(work):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("device lost")
            return real(work)

        runner.execute = failing
        body = {"model": tiny_folder.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True,
                "temperature": 1.0}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "device lost" not in error["message"]
        assert any(json.loads(e)["choices"][0]["delta"].get("content") is not None for e in events[:-2])
        runner.execute = real
        ok = client.post("/v1/chat/completions", json={**body, "stream": False})  # the engine keeps serving
        assert ok.status_code == 200
