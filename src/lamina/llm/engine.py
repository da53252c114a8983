"""The generation engine: token ids in, token ids out, one sequence at a time on a KV cache.

The engine knows nothing of text, tokenizers or chat templates (those live in `lamina.llm.llm`); it
prefills the prompt, then decodes one token per step, reusing the cache across calls: when a new prompt
starts with tokens already in the cache (a multi-turn chat, a shared system prompt), only the new tokens
are computed. The cache grows in steps as sequences get longer, so short requests stay small.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lamina.arch import KVCache
from lamina.errors import ContextLengthError, InvalidRequestError
from lamina.llm.sampling import Sampler, SamplingParams

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
_CACHE_STEP = 512  # the cache grows in multiples of this many positions


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. The last event of a sequence carries its finish reason."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None
    is_stop_token: bool = False
    """True for an end-of-sequence or stop token id: counted, but not part of the text."""
    cached_prompt_tokens: int = 0
    """How many prompt tokens were reused from the cache (set on every event)."""


class Engine:
    def __init__(self, model: nn.Module, *, eos_ids: Sequence[int], max_seq_len: int, vocab_size: int) -> None:
        self.model = model
        self.eos_ids = tuple(eos_ids)
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []  # the tokens whose keys/values are in the cache, in order

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or of max_tokens.",
                param="max_tokens",
            )

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Yield generated tokens until an end token, a stop token id or max_tokens; close it to stop early."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", param="prompt")
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        self.check_fits(len(prompt_ids), params.max_tokens)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        sampler = Sampler(params, prompt_ids, self.vocab_size, self.device)
        with torch.inference_mode():
            cache, reused = self._prepare_cache(prompt_ids, len(prompt_ids) + params.max_tokens)
            logits = self._forward(prompt_ids[reused:], cache)
            for i in range(params.max_tokens):
                sample = sampler(logits)
                is_stop = sample.token_id in stop_ids
                finish: FinishReason | None = "stop" if is_stop else ("length" if i == params.max_tokens - 1 else None)
                yield TokenEvent(sample.token_id, sample.logprob, sample.top_logprobs, finish, is_stop, reused)
                if finish is not None:
                    return
                logits = self._forward([sample.token_id], cache)

    def _forward(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(tokens, cache, last_only=True)  # (1, 1, vocab)
        self._cached_ids.extend(ids)
        return logits[0, -1].float()

    def _prepare_cache(self, prompt_ids: list[int], total_len: int) -> tuple[KVCache, int]:
        """A cache holding the longest cached prefix of the prompt (at least one token left to compute)."""
        reused = 0
        limit = min(len(self._cached_ids), len(prompt_ids) - 1)
        while reused < limit and self._cached_ids[reused] == prompt_ids[reused]:
            reused += 1
        cache = self._cache
        if cache is None or cache.max_len < total_len:
            size = min(self.max_seq_len, -(-total_len // _CACHE_STEP) * _CACHE_STEP)
            new = self.model.new_cache(1, size)
            if cache is not None and reused:
                new.k[:, :, :, :reused] = cache.k[:, :, :, :reused]
                new.v[:, :, :, :reused] = cache.v[:, :, :, :reused]
            cache = self._cache = new
        cache.length = reused
        del self._cached_ids[reused:]
        if reused:
            logger.debug("reusing %d cached prompt tokens of %d", reused, len(prompt_ids))
        return cache, reused

    def reset(self) -> None:
        """Forget the cached sequence."""
        self._cached_ids.clear()
        if self._cache is not None:
            self._cache.length = 0
