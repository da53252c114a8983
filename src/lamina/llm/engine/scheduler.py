"""The scheduler: which sequences run in the next engine step, and how many tokens each feeds.

vLLM's split: the scheduler decides, the model runner computes, the engine samples and reports. Each step
every running sequence either decodes one token or feeds the next chunk of its prompt (chunked prefill,
so a long prompt does not stall the streams already running), within a token budget per step. New
requests are admitted first come, first served, up to `max_running`; beyond `max_waiting` queued requests
the engine refuses more (503) rather than queue without bound.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from lamina.arch import KVCache
from lamina.errors import LaminaError
from lamina.llm.engine.sampling import Sampler, SamplingParams


class OverloadedError(LaminaError):
    status_code = 503
    error_type = "server_error"
    code = "overloaded"


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state as it moves through the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    cache: KVCache | None = None
    num_computed: int = 0
    """Tokens whose keys/values are in the cache."""
    cached_prompt_tokens: int = 0
    """Prompt tokens whose keys/values were reused from an earlier sequence."""
    salt: str = ""
    """Prefix reuse happens only between sequences with the same salt (a tenant)."""
    adapter: str | None = None
    """The LoRA adapter the sequence runs with (None: the base model)."""
    row: int | None = None
    """The sequence's row in the runner's slot cache while it runs."""
    arrival: float = field(default_factory=time.monotonic)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed `token_ids` (positions seq.num_computed onwards); `sample` when they end the known sequence.

    A decoding chunk with `draft` > 0 holds the last token and `draft` guessed ones after it (speculative
    decoding): every row's logits come back, and the engine keeps the guesses up to the first miss."""

    seq: Sequence
    token_ids: list[int]
    sample: bool
    draft: int = 0


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    def __init__(self, *, max_running: int = 16, max_waiting: int = 256, prefill_chunk: int = 512, token_budget: int = 2048) -> None:
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_chunk, self.token_budget = prefill_chunk, token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise OverloadedError(
                f"the server is overloaded ({len(self.running)} running, {len(self.waiting)} waiting); retry shortly"
            )
        self.waiting.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, fits: Callable[[Sequence], bool] | None = None,
              on_admit: Callable[[Sequence], None] | None = None) -> list[Sequence]:
        """Move waiting sequences into the running set, first come first served, up to the cap.

        `fits` says whether the KV-cache budget can take the next one; if not, it (and everyone behind it,
        so nobody overtakes) waits for running sequences to finish. `on_admit` runs for each before the
        next is considered, so `fits` sees it.
        """
        admitted = []
        while self.waiting and len(self.running) < self.max_running and (fits is None or fits(self.waiting[0])):
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            if on_admit is not None:
                on_admit(seq)
        return admitted

    def schedule(self) -> SchedulerOutput:
        """The chunks of the next step for the running sequences (call `admit` first)."""
        chunks: list[ScheduledChunk] = []
        budget = self.token_budget
        # Decodes first: one token each keeps every stream moving; prefills share what budget is left.
        for seq in sorted(self.running, key=lambda s: s.in_prefill):
            known = seq.token_ids
            remaining = len(known) - seq.num_computed
            if remaining <= 0:
                continue
            n = 1 if remaining == 1 else min(remaining, self.prefill_chunk, budget)
            if n <= 0:
                break
            budget -= n
            end = seq.num_computed + n
            chunks.append(ScheduledChunk(seq, known[seq.num_computed : end], sample=end == len(known)))
        return SchedulerOutput(chunks)
