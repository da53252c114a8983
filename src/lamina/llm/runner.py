"""The model runner: runs the scheduled chunks through the model and owns the sequences' KV caches.

Each sequence has its own preallocated cache, grown in steps of `CACHE_STEP` positions as it gets longer
(so a request that may generate thousands of tokens does not reserve them up front). When a sequence
finishes, its cache is kept in a small LRU pool with the tokens it holds; a new sequence whose prompt starts
with those tokens takes the cache over and skips recomputing them (multi-turn chats, shared system prompts).
This runner executes one sequence at a time; the engine issue batches them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lamina.arch import KVCache
from lamina.llm.scheduler import SchedulerOutput, Sequence

CACHE_STEP = 512


class ModelRunner:
    def __init__(self, model: nn.Module, *, max_seq_len: int, retained_caches: int = 2) -> None:
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        self.retained_caches = retained_caches
        self._pool: OrderedDict[int, tuple[KVCache, list[int]]] = OrderedDict()

    @torch.inference_mode()
    def execute(self, work: SchedulerOutput) -> dict[str, torch.Tensor]:
        """Feed every chunk; return float32 logits (vocab,) for the chunks that end in a sample."""
        logits: dict[str, torch.Tensor] = {}
        for chunk in work.chunks:
            seq = chunk.seq
            cache = self._ensure_capacity(seq, seq.num_computed + len(chunk.token_ids))
            tokens = torch.tensor([chunk.token_ids], dtype=torch.long, device=self.device)
            out = self.model(tokens, cache, last_only=True)
            seq.num_computed += len(chunk.token_ids)
            if chunk.sample:
                logits[seq.request_id] = out[0, -1].float()
        return logits

    def release(self, seq: Sequence) -> None:
        """Keep a finished sequence's cache for reuse by a later prompt with the same start."""
        cache, seq.cache = seq.cache, None
        if cache is None or self.retained_caches <= 0:
            return
        computed = seq.token_ids[: cache.length]
        self._pool[id(cache)] = (cache, computed)
        while len(self._pool) > self.retained_caches:
            self._pool.popitem(last=False)

    def clear(self) -> None:
        self._pool.clear()

    def acquire(self, seq: Sequence) -> None:
        """Give `seq` the pooled cache sharing its longest prompt prefix, or a new one."""
        best_key, best = None, 0
        limit = len(seq.prompt_ids) - 1  # at least one prompt token must be computed to get logits
        for key, (_, ids) in self._pool.items():
            n = _common_prefix(ids, seq.prompt_ids, limit)
            if n > best:
                best_key, best = key, n
        if best_key is not None:
            cache, _ = self._pool.pop(best_key)
            cache.rewind(best)
            seq.cache, seq.num_computed, seq.cached_prompt_tokens = cache, best, best
        else:
            seq.cache = self.model.new_cache(1, self._size_for(len(seq.prompt_ids) + 1))

    def _ensure_capacity(self, seq: Sequence, needed: int) -> KVCache:
        cache = seq.cache
        assert cache is not None, "the engine acquires a cache when it admits a sequence"
        if cache.max_len >= needed:
            return cache
        bigger = self.model.new_cache(1, self._size_for(needed))
        n = cache.length
        bigger.k[:, :, :, :n] = cache.k[:, :, :, :n]
        bigger.v[:, :, :, :n] = cache.v[:, :, :, :n]
        bigger.length = n
        seq.cache = bigger
        return bigger

    def _size_for(self, n: int) -> int:
        return min(self.max_seq_len, -(-n // CACHE_STEP) * CACHE_STEP)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    end = min(len(a), len(b), limit)
    while n < end and a[n] == b[n]:
        n += 1
    return n
