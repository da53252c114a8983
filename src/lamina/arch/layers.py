"""Building blocks the model families share."""

from __future__ import annotations

import torch
from torch import nn


def embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """An `nn.Embedding` whose weight is left uninitialised: the model's `init_weights` fills it (or a checkpoint
    replaces it). nn.Embedding's own init is `normal_`, which on the meta device (where checkpoints are loaded)
    costs torch about 2 s of one-time setup in a process (`lamina serve` paid it on every start).
    """
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=torch.empty(num, dim))
