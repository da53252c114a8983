"""A preallocated key/value cache for incremental decoding, shared by the decoder families.

Keys and values for every layer live in two tensors of shape (n_layers, B, n_kv_heads, max_len, head_dim),
allocated once, so decoding a token writes one slot per layer instead of concatenating (which would copy
the whole history every step). `length` is how many positions are filled; setting it lower rewinds the
cache, which is how a shared prefix is kept and the rest recomputed.
"""

from __future__ import annotations

import torch

from lamina.errors import ContextLengthError


def _as(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Cached keys or values in the dtype the attention computes in (a bfloat16 cache under float32 weights)."""
    return cached if cached.dtype == new.dtype else cached.to(new.dtype)


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

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor, length: int) -> KVCache:
        """A cache over existing tensors (n_layers, B, n_kv_heads, max_len, head_dim), `length` positions filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.length = k, v, k.shape[3], length
        return cache

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
        return _as(self.k[layer, :, :, :end], k), _as(self.v[layer, :, :, :end], v)

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (keeps the first `length`)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of length {self.length} to {length}")
        self.length = length


class SlotCache:
    """Keys and values of many sequences in one pair of tensors, one row ("slot") per sequence.

    Shape (n_layers, slots, n_kv_heads, capacity, head_dim). The engine keeps its running sequences in
    rows 0..B-1, so one decode step for all of them is one batched forward: every linear layer reads its
    weights once for the whole batch, and attention is one SDPA call over (B, n_kv, S) with a mask for each
    row's own length (`decode(B)`). A prompt (or a chunk of one) is fed to a single row through `row(b)`,
    which behaves exactly like a batch-1 `KVCache`. Both dimensions grow on demand (`reserve`), copying
    once, so memory follows the longest running sequence rather than the model's full context.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k = torch.empty(n_layers, 0, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.lengths: list[int] = []

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def bytes_per_position(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, slots: int, capacity: int) -> None:
        """Make room for at least `slots` rows of `capacity` positions, keeping what is stored."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        slots, capacity = max(slots, self.slots), max(capacity, self.capacity)
        shape = (self.n_layers, slots, self.n_kv_heads, capacity, self.head_dim)
        # Zeros, not empty: a decode batch reads every row up to the longest one, masked; a masked position
        # gets weight 0, and 0 * NaN (from uninitialised memory) would still be NaN.
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k.numel():
            k[:, : self.slots, :, : self.capacity] = self.k
            v[:, : self.slots, :, : self.capacity] = self.v
        self.k, self.v = k, v
        self.lengths += [0] * (slots - len(self.lengths))

    def shrink(self, slots: int, capacity: int) -> None:
        """Release memory down to `slots` x `capacity` (the rows and positions beyond must be unused)."""
        if slots >= self.slots and capacity >= self.capacity:
            return
        self.k = self.k[:, :slots, :, :capacity].clone()
        self.v = self.v[:, :slots, :, :capacity].clone()
        self.lengths = self.lengths[:slots]

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` to row `dst` (compaction when a sequence leaves)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row `dst` starts with the first `n` positions of row `src` (a shared prompt prefix)."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def load(self, row: int, cache: KVCache, n: int) -> None:
        """Row `row` starts with the first `n` positions of a batch-1 `cache` (a retained sequence's prefix)."""
        self.k[:, row, :, :n] = cache.k[:, 0, :, :n]
        self.v[:, row, :, :n] = cache.v[:, 0, :, :n]
        self.lengths[row] = n

    def save(self, row: int, cache: KVCache) -> None:
        """Copy row `row`'s stored positions into a batch-1 `cache` (kept for prefix reuse after it leaves)."""
        n = self.lengths[row]
        cache.k[:, 0, :, :n] = self.k[:, row, :, :n]
        cache.v[:, 0, :, :n] = self.v[:, row, :, :n]
        cache.length = n

    def swap(self, a: int, b: int) -> None:
        """Exchange rows `a` and `b` (a sequence whose prompt is fed joins the decoding rows)."""
        if a == b:
            return
        n = self.lengths[a]
        k, v = self.k[:, a, :, :n].clone(), self.v[:, a, :, :n].clone()
        self.move(b, a)
        self.k[:, b, :, :n], self.v[:, b, :, :n] = k, v
        self.lengths[b] = n

    def row(self, b: int) -> _RowView:
        return _RowView(self, b)

    def decode(self, rows: int) -> _DecodeView:
        return _DecodeView(self, rows)


class _RowView:
    """One row of a SlotCache, with the interface of a batch-1 KVCache."""

    def __init__(self, cache: SlotCache, row: int) -> None:
        self.cache, self.b = cache, row

    @property
    def length(self) -> int:
        return self.cache.lengths[self.b]

    @property
    def max_len(self) -> int:
        return self.cache.capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.cache.capacity:
            raise ContextLengthError(f"slot cache holds {self.cache.capacity} positions but {end} are needed")
        c, b = self.cache, self.b
        c.k[layer, b : b + 1, :, start:end] = k
        c.v[layer, b : b + 1, :, start:end] = v
        return _as(c.k[layer, b : b + 1, :, :end], k), _as(c.v[layer, b : b + 1, :, :end], v)

    def advance(self, n: int) -> None:
        self.cache.lengths[self.b] += n


class _DecodeView:
    """Rows 0..B-1 of a SlotCache, each taking one new token at its own position."""

    ragged = True

    def __init__(self, cache: SlotCache, rows: int) -> None:
        self.cache, self.rows = cache, rows
        lengths = cache.lengths[:rows]
        self.span = max(lengths) + 1
        if self.span > cache.capacity:
            raise ContextLengthError(f"slot cache holds {cache.capacity} positions but {self.span} are needed")
        self.positions = torch.tensor(lengths, dtype=torch.long, device=cache.device)  # (B,) where each new token goes
        keys = torch.arange(self.span, device=cache.device)
        self.mask = (keys[None, :] <= self.positions[:, None])[:, None, None, :]  # (B, 1, 1, S): own history only
        self._rows = torch.arange(rows, device=cache.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, nkv, 1, hd) written at each row's own position; returns (B, nkv, S, hd) views."""
        c = self.cache
        c.k[layer, self._rows, :, self.positions] = k[:, :, 0].to(c.k.dtype)  # (index_put casts nothing itself)
        c.v[layer, self._rows, :, self.positions] = v[:, :, 0].to(c.v.dtype)
        return _as(c.k[layer, : self.rows, :, : self.span], k), _as(c.v[layer, : self.rows, :, : self.span], v)

    def advance(self, n: int) -> None:
        for b in range(self.rows):
            self.cache.lengths[b] += n
