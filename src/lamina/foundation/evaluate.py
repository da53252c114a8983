"""Evaluation: hold-out loss and perplexity of a model on a dataset, and k-fold cross-validation.

Hold-out: every token of the validation documents is scored once, in consecutive windows of the model's
context (no sampling), so the figure is exact and repeatable. When the dataset is the one the model was
trained on, the validation documents are the ones its run held out (the same seeded split); for any other
dataset, every document counts.

Cross-validation: documents are split into k folds by the same seeded hash; each fold is held out once
while a fresh model trains on the others with the run's config; the result is the mean ± standard
deviation of the k validation losses.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import InvalidRequestError
from lamina.foundation.shards import split_of
from lamina.foundation.tokenizer import Tokenizer
from lamina.foundation.train_config import RunConfig
from lamina.infra.datalake import DataLake


@dataclass(frozen=True)
class HoldOut:
    loss: float
    perplexity: float
    tokens: int
    documents: int


@torch.no_grad()
def holdout_loss(model: nn.Module, tokenizer: Tokenizer, docs: list[str], context: int, batch_size: int = 8) -> HoldOut:
    """Mean next-token cross-entropy over all tokens of `docs` (each ended by end-of-text)."""
    eot = tokenizer.eos_id
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += encoded + ([eot] if eot is not None else [])
    if len(ids) < 2:
        raise InvalidRequestError("the evaluation documents hold fewer than two tokens", param="dataset")
    tokens = torch.tensor(ids, dtype=torch.long)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    windows = [(s, min(s + context, len(ids) - 1)) for s in range(0, len(ids) - 1, context)]
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - s for s, e in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (s, e) in enumerate(group):
            x[row, : e - s] = tokens[s:e]
            y[row, : e - s] = tokens[s + 1 : e + 1]
        logits = model(x.to(device)).float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.to(device).view(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((y != -100).sum())
    mean = total / count
    return HoldOut(mean, math.exp(min(mean, 50.0)), count, len(docs))


def evaluation_documents(lake: DataLake, dataset: str, trained_on: dict | None) -> list[str]:
    """The documents to score: the held-out ones if the model trained on this dataset, else all."""
    from lamina.foundation.data import iter_texts

    version = lake.get(dataset)
    docs = list(iter_texts(lake, dataset, version.version))
    if trained_on and trained_on.get("source", {}).get("dataset") == dataset and not trained_on.get("n_folds"):
        seed, fraction = trained_on["seed"], trained_on["val_fraction"]
        held = [text for doc_id, text in docs if split_of(doc_id, seed, fraction) == "val"]
        if held:
            return held
    return [text for _, text in docs]


@dataclass(frozen=True)
class CrossValidation:
    losses: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def std(self) -> float:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else 0.0


def cross_validate(config: RunConfig, home: Path, k: int) -> CrossValidation:
    """k trainings, each holding out one fold of documents; their validation losses."""
    from lamina.foundation.pretrain import pretrain

    if k < 2:
        raise InvalidRequestError(f"--cv needs at least 2 folds (got {k})", param="cv")
    losses = []
    for fold in range(k):
        result = pretrain(config, home, register=False, run_dir=home / "runs" / f"{config.name}-cv{fold}of{k}", n_folds=k, fold=fold)
        losses.append(result.val_loss)
    return CrossValidation(losses)

