"""`lamina serve --ray`: Lamina's server as Ray Serve deployments, one per engine replica, behind a router
deployment that chooses the replica of each request (`lamina.api.router`: prefix-cache affinity with a load
guard, or round robin), with the same OpenAI API (and web chat) in front on Ray Serve's HTTP proxy.

- Each replica is a deployment of its own (`lamina-replica-<i>`, one Ray actor with `threads` CPUs), so the
  router addresses a chosen replica, not whichever Ray's own balancing picks. Inside, the whole Lamina app runs:
  engine, API, batch runner; requests reach it as ASGI calls, and responses stream back chunk by chunk (a
  Server-Sent Events stream stays a stream through Ray).
- State is shared the way it is for plain replicas: the database (LAMINA_DATABASE_URL for PostgreSQL, or the
  SQLite file of a LAMINA_HOME on one machine), so keys, limits, conversations, stored responses and batches
  are the same whichever replica serves.
- The router counts requests in flight per replica (its load) and tags each response with the replica that
  served it (`x-lamina-replica`).

Ray is an optional dependency (`pip install 'lamina[ray]'`); Ray Serve LLM (`ray[llm]`) is not used: it pins
vLLM, and Lamina brings its own engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from lamina.api.router import Policy, PrefixRouter, routing_text
from lamina.errors import LaminaError

GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
REPLICA_HEADER = "x-lamina-replica"


async def asgi_stream(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                      client: tuple[str, int] = ("127.0.0.1", 0)) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI app: yields (status, headers) first, then each body chunk as it is
    sent. Closing the iterator early is a client disconnect (the app sees `http.disconnect`)."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers], "client": client,
             "server": ("lamina-replica", 80), "state": {}}

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put({"type": "lamina.done"})

    task = asyncio.create_task(run())
    try:
        while True:
            m = await messages.get()
            if m["type"] == "http.response.start":
                yield m["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in m.get("headers", [])]
            elif m["type"] == "http.response.body":
                if m.get("body"):
                    yield m["body"]
                if not m.get("more_body", False):
                    break
            elif m["type"] == "lamina.done":
                break
    finally:
        gone.set()
        await asyncio.gather(task, return_exceptions=True)


class Replica:
    """One engine replica: the whole Lamina app in a Ray actor (its lifespan entered on first use)."""

    def __init__(self, factory: Callable[..., Any], args: Any, threads: int) -> None:
        from lamina.infra.device import set_threads

        set_threads(threads)
        self.app = factory(args)
        self._lifespan: Any = None
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        async with self._lock:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def ready(self) -> bool:
        """Started, with the model loaded (the app's /health says 200)."""
        await self._start()
        async for part in asgi_stream(self.app, "GET", "/health", "", [], b""):
            return isinstance(part, tuple) and part[0] == 200
        return False

    async def call(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes) -> AsyncIterator[Any]:
        await self._start()
        async for part in asgi_stream(self.app, method, path, query, headers, body):
            yield part


def build_router_app(handles: list[Any], policy: Policy) -> Any:
    """The front: a FastAPI app that forwards every request to the replica the router chooses."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    router = PrefixRouter(len(handles), policy)
    loads = [0] * len(handles)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(path: str, request: Request) -> Any:
        body = await request.body()
        route = "/" + path
        text = ""
        if request.method == "POST" and route in GENERATION:
            try:
                text = routing_text(json.loads(body))
            except ValueError:
                text = ""
        i = router.choose(text, loads) if text else min(range(len(loads)), key=lambda j: (loads[j], j))
        loads[i] += 1
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        stream = handles[i].options(stream=True).call.remote(request.method, route, request.url.query, headers, body)
        try:
            status, response_headers = await stream.__anext__()
        except BaseException:
            loads[i] -= 1
            raise
        kept = _passed_on(response_headers)
        kept[REPLICA_HEADER] = str(i)
        media = kept.pop("content-type", None)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                loads[i] -= 1

        if media is not None and media.startswith("text/event-stream"):
            return StreamingResponse(rest(), status_code=status, headers=kept, media_type=media)
        content = b"".join([chunk async for chunk in rest()])
        return Response(content, status_code=status, headers=kept, media_type=media)

    return app


def serve_on_ray(factory: Callable[..., Any], args: Any, *, replicas: int, policy: Policy, address: str | None, host: str,
                 port: int, cpus_per_replica: float) -> None:
    """Deploy `replicas` replicas of `factory(args)` and the router on Ray Serve (HTTP on host:port); blocks."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LaminaError("--ray needs Ray Serve: pip install 'lamina[ray]'") from None
    import os

    # the replicas read the same LAMINA_* settings (home, database, cache, threads) as this command
    env = {k: v for k, v in os.environ.items() if k.startswith(("LAMINA_", "HF_", "TRANSFORMERS_", "OMP_"))}
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": host, "port": port, "location": "HeadOnly"})
    replica_cls = serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": cpus_per_replica})(Replica)
    threads = max(1, int(cpus_per_replica))
    bound = [replica_cls.options(name=f"lamina-replica-{i}").bind(factory, args, threads) for i in range(replicas)]
    front = _front(serve)
    serve.run(front.bind(bound, policy), name="lamina", route_prefix="/", blocking=True)


def _front(serve: Any) -> Any:
    @serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    class Front:
        def __init__(self, handles: list[Any], policy: Policy) -> None:
            self.handles = handles
            self.app = build_router_app(handles, policy)
            self._ready = False

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import JSONResponse

            if not self._ready:
                states = await asyncio.gather(*(h.ready.remote() for h in self.handles))
                self._ready = all(states)
                if not self._ready and request.url.path == "/health":
                    return JSONResponse({"error": {"message": "the replicas are loading", "type": "server_error",
                                                   "param": None, "code": "model_loading"}}, status_code=503)
            return await _asgi_response(self.app, request)

    return Front


async def _asgi_response(app: Any, request: Any) -> Any:
    """Hand a Starlette request (what Ray Serve gives a deployment) to an ASGI app, streaming its response."""
    body = await request.body()
    parts = asgi_stream(app, request.method, request.url.path, request.url.query, list(request.headers.items()), body)
    status, headers = await parts.__anext__()

    async def rest() -> AsyncIterator[bytes]:
        async for chunk in parts:
            yield chunk

    kept = _passed_on(headers)
    return StreamingResponse(rest(), status_code=status, headers=kept, media_type=kept.pop("content-type", None))


def _passed_on(headers: list[tuple[str, str]]) -> dict[str, str]:
    """A replica's response headers as the front sends them on: the length and framing are the front's own."""
    return {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
