"""The API application factory: services built at start-up, the model loaded in the lifespan.

`create_app(ServeArgs(Settings(...)))` returns a FastAPI app whose lifespan loads the model in a background thread,
so `/health` answers 503 while loading and 200 after; on shutdown the engine thread aborts what is running
and stops. Nothing happens at import time. Layers above (the web chat) add their routes to the returned app.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

import lamina
from lamina.api import errors
from lamina.api.batches import BatchRunner, BatchStore
from lamina.api.batches import router as batch_routes
from lamina.api.deps import Services
from lamina.api.keys import KeyStore
from lamina.api.loading import Loading
from lamina.api.middleware import LimitBody, RecordRequests
from lamina.api.openai import routes
from lamina.api.openai.responses import ResponsesService
from lamina.api.openai.serving import OpenAIService
from lamina.api.rag import routes as rag_routes
from lamina.api.rag.service import RagService
from lamina.api.usage import UsageLog
from lamina.foundation.embeddings import Embedder
from lamina.infra.db import open_database
from lamina.infra.registry import Registry
from lamina.infra.telemetry import Metrics
from lamina.llm import LLM
from lamina.llm.engine.core import EngineArgs, EngineStats
from lamina.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeArgs:
    """What `lamina serve` runs. The model, home, device, dtype, address and static key are `settings`' values
    (their one owner); the rest is the server's own."""

    settings: Settings
    insecure: bool = False
    """Allow listening on a non-loopback address with no key at all."""
    max_body_bytes: int = 8 * 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    """Largest file accepted by POST /v1/files."""
    embedding_model: str | None = "all-minilm-l6-v2"
    """Model behind /v1/embeddings and the vector stores; None serves neither."""
    engine: EngineArgs = field(default_factory=EngineArgs)
    quantize: str | None = None
    """Weight-only quantisation of the chat model: auto, none, int8 or int4 (None: the settings' LAMINA_QUANTIZE,
    auto by default, which serves a Q4_1/Q8_0 GGUF on its own blocks; with LoRA adapters, none)."""
    lora: tuple[tuple[str, str], ...] = ()
    """LoRA adapters served beside the base model, as (name, folder): a request's `model` chooses one."""
    batch_concurrency: int = 4
    """Lines of a batch running at once (fewer than the engine's slots, so interactive requests always find one)."""

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def home(self) -> Path:
        return self.settings.home

    @property
    def database(self) -> str | Path:
        return self.settings.database_for(self.home)


def create_app(
    args: ServeArgs,
    load: Callable[[ServeArgs], LLM] | None = None,
    load_embedder: Callable[[ServeArgs], Embedder] | None = None,
) -> FastAPI:
    """The API app. `load`/`load_embedder` build the models (defaults: from the args); they run in a thread.

    The services are built here, complete, because the middleware and the rooms mounted on the app (the web
    chat) need them before the lifespan starts; the models they serve arrive later through `Loading`."""
    served = Registry(args.home).resolve(args.model).id  # fails fast on an unknown model, before serving
    _check_adapters(args, served)
    db = open_database(args.database)
    metrics = Metrics(served)
    usage = UsageLog(db)
    chat_model: Loading[LLM] = Loading("the model")
    embedder: Loading[Embedder] = Loading("the embedding model")
    rag = RagService(db, args.home, args.embedding_model or "", embedder)
    openai = OpenAIService(served, usage, metrics, f"fp_lamina_{lamina.__version__}", chat_model, rag=rag,
                           adapters={name: str(path) for name, path in args.lora})
    services = Services(db=db, keys=KeyStore(db, args.settings.api_key), usage=usage, metrics=metrics, openai=openai, rag=rag,
                        responses=ResponsesService(openai, db, rag))
    loader = load or _load
    embedder_loader = load_embedder or _load_embedder

    batch_store = BatchStore(db, rag.files)
    waiting = [0]  # requests the engine had waiting at its last step: batch lines start only when none do

    def on_step(stats: EngineStats) -> None:
        waiting[0] = stats.waiting
        metrics.engine_step(stats.running, stats.waiting, stats.tokens, stats.kv_usage, stats.prefix_queries, stats.prefix_hits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        closing = threading.Event()

        def load_models() -> None:
            if args.embedding_model:
                try:
                    embedder.set(embedder_loader(args))
                except Exception as e:
                    logger.exception("loading %s failed", args.embedding_model)
                    embedder.fail(e)
            try:
                llm = loader(args)
            except Exception as e:
                logger.exception("loading %s failed", args.model)
                chat_model.fail(e)
                return
            if closing.is_set():  # the server stopped while the weights were loading
                llm.close()
                return
            llm.engine.add_listener(on_step)
            llm.engine.start()
            chat_model.set(llm)
            logger.info("model %s ready", llm.name)

        threading.Thread(target=load_models, name="lamina-load", daemon=True).start()
        runner.start()
        try:
            yield
        finally:
            await runner.stop()
            closing.set()
            if chat_model.value is not None:
                chat_model.value.close()
            db.close()

    app = FastAPI(
        title="Lamina",
        version=lamina.__version__,
        summary="OpenAI-compatible API over Lamina's own model code.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.args = args
    runner = BatchRunner(batch_store, app, ready=lambda: chat_model.value is not None, waiting=lambda: waiting[0],
                         concurrency=args.batch_concurrency)
    app.state.batch_runner = runner
    errors.install(app)
    app.include_router(routes.public)
    app.include_router(routes.api)
    app.include_router(rag_routes.router)
    app.include_router(batch_routes)
    app.add_middleware(RecordRequests, metrics=metrics, usage=usage)
    app.add_middleware(LimitBody, max_bytes=args.max_body_bytes, upload_bytes=args.max_upload_bytes, upload_path="/v1/files")
    return app


def _load(args: ServeArgs) -> LLM:
    # (adapters serve on the quantised weights as on float ones; quantize None: the settings')
    llm = LLM.load(settings=args.settings, engine_args=args.engine, quantize=args.quantize)  # model, home, device, dtype
    for name, path in args.lora:
        llm.load_adapter(name, path)
    return llm


def _check_adapters(args: ServeArgs, served: str) -> None:
    """Refuse a bad --lora before the server starts: a clash of names, a missing or foreign folder."""
    from lamina.errors import InvalidRequestError
    from lamina.llm.formats.peft import read_adapter_config

    names = [name for name, _ in args.lora]
    for name in names:
        if not name or name == served or names.count(name) > 1:
            raise InvalidRequestError(f"adapter name {name!r} must be unique and differ from the base model's id", param="lora")
    for _, path in args.lora:
        read_adapter_config(Path(path))


def _load_embedder(args: ServeArgs) -> Embedder:
    return Embedder.load(args.embedding_model or "", device=args.settings.device, dtype="float32", home=args.home)

