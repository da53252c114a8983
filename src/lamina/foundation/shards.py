"""Token shards: a dataset's documents as one flat array of token ids per split, memory-mapped (nanoGPT's
train.bin / val.bin), plus the sampler that cuts training batches out of them.

Splits are by *document*, so no document's tokens straddle train and validation: a document goes to
validation when a hash of (seed, doc_id) falls below `val_fraction` — stable whatever the document order,
and the same hash assigns documents to k folds for cross-validation. Each document ends with the
end-of-text token. Ids are stored as uint16 when the vocabulary fits, else uint32.

Batches are a pure function of (seed, step, micro-step, rank): the global batch of one optimizer step is
drawn from a generator seeded with (seed, step) and cut into per-micro-step, per-rank slices. So a resumed
run sees exactly the batches the uninterrupted one would have, and 1 process with accumulation sees the
same global batch as N processes without.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamina.errors import InvalidRequestError
from lamina.foundation.tokenizer import Tokenizer
from lamina.infra.fs import atomic_write_text


@dataclass(frozen=True)
class Shards:
    folder: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def split_of(doc_id: str, seed: int, val_fraction: float = 0.0, n_folds: int = 0, fold: int = -1) -> str:
    """'train' or 'val' for one document (hold-out by val_fraction, or fold `fold` of `n_folds`)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if n_folds:
        return "val" if int(u * n_folds) == fold else "train"
    return "val" if u < val_fraction else "train"


def build_shards(
    docs: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    folder: Path,
    *,
    seed: int,
    val_fraction: float = 0.1,
    n_folds: int = 0,
    fold: int = -1,
    source: dict | None = None,
) -> Shards:
    """Tokenize (doc_id, text) pairs into folder/train.bin and folder/val.bin (written atomically)."""
    if not (0.0 < val_fraction < 1.0 or n_folds):
        raise InvalidRequestError(f"val_fraction must be between 0 and 1 (got {val_fraction})", param="val_fraction")
    eot = tokenizer.eos_id
    if eot is None:
        raise InvalidRequestError("the tokenizer has no end-of-text token to separate documents", param="tokenizer")
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"train": [0, 0], "val": [0, 0]}  # documents, tokens
    with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val:
        out = {"train": train, "val": val}
        batch: list[tuple[str, str]] = []
        for item in [*docs, None]:
            if item is not None:
                batch.append(item)
            if batch and (item is None or len(batch) == 256):
                encoded = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
                for (doc_id, _), ids in zip(batch, encoded, strict=True):
                    split = split_of(doc_id, seed, val_fraction, n_folds, fold)
                    np.asarray([*ids, eot], dtype=dtype).tofile(out[split])
                    counts[split][0] += 1
                    counts[split][1] += len(ids) + 1
                batch = []
    for split, (n_docs, n_tokens) in counts.items():
        if n_docs == 0 or n_tokens < 2:
            raise InvalidRequestError(
                f"the {split} split is empty ({n_docs} documents); the dataset needs more documents "
                f"(or a different val_fraction than {val_fraction})", param="dataset")
    meta = {"vocab_size": vocab, "dtype": np.dtype(dtype).name, "eot_id": eot, "seed": seed, "val_fraction": val_fraction,
            "n_folds": n_folds, "fold": fold, "train_documents": counts["train"][0], "train_tokens": counts["train"][1],
            "val_documents": counts["val"][0], "val_tokens": counts["val"][1], "source": source or {}}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return load_shards(folder)


def load_shards(folder: Path) -> Shards:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"no token shards in {folder} ({e})", param="shards") from None
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return Shards(folder, train, val, meta)


class BatchSampler:
    """Random windows of `block_size + 1` tokens: x is the window minus its last token, y minus its first."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int) -> None:
        if len(tokens) <= block_size + 1:
            raise InvalidRequestError(
                f"the split holds {len(tokens)} tokens, fewer than one block of {block_size + 1}; "
                "use a smaller block_size or more data", param="block_size")
        self.tokens, self.block_size, self.seed = tokens, block_size, seed

    def batch(self, step: int, micro: int, rank: int, micro_batch: int, grad_accum: int, world: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of micro-step `micro` of optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.block_size - 1, size=micro_batch * grad_accum * world)
        first = (micro * world + rank) * micro_batch
        return self._windows(starts[first : first + micro_batch], device)

    def fixed(self, index: int, micro_batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th of a fixed sequence of batches (evaluation: the same windows every time)."""
        rng = np.random.default_rng([self.seed, 2**31 - 1, index])
        return self._windows(rng.integers(0, len(self.tokens) - self.block_size - 1, size=micro_batch), device)

    def _windows(self, starts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.stack([np.asarray(self.tokens[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
        data = torch.from_numpy(windows)
        return data[:, :-1].to(device), data[:, 1:].to(device)
