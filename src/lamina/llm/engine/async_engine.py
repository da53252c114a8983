"""The engine's one driver: a worker thread runs `Engine.step()`, callers await (or iterate) token events.

    engine = AsyncEngine(Engine(model, ...))
    async for event in engine.generate(prompt_ids, params):   # from asyncio code (the server)
        ...                                                   # leaving early aborts the request
    for event in engine.generate_sync(prompt_ids, params):    # from plain code (the Python API, the CLI)
        ...

This is the façade of the engine room: code above it (`lamina.llm.LLM`, the API) talks to this class only,
never to the scheduler or the runner. Requests and aborts reach the worker through a thread-safe queue;
token events come back through each request's `asyncio.Queue`. PyTorch and the native kernels release the
GIL while they compute, so the event loop keeps serving other clients (and /health) during a step.

Both paths queue the same request to the same worker and differ only in how its events come back: to an
event loop (`call_soon_threadsafe`), or to a thread-safe queue the caller blocks on. The second costs the
caller's thread a futex wake per token instead of a loop's self-pipe, epoll and task: on 2 cores, where
the step's threads take both, that was 10-15 % of batch-1 decode speed. Work that must not overlap a step
(loading a LoRA adapter, scoring a text) runs on the worker thread between steps through `call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lamina.llm.engine.core import Engine, EngineStats, TokenEvent
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.engine.scheduler import OverloadedError

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    future: concurrent.futures.Future[Any]


_STOP = object()


class AsyncEngine:
    """Drives one `Engine` from one worker thread; every request, abort and engine call goes through here."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._inbox: queue.Queue[object] = queue.Queue()
        self._sinks: dict[str, Callable[[TokenEvent | BaseException], None]] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._ids = itertools.count()

    # --- the worker ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent; the first request starts it too).

        The worker computes on as many torch threads as the starting thread has (an OpenMP setting does not
        carry to a new thread by itself)."""
        with self._start_lock:
            if self._thread is None:
                threads = torch.get_num_threads()
                self._thread = threading.Thread(target=self._run, args=(threads,), name="lamina-engine", daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything and stop the worker thread (a later request starts a new one)."""
        with self._start_lock:
            if self._thread is not None:
                self._inbox.put(_STOP)
                self._thread.join(timeout)
                self._thread = None

    def add_listener(self, listener: Callable[[EngineStats], None]) -> None:
        """Call `listener` on the worker thread after each step (metrics); it must be quick and not raise."""
        self._listeners.append(listener)

    # --- what callers may know ----------------------------------------------------------------------------

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._engine.eos_ids

    @property
    def max_seq_len(self) -> int:
        return self._engine.max_seq_len

    @property
    def adapters(self) -> frozenset[str]:
        return frozenset(self._engine.runner.adapters)

    @property
    def native_step(self) -> bool:
        """Whether decode steps run through the native kernels' fused step (else PyTorch's forward)."""
        return self._engine.runner.native is not None

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def num_running(self) -> int:
        return self._engine.num_running

    @property
    def num_waiting(self) -> int:
        return self._engine.num_waiting + self._inbox.qsize()

    def validate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> None:
        """Raise the error the engine would give this request (bad ids, too long, unknown adapter), at once."""
        self._engine.validate(prompt_ids, params, adapter)

    def check_capacity(self) -> None:
        """Refuse (503) before a request is accepted when the queue is already full."""
        if self.num_waiting >= self._engine.scheduler.max_waiting:
            raise OverloadedError(
                f"the server is overloaded ({self.num_running} running, {self.num_waiting} waiting); retry shortly"
            )

    # --- requests ------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       cache_salt: str = "", adapter: str | None = None) -> AsyncIterator[TokenEvent]:
        """Token events of one request; leaving early (or being cancelled) aborts it and frees its place.

        Validation happens here, once, before the request is queued: a bad request raises at the first
        `__anext__`, before any event."""
        self.validate(prompt_ids, params, adapter)
        self.start()
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def sink(item: TokenEvent | BaseException) -> None:
            # RuntimeError: the caller's loop has closed; it stopped listening, and its abort is queued
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, item)

        self._inbox.put(_Add(request_id, list(prompt_ids), params, sink, cache_salt, adapter))
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

    def generate_sync(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                      request_id: str | None = None, cache_salt: str = "") -> Iterator[TokenEvent]:
        """`generate` for synchronous code (no event loop: it works inside a running one too); a bad request
        raises at the first `next`, and closing the iterator early aborts the request."""
        self.validate(prompt_ids, params, adapter)
        self.start()
        request_id = request_id or f"req-{next(self._ids)}"
        events: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()
        self._inbox.put(_Add(request_id, list(prompt_ids), params, events.put, cache_salt, adapter))
        finished = False
        try:
            while True:
                item = events.get()
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

    def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the worker thread between two steps and return its result (or raise its error).

        For work that changes or reads the model and its caches: nothing else runs on them meanwhile."""
        self.start()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(_Call(fn, future))
        return future.result()

    def reset(self) -> None:
        """Forget the caches kept for prefix reuse."""
        self.call(lambda engine: engine.reset())

    # --- the loop on the worker thread --------------------------------------------------------------------

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        engine = self._engine
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
                if commands:
                    self._notify(0)  # aborts changed what is running: keep the gauges true
                continue
            try:
                step_events = engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                logger.exception("engine step failed")
                try:
                    engine.drop_all()  # their state is unknown: drop them all rather than abort one by one
                except Exception:
                    logger.exception("could not drop the failed step's sequences")
                for sink in list(self._sinks.values()):
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
            self._notify(len(step_events))

    def _notify(self, tokens: int) -> None:
        if self._listeners:
            stats = self._engine.stats(tokens)
            for listener in self._listeners:
                listener(stats)

    def _handle(self, command: object) -> None:
        if isinstance(command, _Add):
            try:  # validated by the caller: only what depends on the engine's state can fail here (overload)
                self._engine.enqueue(command.request_id, command.prompt_ids, command.params, command.cache_salt,
                                     command.adapter)
            except Exception as e:  # the request fails, the engine goes on
                command.sink(e)
                return
            self._sinks[command.request_id] = command.sink
        elif isinstance(command, _Abort):
            self._engine.abort(command.request_id)
            self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
            try:
                command.future.set_result(command.fn(self._engine))
            except BaseException as e:  # handed to the caller, who re-raises it
                command.future.set_exception(e)
