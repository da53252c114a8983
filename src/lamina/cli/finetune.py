"""`lamina finetune ...`: supervised fine-tuning, preference tuning and classification heads on a pretrained model."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lamina.cli.common import _fail_cleanly
from lamina.settings import get_settings


@click.group()
def finetune() -> None:
    """Fine-tune a pretrained model (SFT, DPO, classification), fully or with LoRA."""


def _tune_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every fine-tuning method shares: the model, the data, the run and the LoRA adapter."""
    options = [
        click.option("--model", "-m", default=None, help="model id, .gguf file or HF folder [LAMINA_MODEL]"),
        click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL file of examples"),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="run folder [LAMINA_HOME/runs/<method>/<model>-<data>]"),
        click.option("--lora/--full", default=True, show_default=True, help="train a LoRA adapter, or every weight"),
        click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank"),
        click.option("--alpha", type=float, default=None, help="LoRA alpha [2 x rank]"),
        click.option("--steps", type=int, default=100, show_default=True, help="optimizer steps"),
        click.option("--lr", type=float, default=None, help="peak learning rate [2e-4 LoRA, 2e-5 full]"),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--eval-split", type=float, default=0.1, show_default=True, help="fraction held out for eval"),
        click.option("--eval-every", type=int, default=25, show_default=True),
        click.option("--max-length", type=int, default=1024, show_default=True, help="tokens per example (longer: cut)"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--dtype", default="auto", show_default=True, help="compute dtype (autocast); weights stay float32"),
        click.option("--resume", is_flag=True, help="continue the interrupted run in --out"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_dir(kind: str, out: str | None, model: str, data: str) -> Path:
    if out:
        return Path(out).expanduser()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(model).name}-{Path(data).stem}").strip("-")
    return get_settings().home / "runs" / kind / name


def _tune_args(steps: int, lr: float, batch_size: int, grad_accum: int, eval_every: int, seed: int,
               dtype: str) -> Any:
    from lamina.llm.tuning.base import TuneArgs

    return TuneArgs(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, warmup=max(1, steps // 20),
                    eval_every=eval_every, save_every=eval_every, seed=seed, dtype=dtype)


class _Progress:
    """A rich progress bar over the fine-tuning steps; a plain line per evaluation."""

    def __init__(self, total: int, show: list[tuple[str, str]]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.show = show
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.task = self.progress.add_task("starting", total=total)
        self.console = console

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def stage(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def update(self, record: Any) -> None:
        parts = [f"loss {record.loss:.3f}"]
        parts += [f"{label} {record.metrics[k]:.2f}" for k, label in self.show if k in record.metrics]
        self.progress.update(self.task, completed=record.step, description=" | ".join(parts))
        if record.eval is not None:
            shown = [("loss", "loss"), *self.show]
            figures = ", ".join(f"{label} {record.eval[k]:.3f}" for k, label in shown if k in record.eval)
            self.console.print(f"step {record.step}: held-out {figures}", highlight=False)


@finetune.command("sft")
@_tune_options
@click.option("--packing", is_flag=True, help="concatenate examples into full --max-length rows (no padding)")
@click.option("--assistant-only-loss/--no-assistant-only-loss", default=True, show_default=True,
              help="loss on assistant tokens (completions) only, or on every token")
@click.option("--dry-run", is_flag=True, help="show how examples are tokenised and masked, then stop")
@_fail_cleanly
def sft(model: str | None, data: str, out: str | None, lora: bool, rank: int, alpha: float | None, steps: int,
        lr: float | None, batch_size: int, grad_accum: int, eval_split: float, eval_every: int, max_length: int,
        seed: int, dtype: str, resume: bool, packing: bool, assistant_only_loss: bool, dry_run: bool) -> None:
    """Supervised fine-tuning on a JSONL of {"messages"}, {"prompt","completion"} or {"text"} records.

    With --lora (the default) the result is a PEFT-layout adapter: serve it with
    `lamina serve --lora NAME=<out>/adapter`; with --full, a model folder: `lamina serve --model <out>/model`.
    """
    from lamina.infra.device import set_threads
    from lamina.llm import LLM
    from lamina.llm.tuning.sft import default_lora, describe, load_sft_data, run_sft
    settings = get_settings()
    set_threads(settings.threads)
    llm = LLM.load(model, dtype="float32")
    dataset = load_sft_data(llm, data, eval_split=eval_split, max_length=max_length,
                            assistant_only=assistant_only_loss, seed=seed)
    click.echo(describe(llm, dataset, n=2 if dry_run else 0), err=not dry_run)
    if dry_run:
        return
    args = _tune_args(steps, lr or (2e-4 if lora else 2e-5), batch_size, grad_accum, eval_every, seed, dtype)
    run_dir = _run_dir("sft", out, llm.name, data)
    with _Progress(steps, []) as progress:
        result = run_sft(llm, dataset, run_dir, args=args, lora=default_lora(rank, alpha) if lora else None,
                         packing=packing, max_length=max_length, resume=resume, on_step=progress.update)
    shown = f"train loss {result.train_loss:.4f}"
    if result.eval_loss is not None:
        shown += f", eval loss {result.eval_loss:.4f}"
    click.echo(f"{shown}; run folder {result.run_dir} (metrics.jsonl, loss.png)")
    if lora:
        click.echo(f"adapter: {result.output}\nserve it: lamina serve --lora {run_dir.name}={result.output}")
    else:
        click.echo(f"model: {result.output}\nserve it: lamina serve --model {result.output}")
