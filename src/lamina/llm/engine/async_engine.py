"""The engine off the event loop: a worker thread drives `Engine.step()`, asyncio code awaits tokens.

    llm = LLM.load(...)
    async_llm = AsyncLLM(llm)          # takes over llm.engine; start() launches the worker thread
    async for delta in async_llm.stream(prompt_ids, params):
        ...                            # leaving the loop early (client gone, stop string) aborts the request

Requests and aborts reach the worker through a thread-safe queue; token events come back to each request's
`asyncio.Queue` through `loop.call_soon_threadsafe`. PyTorch releases the GIL inside kernels, so the event
loop keeps serving other clients (and /health) while the worker computes. The engine decides how the
running requests share each step; when it learns to batch them, nothing here changes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lamina.llm.engine.core import Engine, TokenEvent
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.engine.scheduler import OverloadedError
from lamina.llm.llm import LLM
from lamina.llm.text.stream import Delta, TextStream

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent | BaseException], None]
    cache_salt: str = ""
    adapter: str | None = None


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[Engine, int], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        """Called after each step with the engine and the tokens it produced (metrics)."""
        self._inbox: queue.Queue[object] = queue.Queue()
        self._sinks: dict[str, Callable[[TokenEvent | BaseException], None]] = {}
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything and stop the worker thread."""
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def check_capacity(self) -> None:
        """Refuse (503) before a request is accepted when the queue is already full."""
        limit = self.engine.scheduler.max_waiting
        if self.num_waiting >= limit:
            raise OverloadedError(
                f"the server is overloaded ({self.num_running} running, {self.num_waiting} waiting); retry shortly"
            )

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + self._inbox.qsize()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       cache_salt: str = "", adapter: str | None = None) -> AsyncIterator[TokenEvent]:
        """Token events of one request; leaving early aborts it and frees its place."""
        self.engine.validate(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def sink(item: TokenEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        self._inbox.put(_Add(request_id, prompt_ids, params, sink, cache_salt, adapter))
        finished = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))

    def _run(self) -> None:
        engine = self.engine
        while True:
            # Block for work when idle; otherwise take whatever arrived since the last step.
            try:
                first = self._inbox.get() if not engine.has_unfinished() else self._inbox.get_nowait()
            except queue.Empty:
                first = None
            commands = [] if first is None else [first]
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is _STOP:
                    for request_id in list(self._sinks):
                        engine.abort(request_id)
                    self._sinks.clear()
                    return
                self._handle(command)
            if not engine.has_unfinished():
                if commands and self.on_step is not None:
                    self.on_step(engine, 0)  # aborts changed what is running: keep the gauges true
                continue
            try:
                step_events = engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                logger.exception("engine step failed")
                for request_id, sink in list(self._sinks.items()):
                    engine.abort(request_id)
                    sink(e)
                self._sinks.clear()
                continue
            for event in step_events:
                sink = self._sinks.get(event.request_id)
                if sink is None:
                    continue
                sink(event)
                if event.finish_reason is not None:
                    del self._sinks[event.request_id]
            if self.on_step is not None:
                self.on_step(engine, len(step_events))

    def _handle(self, command: object) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt_ids, command.params, command.cache_salt,
                                        command.adapter)
            except Exception as e:  # validation or overload: the request fails, the engine goes on
                command.sink(e)
                return
            self._sinks[command.request_id] = command.sink
        elif isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._sinks.pop(command.request_id, None)


class AsyncLLM:
    """An `LLM` served from asyncio code: same tokenizer and templates, the engine in a worker thread."""

    def __init__(self, llm: LLM, on_step: Callable[[Engine, int], None] | None = None) -> None:
        self.llm = llm
        self.engine = AsyncEngine(llm.engine, on_step)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     cache_salt: str = "", adapter: str | None = None) -> AsyncIterator[Delta]:
        """Text deltas for one request (UTF-8 safe, stop strings cut); the last carries the finish reason."""
        text = TextStream(self.llm.tokenizer, params.stop)
        events = self.engine.generate(prompt_ids, params, request_id, cache_salt, adapter)
        try:
            async for event in events:
                delta = text.push(event)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            await events.aclose()

