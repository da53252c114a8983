"""A preallocated key/value cache for incremental decoding, shared by the decoder families.

Keys and values for every layer live in two tensors of shape (n_layers, B, n_kv_heads, max_len, head_dim),
allocated once, so decoding a token writes one slot per layer instead of concatenating (which would copy
the whole history every step). `length` is how many positions are filled; setting it lower rewinds the
cache, which is how a shared prefix is kept and the rest recomputed.
"""

from __future__ import annotations

import torch

from lamina.errors import ContextLengthError


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) at `length` and return everything so far (B, n_kv, length+T, hd).

        `length` itself advances only in `advance()`, once all layers have written.
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ContextLengthError(
                f"the KV cache holds {self.max_len} positions but {end} are needed; "
                "ask for fewer tokens or a shorter prompt"
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (keeps the first `length`)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of length {self.length} to {length}")
        self.length = length
