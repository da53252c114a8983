"""The model runner: runs the scheduled work through the model, keeping every sequence's keys and values.

All running sequences share one `SlotCache` (one row each), under a memory budget. Rows are kept in two
contiguous runs: sequences that are decoding first (rows 0..D-1), then those still feeding their prompt.
A step is then:
- one batched forward for all decoding sequences (`SlotCache.decode(D)`): each weight matrix is read once
  for the whole batch, which is what makes continuous batching pay on a memory-bound CPU;
- one forward per prompt chunk (`SlotCache.row(b)`), as long as the scheduler allowed.
A sequence that finishes leaves its row to the last one (one copy), so the runs stay contiguous.

Prefix reuse: a new sequence starts by copying the keys and values of the longest prefix of its prompt
that some running sequence, or a recently finished one, already computed (a shared system prompt, a
multi-turn chat). Copying is a memcpy; recomputing is a prefill. Sequences only share with the same
`cache_salt` (one tenant's prompts are never probed by another's).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lamina.arch import KVCache
from lamina.arch.kv_cache import SlotCache
from lamina.arch.lora import adapter_names, route_adapters
from lamina.errors import ConfigError, InvalidRequestError
from lamina.infra.device import probe_dtypes
from lamina.llm.engine.scheduler import ScheduledChunk, SchedulerOutput, Sequence
from lamina.llm.kernels.linear import QuantLinear
from lamina.llm.kernels.native import DEFAULT_OPTIONS, NativeOptions
from lamina.llm.kernels.native_decode import NativeDecoder, native_step_for, use_native_prompt_attention

logger = logging.getLogger(__name__)

CACHE_STEP = 256
NATIVE_PREFILL_ROWS = 64
"""Prompt chunks at least this long run in PyTorch (flash attention over the chunk, the float GEMM where it
wins) rather than in the fused native step, whose attention goes row by row."""
PREFIX_WAIT_TOKENS = 32
"""A new sequence waits a step for a running one computing at least this many tokens of its prefix."""


@dataclass
class _Retained:
    """A finished sequence's computed tokens and their keys/values, kept for prefix reuse."""

    ids: np.ndarray
    cache: KVCache
    salt: str


KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def kv_cache_dtype(model: nn.Module, name: str = "auto") -> torch.dtype:
    """The dtype the KV cache keeps keys and values in (`EngineArgs.kv_cache_dtype`): auto is bfloat16 under
    quantised float32-activation weights (llama.cpp's default is f16), else the model's own dtype."""
    ref = next(model.parameters()).dtype
    if name == "auto":
        quantised = any(isinstance(m, QuantLinear) for m in model.modules())
        return torch.bfloat16 if quantised and ref == torch.float32 else ref
    if name not in KV_DTYPES:
        raise ConfigError(f"kv_cache_dtype {name!r} is not one of auto, {', '.join(KV_DTYPES)}", param="kv_cache_dtype")
    return KV_DTYPES[name]


class ModelRunner:
    def __init__(
        self, model: nn.Module, *, max_seq_len: int, kv_budget_bytes: int, retained_caches: int = 2, cache_dir: Path | None = None,
        native: NativeOptions = DEFAULT_OPTIONS, kv_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.max_seq_len = max_seq_len
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        c = model.config
        self.kv_dtype = kv_cache_dtype(model, kv_dtype)
        self.slots = SlotCache(c.n_layers, c.n_kv_heads, c.head_dim, dtype=self.kv_dtype, device=self.device)
        self.kv_budget_bytes = kv_budget_bytes
        self.rows: list[Sequence] = []  # row b holds self.rows[b]
        self.decoding = 0  # rows 0..decoding-1 are decoding; the rest are still feeding their prompt
        self.retained_caches = retained_caches
        self._retained: OrderedDict[int, _Retained] = OrderedDict()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.adapters: set[str] = set()
        self.cache_dir = cache_dir
        self.native_options = native
        self.native: NativeDecoder | None = None
        self.native_prefill_rows = 1
        self.refresh_adapters()

    def refresh_adapters(self) -> None:
        """Take note of the LoRA adapters loaded into the model (call after loading or removing one)."""
        self.adapters = set(adapter_names(self.model))
        # Llama-family models run each step in one native call where that applies (and, for float weights,
        # was measured faster): the decoding rows, and for quantised models also the prompt chunks shorter than
        # NATIVE_PREFILL_ROWS; the rest runs in PyTorch (where each layer's `gemm_rows`, measured, picks the float
        # GEMM or integer dots). A fixed length, not the measured one: that probe times 0.1 ms calls, and which
        # path a 20-token chunk takes should not change with a noisy moment at start-up. Float weights in a dtype
        # whose PyTorch GEMM is slower here than float32's (bfloat16 without AVX-512-BF16 or AMX: about 1
        # GFLOP/s) feed their prompts through the native step too. LoRA adapters run inside the step, each row
        # under its own. Rebuilt here because adapters change the modules the step reads.
        self.native = native_step_for(self.model, self.cache_dir, self.native_options)
        use_native_prompt_attention(self.model, self.cache_dir, self.native_options)
        quantised = self.native is not None and self.native.quantized
        if self.native is not None:
            logger.info("decoding through the native step (%s weights)", "quantised" if quantised else "float")
        if quantised:
            self.native_prefill_rows = NATIVE_PREFILL_ROWS
        elif (self.native is not None and self.dtype != torch.float32
              and probe_dtypes(self.device, self.cache_dir).slower_than_float32(self.dtype)):
            self.native_prefill_rows = 1 << 30
            logger.info("prompts through the native step too (PyTorch's %s GEMM is slow here)", self.dtype)
        else:
            self.native_prefill_rows = 1

    @property
    def speculates(self) -> bool:
        """Whether decoding chunks may carry drafts: on the native step, whose rows do not depend on their batch."""
        return self.native is not None

    def rollback(self, seq: Sequence, n: int) -> None:
        """Forget the last `n` computed positions of `seq` (a draft's rejected guesses)."""
        if n > 0 and seq.row is not None:
            self.slots.lengths[seq.row] -= n
            seq.num_computed -= n

    def _forward(self, seqs: list[Sequence], tokens: torch.Tensor, cache: object, **kw: object) -> torch.Tensor:
        """The model on a batch whose row i belongs to seqs[i], each row under its own adapter (or none)."""
        if not self.adapters:
            return self.model(tokens, cache, **kw)
        with route_adapters(self.model, [s.adapter for s in seqs]):
            return self.model(tokens, cache, **kw)

    # --- memory --------------------------------------------------------------------------------------

    @property
    def budget_positions(self) -> int:
        return self.kv_budget_bytes // self.slots.bytes_per_position

    def reservation(self, seq: Sequence) -> int:
        return min(self.max_seq_len, len(seq.prompt_ids) + seq.params.max_tokens)

    def fits(self, seq: Sequence) -> bool:
        """Should `seq` join the running ones now?

        Not if the cache could outgrow the budget at its worst (rows share one capacity, the longest
        sequence's, so the worst case is rows x longest reservation). Not either while a running sequence is
        still computing a prompt prefix that `seq` shares: one step later it can copy it instead (a burst of
        requests with one system prompt computes that prompt once).
        """
        rows = len(self.rows) + 1
        longest = max([self.reservation(s) for s in self.rows] + [self.reservation(seq)])
        if rows * _round(longest) > self.budget_positions:
            return False
        prompt = np.asarray(seq.prompt_ids, dtype=np.int64)
        for other in self.rows:
            if other.salt == seq.salt and other.in_prefill:
                shared = _common(prompt, np.asarray(other.prompt_ids, dtype=np.int64), len(prompt) - 1)
                if shared >= PREFIX_WAIT_TOKENS and self.slots.lengths[other.row] < shared:
                    return False
        return True

    def _reserve(self, capacity: int) -> None:
        """Room for every row at `capacity` positions. Rows grow by doubling (a burst of N arrivals copies the
        cache log N times, not N times), but never past what the budget holds at that capacity."""
        rows, capacity = len(self.rows), max(capacity, self.slots.capacity)
        if self.slots.slots * capacity > self.budget_positions:  # longer rows: first drop the spare ones
            self.slots.shrink(max(rows, 1), self.slots.capacity)
        if rows > self.slots.slots:
            rows = max(rows, min(2 * self.slots.slots, self.budget_positions // max(capacity, 1)))
        self.slots.reserve(rows, capacity)

    def check_fits_alone(self, seq: Sequence) -> None:
        if _round(self.reservation(seq)) > self.budget_positions:
            raise InvalidRequestError(
                f"this request needs a KV cache of {self.reservation(seq)} positions, more than the whole budget "
                f"({self.budget_positions} positions, --kv-cache-gb); lower max_tokens or shorten the prompt",
                param="max_tokens",
            )

    @property
    def usage(self) -> float:
        """Share of the KV budget held by the cache tensors (what the server reports)."""
        return self.slots.nbytes / self.kv_budget_bytes if self.kv_budget_bytes else 0.0

    # --- sequences in and out ------------------------------------------------------------------------------

    def acquire(self, seq: Sequence, salt: str = "") -> None:
        """Give `seq` a row after the others, starting from the longest cached prefix of its prompt."""
        row = len(self.rows)
        self.rows.append(seq)
        seq.row = row
        seq.salt = salt
        self._reserve(_round(len(seq.prompt_ids) + 1))
        self.slots.lengths[row] = 0
        self.prefix_queries += len(seq.prompt_ids)
        n, source = self._best_prefix(seq)
        if n:
            if isinstance(source, int):
                self.slots.copy_prefix(source, row, n)
            else:
                assert source is not None
                self.slots.load(row, source.cache, n)
            seq.num_computed = seq.cached_prompt_tokens = n
            self.prefix_hits += n

    def _best_prefix(self, seq: Sequence) -> tuple[int, int | _Retained | None]:
        prompt = np.asarray(seq.prompt_ids, dtype=np.int64)
        limit = len(prompt) - 1  # one prompt token must be computed to get logits
        best, source = 0, None
        for other in self.rows[:-1]:
            if other.salt == seq.salt:
                n = _common(prompt, np.asarray(other.token_ids[: self.slots.lengths[other.row]], dtype=np.int64), limit)
                if n > best:
                    best, source = n, other.row
        best_key = None
        for key, kept in self._retained.items():
            if kept.salt == seq.salt:
                n = _common(prompt, kept.ids, limit)
                if n > best:
                    best, source, best_key = n, kept, key
        if best_key is not None and source is self._retained.get(best_key):
            self._retained.move_to_end(best_key)  # least recently used goes first
        return best, source

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s row (keeping its keys/values for prefix reuse) and close the gap."""
        row = seq.row
        if row is None or row >= len(self.rows) or self.rows[row] is not seq:
            return
        # The last sequence of a one-row cache hands the cache's own tensors over (the row is freed with the
        # rest just below): no copy. A copy of 8,000 positions took 0.3-0.5 s into fresh memory on a 2-core AMD
        # EPYC (a VM, whose first touch of memory is slow), on the engine thread, before the final token went out.
        self._retain(seq, take=len(self.rows) == 1 and self.slots.slots == 1)
        last_decoding = self.decoding - 1
        if row < self.decoding:
            self._move(last_decoding, row)
            self._move(len(self.rows) - 1, last_decoding)
            self.decoding -= 1
        else:
            self._move(len(self.rows) - 1, row)
        self.rows.pop()
        seq.row = None
        if not self.rows:
            self.slots.shrink(0, 0)

    def _retain(self, seq: Sequence, take: bool = False) -> None:
        """Keep `seq`'s keys and values for prefix reuse: a copy, or (`take`, the cache's one row, about to be
        freed) the cache's tensors themselves."""
        n = self.slots.lengths[seq.row]
        if self.retained_caches <= 0 or n == 0:
            return
        if take:
            assert seq.row == 0 and self.slots.slots == 1
            cache = KVCache.over(self.slots.k, self.slots.v, n)
            self.slots.shrink(0, 0)  # new, empty tensors: the cache writes to the ones handed over no more
        else:
            c = self.model.config
            cache = KVCache(c.n_layers, 1, c.n_kv_heads, n, c.head_dim, dtype=self.kv_dtype, device=self.device)
            self.slots.save(seq.row, cache)
        self._retained[id(cache)] = _Retained(np.asarray(seq.token_ids[:n], dtype=np.int64), cache, seq.salt)
        while len(self._retained) > self.retained_caches:
            self._retained.popitem(last=False)

    def _move(self, src: int, dst: int) -> None:
        if src == dst or src < 0:
            return
        self.slots.move(src, dst)
        seq = self.rows[src]
        self.rows[dst] = seq
        seq.row = dst

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        self.slots.swap(a, b)
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.rows[a].row, self.rows[b].row = a, b

    def clear(self) -> None:
        self._retained.clear()

    def drop_rows(self) -> None:
        """Free every row at once, keeping nothing (recovery from a failed step)."""
        for seq in self.rows:
            seq.row = None
        self.rows.clear()
        self.decoding = 0
        self.slots.shrink(0, 0)

    # --- one step --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, work: SchedulerOutput) -> dict[str, torch.Tensor]:
        """Feed every chunk; return float32 logits (vocab,) for the sequences that sample this step."""
        decode = [c for c in work.chunks if c.seq.row < self.decoding]
        prefill = [c for c in work.chunks if c.seq.row >= self.decoding]
        assert not decode or len(decode) == self.decoding, "every decoding sequence takes part in each step"
        if self.native is not None:
            return self._execute_native(decode, prefill)
        logits: dict[str, torch.Tensor] = {}
        if decode:
            d = self.decoding
            self._reserve(_round(max(self.slots.lengths[:d]) + 1))
            tokens = torch.zeros(d, 1, dtype=torch.long, device=self.device)
            for c in decode:
                tokens[c.seq.row, 0] = c.token_ids[0]
            out = self._forward(self.rows[:d], tokens, self.slots.decode(d))[:, -1].float()  # (D, vocab)
            for c in decode:
                c.seq.num_computed += 1
                logits[c.seq.request_id] = out[c.seq.row]
        for c in prefill:
            self._prefill_in_pytorch(c, logits)
        return logits

    def _execute_native(self, decode: list[ScheduledChunk], prefill: list[ScheduledChunk]) -> dict[str, torch.Tensor]:
        """One native call for the decoding rows and every short prompt chunk; long chunks take the float GEMM."""
        assert self.native is not None
        logits: dict[str, torch.Tensor] = {}
        short = [c for c in prefill if len(c.token_ids) < self.native_prefill_rows]
        long = [c for c in prefill if len(c.token_ids) >= self.native_prefill_rows]
        fused = decode + short
        if fused:
            need = max(self.slots.lengths[c.seq.row] + len(c.token_ids) for c in fused)
            self._reserve(_round(need))
            tokens: list[int] = []
            slots: list[int] = []
            positions: list[int] = []
            out_rows: list[int] = []
            adapters: list[str | None] = []
            first: dict[int, int] = {}
            samplers: list[ScheduledChunk] = []
            for c in fused:
                start = self.slots.lengths[c.seq.row]
                tokens += c.token_ids
                slots += [c.seq.row] * len(c.token_ids)
                adapters += [c.seq.adapter] * len(c.token_ids)
                positions += range(start, start + len(c.token_ids))
                if c.seq.row < self.decoding or c.sample:
                    first[id(c)] = len(out_rows)
                    out_rows += range(len(tokens) - (c.draft + 1), len(tokens))  # a draft: every row's logits
                    samplers.append(c)
            out = self.native.step(torch.tensor(tokens), slots, positions, out_rows, self.slots, adapters)
            for c in fused:
                self.slots.lengths[c.seq.row] += len(c.token_ids)
            sampled = {id(c): out[first[id(c)] : first[id(c)] + c.draft + 1] for c in samplers}
            for c in decode:
                c.seq.num_computed += len(c.token_ids)
                rows = sampled[id(c)]
                logits[c.seq.request_id] = rows if c.draft else rows[0]
            for c in short:
                rows = sampled.get(id(c))
                self._prefill_chunk(c, None if rows is None else rows[0], logits)
        for c in long:
            self._prefill_in_pytorch(c, logits)
        return logits

    def _prefill_in_pytorch(self, c: ScheduledChunk, logits: dict[str, torch.Tensor]) -> None:
        tokens = torch.tensor([c.token_ids], dtype=torch.long, device=self.device)
        out = self._forward([c.seq], tokens, self.slots.row(c.seq.row), last_only=True)
        self._prefill_chunk(c, out[0, -1], logits)

    def _prefill_chunk(self, c: ScheduledChunk, last: torch.Tensor | None, logits: dict[str, torch.Tensor]) -> None:
        """Book a fed prompt chunk; one that ends the prompt samples and joins the decoding rows."""
        seq = c.seq
        seq.num_computed += len(c.token_ids)
        if c.sample:
            assert last is not None
            logits[seq.request_id] = last.float()
            self._swap(seq.row, self.decoding)  # it decodes from now on
            self.decoding += 1


    @torch.inference_mode()
    def decode_perplexity(self, ids: Seq[int]) -> float:
        """Teacher-forced perplexity of `ids`, one token a step through the decode step the engine uses (the
        native one where it applies), on a cache of its own: any model family, the running rows untouched."""
        c = self.model.config
        slots = SlotCache(c.n_layers, c.n_kv_heads, c.head_dim, dtype=self.kv_dtype, device=self.device)
        slots.reserve(1, len(ids) + 8)
        nll = 0.0
        self.model(torch.tensor([ids[:1]], device=self.device), slots.row(0))
        for i in range(1, len(ids) - 1):
            tok = torch.tensor([[ids[i]]], device=self.device)
            if self.native is not None:
                logits = self.native.decode(tok, slots, 1)
            else:
                logits = self.model(tok, slots.decode(1))[:, -1].float()
            target = torch.tensor([ids[i + 1]], device=self.device)
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        return math.exp(nll / (len(ids) - 2))


def _round(n: int) -> int:
    return -(-n // CACHE_STEP) * CACHE_STEP


def _common(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n
