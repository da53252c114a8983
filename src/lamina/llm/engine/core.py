"""The generation engine: token ids in, token ids out, for many sequences at once.

    engine.add_request("r1", prompt_ids, SamplingParams(...))
    while engine.has_unfinished():
        for event in engine.step():       # one token for each sequence that produced one
            ...
    engine.abort("r1")                    # a client went away, or a stop string was found upstream

`step()` is schedule -> execute -> sample (vLLM's split): the `Scheduler` picks the chunks, the
`ModelRunner` runs them and owns the KV caches, and the engine samples, checks end tokens and limits, and
reports `TokenEvent`s. The engine knows nothing of text, tokenizers or chat templates; those live above it
(`lamina.llm.text.stream`, `lamina.llm.llm`). It is not thread-safe: one thread drives it (the caller for the
Python API, `AsyncEngine`'s worker thread for the server).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lamina.errors import ContextLengthError, InvalidRequestError
from lamina.infra.device import serial
from lamina.llm.engine import speculative
from lamina.llm.engine.grammar import Grammars
from lamina.llm.engine.runner import ModelRunner
from lamina.llm.engine.sampling import Sample, Sampler, SamplingParams, sample_batch
from lamina.llm.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput, Status
from lamina.llm.engine.scheduler import Sequence as Seq
from lamina.llm.kernels.native import DEFAULT_OPTIONS, NativeOptions

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request. The last event of a request carries its finish reason."""

    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None
    is_stop_token: bool = False
    """True for an end-of-sequence or stop token id: counted, but not part of the text."""
    cached_prompt_tokens: int = 0
    """How many prompt tokens were reused from an earlier sequence's cache."""


@dataclass(frozen=True)
class EngineArgs:
    max_running: int = 16
    """Sequences decoded concurrently; more wait in a queue."""
    max_waiting: int = 256
    """Queued sequences beyond which new requests are refused (503)."""
    prefill_chunk: int = 512
    """Most prompt tokens fed to one sequence in one step."""
    retained_caches: int = 4
    """Finished sequences whose KV caches are kept for prefix reuse."""
    kv_cache_gb: float = 2.0
    """Memory for the running sequences' keys and values; requests wait (or are refused) beyond it."""
    kv_cache_dtype: str = "auto"
    """How keys and values are stored: float32, bfloat16, or auto (bfloat16 under quantised weights, as llama.cpp
    keeps f16 ones by default: half the bytes a long context reads per step; else the model's dtype)."""
    speculative_tokens: int = 0
    """Prompt-lookup draft tokens each greedy request verifies per step (`speculative`); 0 is off. A request's
    `speculative_tokens` overrides it."""
    prompt_lookup_max: int = 3
    """Longest suffix n-gram looked up for a draft."""
    prompt_lookup_min: int = 2
    """Shortest suffix n-gram that makes a draft."""
    max_request_seconds: float | None = None
    """A request still generating this long after it arrived ends with its next token (finish reason "length"):
    a forgotten request cannot hold a slot for ever. None: no limit (max_tokens, by default the context left as
    in vLLM, is then the only bound)."""


@dataclass(frozen=True)
class EngineStats:
    """What the engine reports after a step (the server's gauges and counters)."""

    running: int
    waiting: int
    tokens: int
    """Tokens produced by the step."""
    kv_usage: float
    """Share of the KV budget held."""
    prefix_queries: int
    """Prompt tokens looked up in the prefix cache so far."""
    prefix_hits: int
    """Of those, the ones found."""


class Engine:
    def __init__(
        self,
        model: nn.Module,
        *,
        eos_ids: Sequence[int],
        max_seq_len: int,
        vocab_size: int,
        args: EngineArgs | None = None,
        cache_dir: Path | None = None,
        native: NativeOptions = DEFAULT_OPTIONS,
        grammars: Grammars | None = None,
    ) -> None:
        """`cache_dir`: where kernel measurements are kept (LAMINA_HOME/cache); None measures each time.
        `native`: whether and how the native kernels are built (the settings' LAMINA_NATIVE, ...).
        `grammars`: the model's grammar compiler, for requests with `structured` outputs (None: refused)."""
        args = args or EngineArgs()
        self.grammars = grammars
        self._masks: ThreadPoolExecutor | None = None
        """Computes the grammar masks of a step while its forward runs (made with the first such step)."""
        self.eos_ids = frozenset(eos_ids)
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.runner = ModelRunner(model, max_seq_len=max_seq_len, retained_caches=args.retained_caches,
                                  kv_budget_bytes=int(args.kv_cache_gb * 1024**3), cache_dir=cache_dir,
                                  native=native, kv_dtype=args.kv_cache_dtype)
        self.device = self.runner.device
        self.args = args
        self.drafted = 0
        """Draft tokens proposed so far (speculative decoding), and of those, the ones accepted:"""
        self.accepted = 0
        self.scheduler = Scheduler(max_running=args.max_running, max_waiting=args.max_waiting, prefill_chunk=args.prefill_chunk)

    # --- requests -------------------------------------------------------------------------------------

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None) -> None:
        """The one check of a request: raise the error it deserves, without adding anything (any thread)."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", param="prompt")
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        n = len(prompt_ids)
        if n + params.max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the length of the prompt or of max_tokens.",
                param="max_tokens",
            )
        if adapter is not None and adapter not in self.runner.adapters:
            raise InvalidRequestError(f"no LoRA adapter named {adapter!r} is loaded", param="model")
        if params.structured is not None:
            if self.grammars is None:
                raise InvalidRequestError("this model was loaded without its tokenizer, so structured outputs are unavailable",
                                          param=params.structured.param)
            self.grammars.check(params.structured)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, cache_salt: str = "",
                    adapter: str | None = None) -> None:
        """Check and queue a request; `adapter` names a LoRA adapter loaded into the model (None: the base)."""
        self.validate(prompt_ids, params, adapter)
        self.enqueue(request_id, prompt_ids, params, cache_salt, adapter)

    def enqueue(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, cache_salt: str = "",
                adapter: str | None = None) -> None:
        """Queue a request that `validate` has accepted (the driver validates once, in the caller's thread)."""
        prompt_ids = list(prompt_ids)
        matcher = self.grammars.matcher(params.structured) if params.structured is not None and self.grammars else None
        sampler = Sampler(params, prompt_ids, self.vocab_size, self.device, matcher)
        # keys/values computed under one adapter are not those of another: prefixes are shared per adapter
        salt = cache_salt if adapter is None else f"{cache_salt}|lora:{adapter}"
        seq = Seq(request_id, prompt_ids, params, sampler, salt=salt, adapter=adapter)
        self.runner.check_fits_alone(seq)
        self.scheduler.add(seq)

    @torch.inference_mode()  # (the KV rows it compacts may have been made in the forward's inference mode)
    def abort(self, request_id: str) -> None:
        seq = self.scheduler.remove(request_id)
        if seq is not None:
            seq.status = Status.FINISHED
            self.runner.release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # --- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One step. All of it runs in inference mode: the KV cache grows inside the forward (so its tensors are
        inference tensors) and rows are compacted when a sequence finishes, after sampling."""
        self.scheduler.admit(self.runner.fits, lambda seq: self.runner.acquire(seq, seq.salt))
        work = self._with_drafts(self.scheduler.schedule())
        masks = self._start_masks(work)
        logits = self.runner.execute(work)
        if masks is not None:
            masks.result()
        with serial():  # small ops between two steps: parallel, they would slow the next one (see `serial`)
            return self._sample(work, logits)

    def _start_masks(self, work: SchedulerOutput) -> Future | None:
        """Compute the grammar masks of the step's constrained samples on a side thread, while the forward runs."""
        matchers = [c.seq.sampler.matcher for c in work.chunks if c.sample and c.seq.sampler.matcher is not None]
        if not matchers:
            return None
        if self._masks is None:
            self._masks = ThreadPoolExecutor(1, thread_name_prefix="lamina-grammar")
        return self._masks.submit(lambda: [m.fill() for m in matchers])  # type: ignore[union-attr]

    def _sample(self, work: SchedulerOutput, logits: dict[str, torch.Tensor]) -> list[TokenEvent]:
        now = time.monotonic()
        events = []
        single = [c for c in work.chunks if c.seq.request_id in logits and not c.draft]  # one token each: sampled together
        picked: dict[int, Sample] = {}
        if single:
            stacked = torch.stack([logits[c.seq.request_id] for c in single])
            picked = {id(c): s for c, s in zip(single, sample_batch([c.seq.sampler for c in single], stacked), strict=True)}
        for chunk in work.chunks:
            seq = chunk.seq
            if seq.request_id not in logits:
                continue
            out = logits[seq.request_id]
            rows = out if chunk.draft else out[None]
            for i in range(len(rows)):  # a draft's rows: kept while each guess is the token greedy decoding picks
                sample = picked[id(chunk)] if not chunk.draft else seq.sampler(rows[i])
                seq.output_ids.append(sample.token_id)
                p = seq.params
                is_stop = sample.token_id in p.stop_token_ids or (not p.ignore_eos and sample.token_id in self.eos_ids)
                finish: FinishReason | None = "stop" if is_stop else ("length" if len(seq.output_ids) >= p.max_tokens else None)
                matcher = seq.sampler.matcher
                if finish is None and matcher is not None and matcher.done:
                    finish = "stop"  # the grammar admits nothing more: the output is complete
                if finish == "stop" and matcher is not None and matcher.closing:
                    finish = "length"  # complete and valid, but closed early because the budget ran out
                if finish is None and self.args.max_request_seconds is not None and now - seq.arrival >= self.args.max_request_seconds:
                    finish = "length"  # the server's time limit
                events.append(TokenEvent(seq.request_id, sample.token_id, sample.logprob, sample.top_logprobs, finish, is_stop,
                                         seq.cached_prompt_tokens))
                hit = i + 1 < len(rows) and sample.token_id == chunk.token_ids[i + 1]
                self.accepted += hit
                if finish is not None or not hit:
                    break
            if chunk.draft:  # the keys and values of the guesses after the first miss are not the sequence's
                self.runner.rollback(seq, len(rows) - 1 - i)
            if finish is not None:
                self.scheduler.remove(seq.request_id)
                seq.status = Status.FINISHED
                self.runner.release(seq)
        return events

    def _with_drafts(self, work: SchedulerOutput) -> SchedulerOutput:
        """Greedy decoding chunks extended by prompt-lookup drafts, where the native step runs (it is exact).
        Constrained requests take no drafts (a guess the grammar forbids would have to be rolled back in it too)."""
        if not self.runner.speculates:
            return work
        chunks = []
        for c in work.chunks:
            seq, p = c.seq, c.seq.params
            k = self.args.speculative_tokens if p.speculative_tokens is None else p.speculative_tokens
            if k and p.greedy and not seq.in_prefill and len(c.token_ids) == 1 and seq.sampler.matcher is None:
                room = min(p.max_tokens - len(seq.output_ids) - 1, self.max_seq_len - len(seq.token_ids) - 1)
                draft = speculative.propose(seq.token_ids, min(k, room), self.args.prompt_lookup_max, self.args.prompt_lookup_min)
                if draft:
                    self.drafted += len(draft)
                    c = ScheduledChunk(seq, c.token_ids + draft, c.sample, draft=len(draft))
            chunks.append(c)
        return SchedulerOutput(chunks)

    def stats(self, tokens: int = 0) -> EngineStats:
        runner = self.runner
        return EngineStats(self.num_running, self.num_waiting, tokens, runner.usage, runner.prefix_queries, runner.prefix_hits)

    def reset(self) -> None:
        """Forget the caches kept for prefix reuse."""
        self.runner.clear()

    def drop_all(self) -> list[str]:
        """Forget every running and waiting sequence and their KV rows, after a failed step left them in an
        unknown state; the ids dropped."""
        dropped = [s.request_id for s in [*self.scheduler.running, *self.scheduler.waiting]]
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            seq.status = Status.FINISHED
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.runner.drop_rows()
        return dropped
