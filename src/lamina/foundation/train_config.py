"""A training run's configuration: one YAML file, four sections, every key checked.

    name: pydoc-gpt2            # the model's id once registered (`lamina generate --model pydoc-gpt2`)
    data: {dataset: pydoc, val_fraction: 0.1, seed: 1337}
    tokenizer: {vocab_size: 4096}            # trained on the dataset (or `path:` to a tokenizer.json folder)
    model: {family: gpt2, n_layers: 4, ...}   # a family config from lamina.arch (vocab/context filled in)
    train: {max_steps: 1500, micro_batch_size: 16, lr: 1.0e-3, ...}

Presets live in `lamina/presets/*.yaml`; `lamina pretrain` with no config uses `pydoc.yaml`. A typo in a key
is an error naming the key and the keys that exist, never a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from lamina.arch import ModelConfig, config_from_dict
from lamina.arch.config import config_from_dict as dataclass_from_dict
from lamina.arch.config import dump_yaml, load_yaml
from lamina.errors import ConfigError

PRESETS = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class DataArgs:
    dataset: str = "pydoc"
    """A data-lake dataset (`lamina data list`); `pydoc` is built from Python's docs when missing."""
    version: int | None = None
    """None: the latest version."""
    val_fraction: float = 0.1
    """Share of documents held out for validation."""
    seed: int = 1337
    """Names the document split (and the folds of --cv)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5) (got {self.val_fraction})")


@dataclass
class TokenizerArgs:
    vocab_size: int = 4096
    path: str | None = None
    """A folder with tokenizer.json to use instead of training one."""

    def __post_init__(self) -> None:
        from lamina.foundation.tokenizer_train import BYTE_ALPHABET, SPECIAL_TOKENS

        floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
        if self.path is None and self.vocab_size < floor:
            raise ConfigError(f"tokenizer.vocab_size {self.vocab_size} is smaller than the byte alphabet plus special "
                              f"tokens ({floor}); use {floor} or more (a few thousand suits a small corpus)")


@dataclass
class OptimArgs:
    """What every training loop shares: steps and batches, AdamW with linear warmup then cosine decay, evaluation,
    checkpoints and logging. Pretraining (`TrainArgs`) and fine-tuning (`lamina.llm.tuning.base.TuneArgs`) build
    on it with their own defaults, so one name means one thing in both."""

    _section: ClassVar[str] = ""  # prefix for error messages: "train." where the fields sit in a run YAML

    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 12
    """Examples per micro-step (per process)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (per process): global batch = micro_batch_size * grad_accum * processes."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr: float | None = None
    """Where the cosine decay ends; None: a tenth of lr."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, on matrices only."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    eval_interval: int = 250
    save_interval: int = 250
    log_interval: int = 10
    seed: int = 1337
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast dtype for forward passes; `auto` uses a half type only where it was measured fast."""

    def __post_init__(self) -> None:
        where = self._section
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_interval", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}{name} must be >= 1 (got {getattr(self, name)})", param=name)
        if not self.lr > 0:
            raise ConfigError(f"{where}lr must be > 0 (got {self.lr})", param="lr")
        if self.min_lr is not None and not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"{where}min_lr must be in (0, lr={self.lr}] (got {self.min_lr})", param="min_lr")

    @property
    def final_lr(self) -> float:
        """The learning rate the cosine decay ends at: min_lr, or a tenth of lr when min_lr is None."""
        return self.lr * 0.1 if self.min_lr is None else self.min_lr


@dataclass
class TrainArgs(OptimArgs):
    """Pretraining: `OptimArgs` with pretraining's defaults, and what only pretraining has (windows, eval batches,
    torch.compile)."""

    _section: ClassVar[str] = "train."

    min_lr: float = 1e-4
    block_size: int = 256
    """Context length of training windows."""
    eval_iters: int = 20
    """Validation batches per evaluation (the same ones every time)."""
    compile: bool = False
    """torch.compile the model (pays off on long runs; the first steps are slower)."""

    def __post_init__(self) -> None:
        if self.min_lr is None:  # the loop decays to min_lr itself; a YAML `null` would only fail later
            raise ConfigError("train.min_lr must be a number in (0, lr], e.g. a tenth of lr (got null)", param="min_lr")
        super().__post_init__()
        for name in ("block_size", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})", param=name)
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ConfigError(f"train.warmup_steps must be in [0, max_steps) (got {self.warmup_steps})",
                              param="warmup_steps")


@dataclass
class RunConfig:
    name: str = "pydoc-gpt2"
    data: DataArgs = field(default_factory=DataArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    model: dict[str, Any] = field(default_factory=lambda: {"family": "gpt2"})
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name must be a plain identifier for the model (got {self.name!r})")
        self.model_config(self.tokenizer.vocab_size)  # a bad model section fails now, not after data preparation

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.exists() and (PRESETS / f"{path.name}.yaml").exists():
            path = PRESETS / f"{path.name}.yaml"
        if not path.exists():
            presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise ConfigError(f"no config file {str(path)!r}; give a YAML path or a preset name ({presets})")
        return cls.from_dict(load_yaml(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return dataclass_from_dict(cls, data)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The family config with the tokenizer's vocabulary and the training context filled in."""
        model = dict(self.model)
        family = model.get("family", "gpt2")
        # one size vocabulary for every family; a GPT-2 config written with GPT-2's own names keeps working
        context_key = "n_positions" if family == "gpt2" and "n_positions" in model else "max_seq_len"
        model.setdefault(context_key, self.train.block_size)
        model["vocab_size"] = vocab_size
        try:
            config = config_from_dict(model)
        except ConfigError as e:
            raise ConfigError(f"model: {e.message}") from None
        context = config.max_seq_len
        if context < self.train.block_size:
            raise ConfigError(f"model.{context_key} ({context}) is shorter than train.block_size ({self.train.block_size})")
        return config

    def to_yaml(self) -> str:
        from dataclasses import asdict

        return dump_yaml(asdict(self))
