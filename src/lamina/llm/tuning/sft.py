"""Supervised fine-tuning (SFT) of a pretrained model on chat or text examples, fully or with LoRA.

TRL's `SFTTrainer` conventions, on Lamina's own model code:
- data in TRL's formats (`lamina.llm.tuning.datasets`): `messages`, `prompt`/`completion`, `text`;
- conversations rendered with the model's own chat template, and the loss on assistant tokens only
  (`ChatTemplate.encode_with_mask`; the end-of-turn token is trained too, so the model learns to stop);
  prompt/completion pairs train on the completion only; plain text on every token plus end-of-sequence;
- optional packing (examples concatenated into full `max_length` rows, no padding), else batches padded
  to their longest example; a seeded hold-out eval split scored by loss on its trained tokens;
- the loop, checkpoints and resume, metrics and loss plot of `lamina.llm.tuning.base`;
- the result: a PEFT-layout adapter (`<out>/adapter`, servable with `lamina serve --lora`) or, for a full
  fine-tune, a model folder (`<out>/model`, servable with `--model`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lamina.arch.lora import ALL_LINEAR, LoRAConfig, apply_lora, mark_only_lora_trainable
from lamina.errors import ConfigError
from lamina.llm.llm import LLM
from lamina.llm.tuning.base import StepRecord, TuneArgs, TuneLoop
from lamina.llm.tuning.datasets import DatasetError, read_jsonl, split

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    trained: list[bool]


@dataclass
class SFTData:
    format: str
    train: list[Example]
    eval: list[Example]
    truncated: int = 0
    dropped: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(sum(e.trained) for e in self.train)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.train)


@dataclass
class SFTResult:
    run_dir: Path
    output: Path
    train_loss: float
    eval_loss: float | None
    steps: int
    data: SFTData
    history: list[dict[str, Any]] = field(default_factory=list)


# --- data -------------------------------------------------------------------------------------------------


def encode_record(llm: LLM, fmt: str, record: dict[str, Any], assistant_only: bool = True) -> Example:
    """One record as token ids and the mask of tokens the loss is taken on."""
    eos = _eos(llm)
    if fmt == "text":
        ids = [*llm.tokenizer.encode(record["text"], add_special_tokens=False), eos]
        return Example(ids, [True] * len(ids))
    if fmt == "messages":
        template = llm.template
        if not assistant_only:
            ids = template.encode(record["messages"], add_generation_prompt=False)
            return Example(ids, [True] * len(ids))
        ids, mask = template.encode_with_mask(record["messages"])
        return Example(ids, mask)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        p = llm.tokenizer.encode(prompt, add_special_tokens=False)
        c = [*llm.tokenizer.encode(completion, add_special_tokens=False), eos]
        return Example(p + c, [not assistant_only] * len(p) + [True] * len(c))
    if isinstance(prompt, list) and isinstance(completion, list):
        template = llm.template
        p = template.encode(prompt, add_generation_prompt=True)
        ids = template.encode(prompt + completion, add_generation_prompt=False)
        if ids[: len(p)] != p:
            raise DatasetError("the chat template renders the prompt differently once the completion follows it, so "
                               "the completion tokens cannot be found; use the messages format", param="data")
        return Example(ids, [not assistant_only] * len(p) + [True] * (len(ids) - len(p)))
    raise DatasetError("prompt and completion must both be strings or both be lists of messages", param="data")


def load_sft_data(llm: LLM, path: str | Path, *, eval_split: float = 0.0, max_length: int = 1024,
                  assistant_only: bool = True, seed: int = 0) -> SFTData:
    fmt, records = read_jsonl(path)
    train_records, eval_records = split(records, eval_split, seed)
    data = SFTData(fmt, [], [])
    for target, part in ((data.train, train_records), (data.eval, eval_records)):
        for record in part:
            example = encode_record(llm, fmt, record, assistant_only)
            if len(example.ids) > max_length:
                data.truncated += 1
                example = Example(example.ids[:max_length], example.trained[:max_length])
            if sum(example.trained[1:]) == 0:  # the first token is never a target
                data.dropped += 1
                continue
            target.append(example)
    if not data.train:
        raise DatasetError(f"no training example of {path} has tokens to learn within --max-length {max_length}",
                           param="data")
    return data


def pack(examples: list[Example], length: int, seed: int = 0) -> list[Example]:
    """Concatenate shuffled examples into rows of exactly `length` tokens (the last, shorter row is kept).

    As TRL's "wrapped" packing: attention crosses example boundaries, which costs little for short
    examples and removes all padding."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    trained: list[bool] = []
    for i in order:
        ids += examples[i].ids
        trained += examples[i].trained
    return [Example(ids[s : s + length], trained[s : s + length]) for s in range(0, len(ids), length)
            if sum(trained[s + 1 : s + length])]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): right-padded, targets shifted by one with IGNORE where no loss is taken."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        x[row, :n] = torch.tensor(e.ids[:-1])
        y[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(e.ids[1:], e.trained[1:], strict=True)])
    return x.to(device), y.to(device)


def token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target tokens, and how many there were. The head runs at those positions
    only (prompts, system text and padding need no logits: here 70 % of a chat batch's positions)."""
    trained = y != IGNORE
    logits = model(x, logits_at=trained)  # (n, vocab)
    return F.cross_entropy(logits.float(), y[trained]), int(trained.sum())


class Batches:
    """Batch `step, micro` of an epoch-wise seeded shuffle: the same batches on every run and every resume."""

    def __init__(self, examples: list[Example], batch_size: int, grad_accum: int, seed: int) -> None:
        self.examples, self.batch_size, self.grad_accum, self.seed = examples, batch_size, grad_accum, seed
        self._orders: dict[int, list[int]] = {}

    def __call__(self, step: int, micro: int) -> list[Example]:
        start = (step * self.grad_accum + micro) * self.batch_size
        return [self.examples[self._index(start + i)] for i in range(self.batch_size)]

    def _index(self, n: int) -> int:
        epoch, at = divmod(n, len(self.examples))
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch][at]


# --- training ---------------------------------------------------------------------------------------------


def default_lora(r: int = 16, alpha: float | None = None, dropout: float = 0.05) -> LoRAConfig:
    return LoRAConfig(r=r, alpha=alpha or 2.0 * r, dropout=dropout, target_modules=ALL_LINEAR)


def run_sft(
    llm: LLM,
    data: SFTData,
    out: Path,
    *,
    args: TuneArgs,
    lora: LoRAConfig | None = None,
    packing: bool = False,
    max_length: int = 1024,
    resume: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
) -> SFTResult:
    """Fine-tune `llm` (loaded in float32: the master weights) on `data`; write the adapter or the model."""
    model = llm.model
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError("load the model in float32 for training (autocast still computes in the fast dtype)",
                          param="dtype")
    torch.manual_seed(args.seed)  # the adapter's initial weights, and dropout, are part of the run
    if lora is not None:
        apply_lora(model, lora)
        mark_only_lora_trainable(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    train = pack(data.train, max_length, args.seed) if packing else data.train
    device = next(model.parameters()).device
    pad = _eos(llm)
    batches = Batches(train, args.micro_batch_size, args.grad_accum, args.seed)

    def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(batches(step, micro), pad, device)

    def loss(b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        value, n = token_loss(model, *b)
        return value, {"trained_tokens": float(n)}

    def evaluate() -> dict[str, float]:
        total, count = 0.0, 0
        for i in range(0, len(data.eval), args.micro_batch_size):
            value, n = token_loss(model, *collate(data.eval[i : i + args.micro_batch_size], pad, device))
            total += value.item() * n
            count += n
        return {"loss": total / max(count, 1)}

    title = f"SFT{f' (LoRA r={lora.r})' if lora else ''} of {llm.name}"
    loop = TuneLoop(model, args, out, batch=batch, loss=loss, evaluate=evaluate if data.eval else None, title=title,
                    on_step=on_step)
    result = loop.run(resume=resume)
    model.eval()
    output = _save(llm, out, lora is not None)
    eval_loss = result.eval.get("loss") if result.eval else None
    return SFTResult(out, output, result.train_loss, eval_loss, result.steps, data, result.history)


def _save(llm: LLM, out: Path, is_lora: bool) -> Path:
    from lamina.llm.formats.peft import save_adapter, save_model_folder

    if is_lora:
        return save_adapter(llm.model, out / "adapter", base_model_id=llm.name)
    source = llm.chat_template.source if llm.chat_template else None
    return save_model_folder(out / "model", llm.model, llm.tokenizer, source, sorted(llm.engine.eos_ids))


def _eos(llm: LLM) -> int:
    ids = sorted(llm.engine.eos_ids)
    if not ids:
        raise ConfigError(f"model {llm.name!r} names no end-of-sequence token, which fine-tuning appends to examples")
    return ids[0]


# --- showing what is trained ------------------------------------------------------------------------------


def describe(llm: LLM, data: SFTData, n: int = 2, width: int = 100) -> str:
    """The dry-run report: counts, and the first `n` examples with trained tokens in [[...]] and masked ones plain."""
    lines = [
        f"format: {data.format}; {len(data.train)} training and {len(data.eval)} eval examples; "
        f"{data.tokens} tokens, {data.trained_tokens} trained on ({data.trained_tokens / max(data.tokens, 1):.0%})",
    ]
    if data.truncated or data.dropped:
        lines.append(f"{data.truncated} examples truncated to --max-length, {data.dropped} dropped (nothing left to learn)")
    for k, e in enumerate(data.train[:n]):
        text, state = [], False
        for tid, trained in zip(e.ids, e.trained, strict=True):
            if trained != state:
                text.append("[[" if trained else "]]")
                state = trained
            text.append(llm.tokenizer.decode([tid]))
        if state:
            text.append("]]")
        lines.append(f"--- example {k + 1}: {len(e.ids)} tokens, {sum(e.trained)} trained ([[...]]), the rest masked")
        lines.append("".join(text))
    return "\n".join(lines)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))
