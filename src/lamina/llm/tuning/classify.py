"""Text classification by transfer learning: a linear head on a pretrained model, trained with labels.

    run = TuneRun(run_dir, home)  # home: LAMINA_HOME, where models resolve
    clf, result = train_classifier("all-minilm-l6-v2", records, ClassifyArgs(), TuneArgs(max_steps=200), run)
    clf = TextClassifier.load(run_dir / "classifier", home=home)
    clf.predict(["Return the square root of x."])[0].label  # 'math'

The backbone is any model Lamina loads: an encoder (BERT family, e.g. all-minilm-l6-v2) pooled by the mean
of its token states, as sentence embedders do, or a decoder (Llama / GPT-2 family, e.g. SmolLM2) pooled at
the last real token, the one position that has seen the whole text (transformers'
`LlamaForSequenceClassification` does the same). A decoder's `lm_head` is replaced by the identity, so the
forward returns final hidden states and skips the vocabulary projection. On top sits one `nn.Linear`
(hidden width -> number of labels), trained with cross-entropy in the shared fine-tuning loop
(`lamina.llm.tuning.base`).

What is trained: every weight (`full`), LoRA adapters plus the head (`lora`), or the head alone on frozen
features (`head`, a linear probe). `scratch=True` re-initialises the backbone at random first: the same
architecture and training without the pretrained weights, the baseline that shows what transfer is worth.

A trained classifier is a folder: `classifier.json` (base model, labels, pooling, what was trained, the
base's shape) and `classifier.safetensors` (the head and the adapters, or every weight for `full` and
`scratch`). Loading it onto a base of another shape is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.lora import LoRAConfig, apply_lora
from lamina.errors import ConfigError, InvalidRequestError, ModelFormatError
from lamina.foundation.tokenizer import Tokenizer
from lamina.infra.checkpoint import read_json
from lamina.infra.fs import atomic_write_text
from lamina.infra.registry import Registry
from lamina.llm.formats.peft import SHAPE_KEYS, AdapterMismatchError
from lamina.llm.tuning.base import TuneArgs, TuneLoop, TuneResult, TuneRun, held_out_split, score_then_train
from lamina.llm.tuning.datasets import DatasetError, batch_indices

logger = logging.getLogger(__name__)

SPEC_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"
_BERT_SHAPE = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")

Kind = Literal["encoder", "decoder"]
TrainMode = Literal["full", "lora", "head"]


@dataclass
class ClassifyArgs:
    train: TrainMode = "full"
    pooling: Literal["auto", "mean", "last"] = "auto"  # auto: mean for encoders, last token for decoders
    max_len: int = 128  # tokens per text; longer texts keep their start
    scratch: bool = False  # random backbone weights: the no-transfer baseline
    eval_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.train not in ("full", "lora", "head"):
            raise ConfigError(f"train must be full, lora or head, got {self.train!r}", param="train")
        if self.pooling not in ("auto", "mean", "last"):
            raise ConfigError(f"pooling must be auto, mean or last, got {self.pooling!r}", param="pooling")
        if self.max_len < 4:
            raise ConfigError(f"max_len must be at least 4 tokens, got {self.max_len}", param="max_len")


@dataclass
class ClassifierSpec:
    """What `classifier.json` holds: enough to rebuild the classifier on its base."""

    base_model: str  # registry id, or the folder path the base was loaded from
    kind: Kind
    labels: list[str]
    pooling: Literal["mean", "last"]
    max_len: int
    train: TrainMode
    scratch: bool = False
    lora: dict[str, Any] | None = None
    shape: dict[str, Any] = field(default_factory=dict)  # family and sizes of the base


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # the softmax probability of `label`
    scores: dict[str, float]


@dataclass
class ClassifyResult:
    before: dict[str, float]  # held-out figures with the untrained head
    final: dict[str, float]  # held-out figures after training
    majority: float  # held-out accuracy of always answering the most frequent training label
    tune: TuneResult
    output: Path
    train_records: int
    eval_records: int
    seconds: float


# --- the model -------------------------------------------------------------------------------------------


class ClassifierModel(nn.Module):
    """backbone (B, T) -> hidden (B, T, C) -> pooled (B, C) -> head -> logits (B, n_labels)."""

    def __init__(self, backbone: nn.Module, kind: Kind, width: int, n_labels: int,
                 pooling: Literal["mean", "last"]) -> None:
        super().__init__()
        self.backbone, self.kind, self.pooling = backbone, kind, pooling
        self.head = nn.Linear(width, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A decoder needs no attention mask: padding sits on the right, after every real token.
        hidden = self.backbone(ids, mask) if self.kind == "encoder" else self.backbone(ids)  # (B, T, C)
        if self.pooling == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            last = mask.sum(1).long() - 1  # (B,) the last real token of each row
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled)  # (B, n_labels)


@dataclass
class _Backbone:
    model: nn.Module
    tokenizer: Tokenizer
    kind: Kind
    name: str
    max_len: int
    lowercase: bool = False


def _load_backbone(model_id: str, device: str, home: Path) -> _Backbone:
    """The pretrained network without its LM head, in float32 (training keeps fp32 master weights)."""
    entry = Registry(home).resolve(model_id)
    name = entry.id if entry.source != "path" else str(entry.path)
    if entry.task == "embed":
        from lamina.foundation.embeddings import Embedder

        embedder = Embedder.load(model_id, device=device, dtype="float32", home=home)
        return _Backbone(embedder.model, embedder.tokenizer, "encoder", name, embedder.max_tokens, embedder.lowercase)
    from lamina.llm.llm import LLM

    llm = LLM.load(model_id, device=device, dtype="float32", home=home)
    net = llm.model
    net.lm_head = nn.Identity()  # hidden states out; the input embedding keeps the (tied) weight
    return _Backbone(net, llm.tokenizer, "decoder", name, net.config.max_seq_len)


def _shape(config: Any) -> dict[str, Any]:
    keys = SHAPE_KEYS.get(config.family, _BERT_SHAPE)
    return {"family": config.family, **{k: getattr(config, k) for k in keys}}


def _width(config: Any) -> int:
    return int(config.dim)


# --- the classifier --------------------------------------------------------------------------------------


class TextClassifier:
    """A `ClassifierModel` with its tokenizer and labels: texts in, labels out."""

    def __init__(self, spec: ClassifierSpec, net: ClassifierModel, tokenizer: Tokenizer,
                 lowercase: bool = False) -> None:
        self.spec, self.net, self.tokenizer, self.lowercase = spec, net, tokenizer, lowercase
        self.pad_id = getattr(net.backbone.config, "pad_token_id", 0) if spec.kind == "encoder" else 0

    @classmethod
    def create(cls, model_id: str, labels: Sequence[str], args: ClassifyArgs, lora: LoRAConfig | None = None, *,
               home: Path, seed: int = 0, device: str = "cpu") -> TextClassifier:
        """A new classifier on pretrained `model_id` (random backbone if args.scratch), head untrained.

        `home` is LAMINA_HOME, where `model_id` is resolved.
        """
        if args.train == "lora" and lora is None:
            lora = LoRAConfig(target_modules="all-linear")
        backbone = _load_backbone(model_id, device, home)
        config = backbone.model.config
        torch.manual_seed(seed)
        if args.scratch:
            backbone.model.init_weights()
        pooling = args.pooling if args.pooling != "auto" else ("mean" if backbone.kind == "encoder" else "last")
        net = ClassifierModel(backbone.model, backbone.kind, _width(config), len(labels), pooling)
        net.head.to(next(backbone.model.parameters()).device)
        spec = ClassifierSpec(backbone.name, backbone.kind, list(labels), pooling,
                              min(args.max_len, backbone.max_len), args.train, args.scratch,
                              lora.to_dict() if args.train == "lora" and lora else None, _shape(config))
        if spec.lora is not None:
            apply_lora(net.backbone, LoRAConfig.from_dict(spec.lora))  # freezes the backbone, adapters trainable
        else:
            net.backbone.requires_grad_(args.train == "full")
        net.head.requires_grad_(True)
        return cls(spec, net, backbone.tokenizer, backbone.lowercase)

    @property
    def device(self) -> torch.device:
        return self.net.head.weight.device

    # --- texts to tensors -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, cut to max_len (an encoder's [CLS] ... [SEP] kept)."""
        if self.spec.kind == "decoder":
            return self.tokenizer.encode(text)[: self.spec.max_len]
        backend = self.tokenizer.backend
        encoding = backend.encode(text.lower() if self.lowercase else text, add_special_tokens=False)
        room = self.spec.max_len - backend.num_special_tokens_to_add(False)
        if len(encoding.ids) > room:
            encoding.truncate(room)
        return backend.post_process(encoding).ids

    def collate(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (B, T), padded on the right."""
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    # --- use --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        if isinstance(texts, str):
            raise InvalidRequestError("texts must be a list of strings, not one string; pass [text]", param="input")
        was_training = self.net.training
        self.net.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.collate([self.encode(t) for t in texts[start : start + batch_size]])
            probs = self.net(ids, mask).float().softmax(-1).cpu()
            for row in probs:
                best = int(row.argmax())
                out.append(Prediction(self.spec.labels[best], float(row[best]),
                                      {label: float(p) for label, p in zip(self.spec.labels, row, strict=True)}))
        self.net.train(was_training)
        return out

    # --- on disk ----------------------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        """classifier.json and classifier.safetensors: the head and adapters, or every weight for full/scratch."""
        from safetensors.torch import save_file

        state = self.net.state_dict()
        if self.spec.train != "full" and not self.spec.scratch:
            state = {k: v for k, v in state.items() if k.startswith("head.") or ".lora_" in k}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS_FILE}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        atomic_write_text(folder / SPEC_FILE, json.dumps(asdict(self.spec), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, home: Path, base_model: str | None = None,
             device: str = "cpu") -> TextClassifier:
        """A saved classifier, on its recorded base (or `base_model`: the same base under another name or path).

        `home` is LAMINA_HOME, where the base is resolved.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / SPEC_FILE).exists():
            raise InvalidRequestError(f"{folder} is not a classifier folder: it has no {SPEC_FILE}",
                                      param="classifier")
        try:
            spec = ClassifierSpec(**read_json(folder / SPEC_FILE))
        except TypeError as e:
            raise ModelFormatError(f"{folder / SPEC_FILE}: {e}") from None
        backbone = _load_backbone(base_model or spec.base_model, device, home)
        shape = _shape(backbone.model.config)
        if shape != spec.shape:
            differ = sorted(k for k in spec.shape if spec.shape.get(k) != shape.get(k))
            raise AdapterMismatchError(
                f"classifier {str(folder)!r} was trained on base {spec.base_model!r} ({_describe(spec.shape)}), but "
                f"{backbone.name!r} is {_describe(shape)}: {', '.join(differ)} differ; load it on the base it was "
                "trained on", param="model")
        width = _width(backbone.model.config)
        net = ClassifierModel(backbone.model, spec.kind, width, len(spec.labels), spec.pooling)
        if spec.lora is not None:
            apply_lora(net.backbone, LoRAConfig.from_dict(spec.lora))
        net.head.to(next(backbone.model.parameters()).device)
        tensors = load_file(str(folder / WEIGHTS_FILE))
        _, unexpected = net.load_state_dict(tensors, strict=False)
        everything = spec.train == "full" or spec.scratch
        saved = [k for k in net.state_dict() if everything or k.startswith("head.") or ".lora_" in k]
        missing = [k for k in saved if k not in tensors]
        if unexpected or missing:
            raise ModelFormatError(f"{folder / WEIGHTS_FILE} does not fit its spec: "
                                   f"{(unexpected or missing)[0]!r} is {'unexpected' if unexpected else 'missing'}")
        net.eval().requires_grad_(False)
        return cls(spec, net, backbone.tokenizer, backbone.lowercase)


def _describe(shape: dict[str, Any]) -> str:
    return f"{shape.get('family')}: " + ", ".join(f"{k} {v}" for k, v in shape.items() if k != "family")


# --- training --------------------------------------------------------------------------------------------


def labels_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """The label names, sorted; at least two are needed."""
    labels = sorted({str(r["label"]) for r in records})
    if len(labels) < 2:
        raise DatasetError(f"classification needs at least two labels; the data has only {labels}", param="data")
    return labels


def train_classifier(
    model_id: str,
    records: list[dict[str, Any]],
    args: ClassifyArgs,
    tune: TuneArgs,
    run: TuneRun,
    *,
    lora: LoRAConfig | None = None,
    device: str = "cpu",
) -> tuple[TextClassifier, ClassifyResult]:
    """Train a classifier on `records` ({"text", "label"}), report hold-out accuracy, save it to run_dir/classifier."""
    t0 = time.perf_counter()
    run_dir = run.run_dir
    labels = labels_of(records)
    train_records, held_records = held_out_split(records, args.eval_fraction, args.split_seed, "a classifier")
    run.stage(f"loading {model_id}")
    clf = TextClassifier.create(model_id, labels, args, lora, seed=tune.seed, device=device, home=run.home)
    index = {label: i for i, label in enumerate(labels)}
    run.stage(f"tokenizing {len(records)} texts")

    def encode(part: list[dict[str, Any]]) -> tuple[list[list[int]], torch.Tensor]:
        return [clf.encode(r["text"]) for r in part], torch.tensor([index[str(r["label"])] for r in part])

    train_ids, train_y = encode(train_records)
    held_ids, held_y = encode(held_records)
    common = Counter(train_y.tolist()).most_common(1)[0][0]
    majority = float((held_y == common).float().mean())

    def batch(step: int, micro: int) -> list[int]:
        return batch_indices(len(train_ids), step, micro, tune.micro_batch_size, tune.grad_accum, tune.seed)

    def loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = clf.net(*clf.collate([train_ids[i] for i in rows])).float()
        y = train_y[rows].to(clf.device)
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean().item()}

    def evaluate() -> dict[str, float]:
        total, correct = 0.0, 0
        size = tune.micro_batch_size
        for start in range(0, len(held_ids), size):
            logits = clf.net(*clf.collate(held_ids[start : start + size])).float()
            y = held_y[start : start + size].to(clf.device)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
        return {"loss": total / len(held_ids), "accuracy": correct / len(held_ids)}

    loop = TuneLoop(clf.net, tune, run_dir, batch=batch, loss=loss, evaluate=evaluate,
                    title=f"{len(labels)}-way classifier on {model_id} ({args.train})", on_step=run.on_step,
                    cache_dir=run.cache_dir)
    before, result = score_then_train(loop, evaluate, run, "held-out accuracy of the untrained head")
    clf.net.requires_grad_(False).eval()
    output = clf.save(run_dir / "classifier")
    summary = {"model": model_id, "labels": labels, "args": asdict(args), "tune": asdict(tune),
               "train_records": len(train_ids), "eval_records": len(held_ids), "chance": 1 / len(labels),
               "majority": majority, "before": before, "final": result.eval, "output": str(output)}
    atomic_write_text(run_dir / "classify.json", json.dumps(summary, indent=2))
    if math.isnan(result.train_loss):
        logger.warning("the training loss is NaN: lower --lr")
    return clf, ClassifyResult(before, result.eval, majority, result, output, len(train_ids), len(held_ids),
                               time.perf_counter() - t0)
