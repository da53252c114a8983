"""Pretraining: the loop that turns token shards into a model, on one process or many (torchrun).

The loop is nanoGPT's, with its lessons built in:
- AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay to `min_lr`,
  gradient accumulation, global-norm clipping;
- autocast only in a dtype measured fast on the device (`lamina.infra.device`), master weights in fp32;
- under DDP/FSDP, gradients are synchronised only on an accumulation's last micro-step;
- deterministic batches (`lamina.foundation.shards.BatchSampler`), so `--resume` continues the very run
  that was interrupted: same batches, same optimizer state, same RNG, same loss curve;
- periodic hold-out evaluation (loss and perplexity) on fixed validation windows;
- metrics in `metrics.jsonl` and a loss curve in `loss.png`, a live progress bar with loss, tokens/s and
  MFU (model FLOPs utilisation against the measured matmul peak); rank 0 alone logs and writes.
The finished model is exported to LAMINA_HOME/models/<name>/, where `lamina generate/serve` find it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch import build_model
from lamina.foundation.checkpoint import export_model, latest_checkpoint, save_checkpoint, with_tied
from lamina.foundation.shards import BatchSampler, Shards
from lamina.foundation.tokenizer import Tokenizer
from lamina.foundation.train_config import RunConfig
from lamina.infra.distributed import Distributed
from lamina.infra.fs import atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    mfu: float
    val_loss: float | None


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    mfu: float
    model_dir: Path | None
    run_dir: Path


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (lr - min_lr)


def flops_per_token(model: nn.Module, n_layers: int, width: int, block_size: int) -> float:
    """nanoGPT's estimate: 6 per active parameter (forward + backward) plus attention's 12·L·C·T.

    Position embeddings are a lookup, not a matmul, so (as nanoGPT does) they are not counted.
    """
    active = model.num_active_params() if hasattr(model, "num_active_params") else model.num_params()
    positions = model.wpe.weight.numel() if hasattr(model, "wpe") else 0
    return 6 * (active - positions) + 12 * n_layers * width * block_size


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        shards: Shards,
        tokenizer: Tokenizer,
        run_dir: Path,
        *,
        dist: Distributed | None = None,
        models_dir: Path | None = None,
        cache_dir: Path | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.config, self.shards, self.tokenizer = config, shards, tokenizer
        self.run_dir, self.models_dir, self.cache_dir = run_dir, models_dir, cache_dir
        self.dist = dist or Distributed()
        self.on_step = on_step
        self.checkpoints = run_dir / "checkpoints"
        self.metrics_path = run_dir / "metrics.jsonl"

    # --- set-up -----------------------------------------------------------------------------------------

    def _build(self) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        t, dev = self.config.train, self.dist.device
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model_config = self.config.model_config(self.shards.vocab_size)
        raw = build_model(self.model_config, device=dev, dtype=torch.float32)
        model = self.dist.wrap(raw)
        if t.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        # The fused kernel updates all parameters in one pass (measured ~3% faster per step on CPU than the
        # foreach one); FSDP's sharded DTensor parameters take the foreach path.
        fused = not (self.dist.enabled and self.dist.strategy == "fsdp")
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), fused=fused,
        )
        return raw, model, optimizer

    def _autocast(self) -> Any:
        from lamina.infra.device import resolve_dtype

        dtype = resolve_dtype(self.config.train.dtype, self.dist.device, self.cache_dir)
        self.compute_dtype = dtype
        if dtype == torch.float32:
            return nullcontext
        return lambda: torch.autocast(self.dist.device.type, dtype=dtype)

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        from lamina.infra.device import matmul_peak_gflops

        t, d = self.config.train, self.dist
        if d.device.type == "cpu":
            # Adam's second moments and late-training gradients drift into subnormal floats, which x86 CPUs
            # multiply up to 100x slower; flushing them to zero doubled training speed here (bench/train.py).
            torch.set_flush_denormal(True)
        raw, model, optimizer = self._build()
        autocast = self._autocast()
        train = BatchSampler(self.shards.train, t.block_size, t.seed)
        val = BatchSampler(self.shards.val, t.block_size, t.seed)
        start, best_val, tokens_seen = 0, float("inf"), 0
        if resume:
            ckpt = latest_checkpoint(self.checkpoints)
            if ckpt is not None:
                d.load_model_state(model, with_tied(raw, ckpt.weights()))
                d.load_optimizer_state(model, optimizer, ckpt.optimizer())
                _set_rng(ckpt.state.get("rng", {}), d.rank)
                start, best_val = ckpt.step, ckpt.state.get("best_val", float("inf"))
                tokens_seen = ckpt.state.get("tokens_seen", 0)
                logger.info("resuming %s from step %d", self.run_dir.name, start)
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.metrics_path, start)
        width = getattr(self.model_config, "dim", None) or self.model_config.n_embd
        layers = getattr(self.model_config, "n_layers", None) or self.model_config.n_layer
        fpt = flops_per_token(raw, layers, width, t.block_size)
        peak = matmul_peak_gflops(d.device, self.compute_dtype, self.cache_dir) * 1e9 * d.world_size
        tokens_per_step = t.micro_batch_size * t.grad_accum * d.world_size * t.block_size
        val_loss = float("nan")
        window_start, window_tokens = time.perf_counter(), 0
        loss_value = float("nan")
        model.train()
        for step in range(start, t.max_steps):
            lr = lr_at(step, t.max_steps, t.lr, t.min_lr, t.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(t.grad_accum):
                x, y = train.batch(step, micro, d.rank, t.micro_batch_size, t.grad_accum, d.world_size, d.device)
                with d.no_sync(model, skip=micro < t.grad_accum - 1), autocast():
                    loss = self._loss(model, raw, x, y)
                (loss / t.grad_accum).backward()
                total += loss.item()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = d.mean(total / t.grad_accum)
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            done = step + 1
            evaluate = done % t.eval_interval == 0 or done == t.max_steps
            if evaluate:
                val_loss = self.evaluate(model, raw, val, autocast)
                best_val = min(best_val, val_loss)
            if done % t.log_interval == 0 or evaluate:
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / elapsed if elapsed > 0 else 0.0
                mfu = fpt * tps / peak
                window_start, window_tokens = time.perf_counter(), 0
                stats = StepStats(done, t.max_steps, loss_value, lr, tps, mfu, val_loss if evaluate else None)
                if d.is_main:
                    self._log(stats, tokens_seen)
                if self.on_step is not None and d.is_main:
                    self.on_step(stats)
            if done % t.save_interval == 0 or done == t.max_steps:
                self._save(model, optimizer, done, best_val, tokens_seen)
        model_dir = self._export(model, best_val, loss_value, tokens_seen) if self.models_dir is not None else None
        if d.is_main:
            self._plot()
        last = _last_metrics(self.metrics_path) if d.is_main else {}
        return TrainResult(t.max_steps, loss_value, val_loss if not math.isnan(val_loss) else best_val,
                           last.get("tokens_per_s", 0.0), last.get("mfu", 0.0), model_dir, self.run_dir)

    def _loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        if hasattr(raw, "aux_loss"):
            loss = loss + raw.aux_loss()
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, raw: nn.Module, val: BatchSampler, autocast: Any) -> float:
        """Mean loss over the same `eval_iters` validation batches every time (hold-out loss)."""
        t = self.config.train
        model.eval()
        losses = []
        for i in range(t.eval_iters):
            x, y = val.fixed(i, t.micro_batch_size, self.dist.device)
            with autocast():
                logits = model(x)
            losses.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).item())
        model.train()
        return self.dist.mean(float(np.mean(losses)))

    # --- records ----------------------------------------------------------------------------------------

    def _log(self, s: StepStats, tokens_seen: int) -> None:
        record = {"step": s.step, "loss": round(s.loss, 6), "lr": s.lr, "tokens": tokens_seen,
                  "tokens_per_s": round(s.tokens_per_s, 1), "mfu": round(s.mfu, 4), "time": time.time()}
        if s.val_loss is not None:
            record |= {"val_loss": round(s.val_loss, 6), "val_ppl": round(math.exp(min(s.val_loss, 50)), 3)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if s.val_loss is not None:
            self._plot()

    def _save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, best_val: float, tokens_seen: int) -> None:
        weights = self.dist.full_state_dict(model)  # collectives: every rank takes part
        optim = self.dist.optimizer_state(model, optimizer)
        if self.dist.is_main:
            state = {"best_val": best_val, "tokens_seen": tokens_seen, "rng": _rng_state(), "config": self.config.to_yaml()}
            save_checkpoint(self.checkpoints, step, weights, optim, state)
        self.dist.barrier()

    def _export(self, model: nn.Module, best_val: float, train_loss: float, tokens_seen: int) -> Path | None:
        weights = self.dist.full_state_dict(model)
        if not self.dist.is_main or self.models_dir is None:
            return None
        summary = {"name": self.config.name, "steps": self.config.train.max_steps, "train_loss": train_loss,
                   "best_val_loss": best_val, "tokens_seen": tokens_seen, "shards": self.shards.meta,
                   "config": self.config.to_yaml()}
        return export_model(self.models_dir / self.config.name, self.model_config, weights, self.tokenizer, summary)

    def _plot(self) -> None:
        """loss.png: training loss per logged step, validation loss at each evaluation."""
        records = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()] if self.metrics_path.exists() else []
        plot_losses(self.run_dir / "loss.png", records, self.config.name, {"val_loss": "val loss"},
                    ylabel="cross-entropy (nats/token)")

def plot_losses(path: Path, records: list[dict[str, Any]], title: str, evals: dict[str, str],
                ylabel: str = "loss") -> None:
    """A loss curve PNG (written atomically): `loss` per record, and each key of `evals` where present."""
    if not records:
        return
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    for key, label in evals.items():
        points = [r for r in records if key in r]
        ax.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist()}


def _set_rng(state: dict[str, Any], rank: int) -> None:
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics.jsonl records past the checkpoint, so the curve continues the interrupted run.

    Pretraining and fine-tuning (`lamina.llm.tuning.base`) both resume through this."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode() if kept else b"")


def _last_metrics(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}
