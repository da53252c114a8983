"""Speculative decoding without a draft model: prompt lookup (n-gram) drafts, verified in one step.

vLLM's `ngram` method and llama.cpp's lookup decoding: when the text being generated repeats what the context
already holds (a RAG answer quoting its sources, a summary, a code edit that copies most of the file), the
tokens that followed the latest earlier occurrence of the last few tokens are a cheap guess at the next ones.
The engine feeds the last token and the guess as consecutive rows of one step; each row's logits give the
token greedy decoding would pick there, and the guess is kept up to its first miss, plus the model's own
token at the miss. At batch 1 a step is bound by reading the weights, so checking four rows costs little more
than computing one, and every accepted guess is a token for free.

Exact for greedy decoding: each row of the native step is computed by the same instructions whatever else is
in the call (`lamina_cpu.c`), so the tokens are those plain decoding gives. Sampled requests decode as usual.
"""

from __future__ import annotations

import numpy as np

MAX_SPECULATIVE_TOKENS = 16


def propose(tokens: list[int] | np.ndarray, k: int, max_n: int = 3, min_n: int = 2) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix n-gram of `tokens`
    (n from `max_n` down to `min_n`); [] when no suffix of at least `min_n` tokens occurred before."""
    ids = np.asarray(tokens, dtype=np.int64)
    size = len(ids)
    if k <= 0 or size <= min_n:
        return []
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = ids[size - n :]
        # starts i < size - n of earlier occurrences: ids[i : i + n] == suffix
        candidates = np.flatnonzero(ids[: size - n] == suffix[0])
        for j in range(1, n):
            if not len(candidates):
                break
            candidates = candidates[ids[candidates + j] == suffix[j]]
        if len(candidates):
            start = int(candidates[-1]) + n  # the latest occurrence: what followed it
            return ids[start : start + k].tolist()
    return []
