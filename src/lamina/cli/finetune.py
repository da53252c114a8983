"""`lamina finetune sft|dpo|classify` and `lamina lora merge`: supervised fine-tuning, preference tuning and
classification heads on a pretrained model, fully or with LoRA, and LoRA adapters merged into their base.

Thin verbs over `lamina.llm.tuning`. The training flags use the vocabulary of `TuneArgs` (`--max-steps`,
`--micro-batch-size`, `--eval-interval`, as `lamina pretrain`'s YAML says); the older `--steps`,
`--batch-size` and `--eval-every` stay accepted as aliases.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lamina.cli.common import StepProgress, fail_cleanly, use_thread_setting
from lamina.settings import get_settings


@click.group()
def finetune() -> None:
    """Fine-tune a pretrained model (SFT, DPO, classification), fully or with LoRA."""


# --- what the fine-tuning verbs share -----------------------------------------------------------------------


def steps_option(default: int, help: str | None = None) -> Callable[..., Any]:
    return click.option("--max-steps", "--steps", "max_steps", type=int, default=default, show_default=True, help=help)


def batch_option(default: int, help: str | None = None) -> Callable[..., Any]:
    return click.option("--micro-batch-size", "--batch-size", "micro_batch_size", type=int, default=default,
                        show_default=True, help=help)


def eval_option(default: int, help: str | None = None) -> Callable[..., Any]:
    return click.option("--eval-interval", "--eval-every", "eval_interval", type=int, default=default,
                        show_default=True, help=help)


def tune_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of `finetune sft`: the model, the data, the run and the LoRA adapter."""
    options = [
        click.option("--model", "-m", default=None, help="model id, .gguf file or HF folder [LAMINA_MODEL]"),
        click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL file of examples"),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="run folder [LAMINA_HOME/runs/<method>/<model>-<data>]"),
        click.option("--lora/--full", default=True, show_default=True, help="train a LoRA adapter, or every weight"),
        click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank"),
        click.option("--alpha", type=float, default=None, help="LoRA alpha [2 x rank]"),
        steps_option(100, "optimizer steps"),
        click.option("--lr", type=float, default=None, help="peak learning rate [2e-4 LoRA, 2e-5 full]"),
        batch_option(8),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--eval-split", type=float, default=0.1, show_default=True, help="fraction held out for eval"),
        eval_option(25),
        click.option("--max-length", type=int, default=1024, show_default=True, help="tokens per example (longer: cut)"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--dtype", default="auto", show_default=True, help="compute dtype (autocast); weights stay float32"),
        click.option("--resume", is_flag=True, help="continue the interrupted run in --out"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def tune_run_dir(kind: str, out: str | None, model: str, data: str) -> Path:
    """--out, or LAMINA_HOME/runs/<kind>/<model>-<data>."""
    if out:
        return Path(out).expanduser()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(model).name}-{Path(data).stem}").strip("-")
    return get_settings().home / "runs" / kind / name


def tune_args(max_steps: int, lr: float, micro_batch_size: int, grad_accum: int, eval_interval: int, seed: int,
              dtype: str) -> Any:
    """The TuneArgs of the flags: warmup over the first 5 % of steps, a checkpoint at every evaluation."""
    from lamina.llm.tuning.base import TuneArgs

    return TuneArgs(max_steps=max_steps, lr=lr, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                    warmup_steps=max(1, max_steps // 20), eval_interval=eval_interval, save_interval=eval_interval,
                    seed=seed, dtype=dtype)


def tune_progress(total: int, show: list[tuple[str, str]]) -> StepProgress:
    """The bar over fine-tuning steps: the loss and the `show` metrics (key, label); a line per evaluation."""

    def describe(record: Any) -> str:
        parts = [f"loss {record.loss:.3f}"]
        parts += [f"{label} {record.metrics[k]:.2f}" for k, label in show if k in record.metrics]
        return " | ".join(parts)

    def evaluation(record: Any) -> str | None:
        if record.eval is None:
            return None
        figures = ", ".join(f"{label} {record.eval[k]:.3f}" for k, label in [("loss", "loss"), *show] if k in record.eval)
        return f"step {record.step}: held-out {figures}"

    return StepProgress(total, describe, evaluation, start="starting")


def lora_config(rank: int, alpha: float | None, targets: str) -> Any:
    from lamina.arch.lora import ALL_LINEAR, LoRAConfig

    names = ALL_LINEAR if targets == ALL_LINEAR else tuple(t.strip() for t in targets.split(",") if t.strip())
    alpha = alpha if alpha is not None else 2.0 * rank
    return LoRAConfig(r=rank, alpha=alpha, target_modules=names)  # type: ignore[arg-type]


# --- sft -----------------------------------------------------------------------------------------------------


@finetune.command("sft")
@tune_options
@click.option("--packing", is_flag=True, help="concatenate examples into full --max-length rows (no padding)")
@click.option("--assistant-only-loss/--no-assistant-only-loss", default=True, show_default=True,
              help="loss on assistant tokens (completions) only, or on every token")
@click.option("--dry-run", is_flag=True, help="show how examples are tokenised and masked, then stop")
@fail_cleanly
def sft(model: str | None, data: str, out: str | None, lora: bool, rank: int, alpha: float | None, max_steps: int,
        lr: float | None, micro_batch_size: int, grad_accum: int, eval_split: float, eval_interval: int,
        max_length: int, seed: int, dtype: str, resume: bool, packing: bool, assistant_only_loss: bool,
        dry_run: bool) -> None:
    """Supervised fine-tuning on a JSONL of {"messages"}, {"prompt","completion"} or {"text"} records.

    With --lora (the default) the result is a PEFT-layout adapter: serve it with
    `lamina serve --lora NAME=<out>/adapter`; with --full, a model folder: `lamina serve --model <out>/model`.
    """
    from lamina.llm import LLM
    from lamina.llm.tuning.sft import default_lora, describe, load_sft_data, run_sft

    use_thread_setting()
    llm = LLM.load(model, dtype="float32")
    dataset = load_sft_data(llm, data, eval_split=eval_split, max_length=max_length,
                            assistant_only=assistant_only_loss, seed=seed)
    click.echo(describe(llm, dataset, n=2 if dry_run else 0), err=not dry_run)
    if dry_run:
        return
    args = tune_args(max_steps, lr or (2e-4 if lora else 2e-5), micro_batch_size, grad_accum, eval_interval, seed, dtype)
    run_dir = tune_run_dir("sft", out, llm.name, data)
    with tune_progress(max_steps, []) as progress:
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


# --- dpo -----------------------------------------------------------------------------------------------------


@finetune.command("dpo")
@click.option("--model", "-m", "model_name", default=None,
              help="base model: id, .gguf or folder (default LAMINA_MODEL)")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="JSONL: prompt, chosen, rejected per line")
@click.option("--lora", is_flag=True, help="train a LoRA adapter; the reference is the base with the adapter off")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
@click.option("--targets", default="all-linear", show_default=True,
              help="LoRA layers: all-linear or names (q_proj,v_proj)")
@click.option("--adapter", type=click.Path(), default=None,
              help="start from this LoRA adapter (an SFT run's) for the same base: with --lora it is trained further, "
                   "without it is merged first; the reference is the model with it")
@click.option("--beta", type=float, default=0.1, show_default=True, help="DPO beta: how far from the reference")
@steps_option(100)
@click.option("--lr", type=float, default=None, help="peak learning rate (default 1e-4 with --lora, 5e-6 without)")
@batch_option(4, "pairs per step")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-len", type=int, default=512, show_default=True, help="prompt + reply tokens per sequence")
@click.option("--eval-split", type=float, default=0.2, show_default=True, help="held-out share of the pairs")
@eval_option(25, "evaluate and checkpoint every N steps")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="autocast dtype: auto|float32|bfloat16|float16")
@click.option("--device", default=None, help="cpu|cuda|mps|auto (default LAMINA_DEVICE)")
@click.option("--out", default=None, help="run folder (default LAMINA_HOME/runs/dpo/<model>-<data>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@fail_cleanly
def dpo(model_name: str | None, data: str, lora: bool, rank: int, alpha: float | None, targets: str,
        adapter: str | None, beta: float, max_steps: int, lr: float | None, micro_batch_size: int, grad_accum: int,
        max_len: int, eval_split: float, eval_interval: int, seed: int, dtype: str, device: str | None,
        out: str | None, resume: bool) -> None:
    """Preference-tune a model with DPO (sigmoid loss) on prompt/chosen/rejected pairs; reports held-out rewards.

    Writes LoRA adapters (PEFT layout) or a full model folder, metrics.jsonl and loss.png to the run folder.
    """
    from lamina.llm.llm import LLM
    from lamina.llm.tuning.base import TuneRun
    from lamina.llm.tuning.datasets import read_jsonl
    from lamina.llm.tuning.dpo import DPOArgs, run_dpo

    use_thread_setting()
    args = DPOArgs(beta=beta, max_len=max_len, eval_fraction=eval_split, split_seed=seed)
    tune = tune_args(max_steps, lr if lr is not None else (1e-4 if lora else 5e-6), micro_batch_size, grad_accum,
                     eval_interval, seed, dtype)
    lora_cfg = lora_config(rank, alpha, targets) if lora else None
    _, records = read_jsonl(data, formats=("preference",))
    model = model_name or get_settings().model
    run_dir = tune_run_dir("dpo", out, model, data)
    llm = LLM.load(model, device=device, dtype="float32")  # fp32 master weights; autocast per --dtype
    with tune_progress(max_steps, [("reward_accuracy", "acc"), ("reward_margin", "margin")]) as progress:
        run = TuneRun(run_dir, get_settings().home, resume=resume, on_step=progress.update, on_stage=progress.stage)
        result = run_dpo(llm, records, args, tune, run, lora=lora_cfg, adapter=Path(adapter) if adapter else None)
    ref, fin = result.reference, result.final
    click.echo(f"DPO of {llm.name} on {result.train_pairs} pairs, {result.tune.steps} steps in "
               f"{result.seconds:.0f}s; held-out {result.eval_pairs} pairs:")
    click.echo(f"  {'':<26}{'reference':>10}{'after DPO':>11}")
    rows = [("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"), ("loss", "DPO loss"),
            ("policy_prefers_chosen", "model prefers chosen")]
    for key, label in rows:
        click.echo(f"  {label:<26}{ref[key]:>10.3f}{fin[key]:>11.3f}")
    click.echo(f"saved {result.output}; run in {run_dir}")
    if lora_cfg is not None:
        click.echo(f"serve it: lamina serve --model {model} --lora dpo={result.output}  "
                   f"(or merge it: lamina lora merge --model {model} --adapter {result.output} --out DIR)")


# --- classify ------------------------------------------------------------------------------------------------


@finetune.command("classify")
@click.option("--model", "-m", "model_name", default="all-minilm-l6-v2", show_default=True,
              help="pretrained backbone, id or path: an encoder (all-minilm-l6-v2) or a decoder (smollm2-135m-instruct)")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL: text, label per line")
@click.option("--lora", is_flag=True, help="train LoRA adapters and the head, not every weight")
@click.option("--head-only", is_flag=True, help="train the head alone on frozen features (a linear probe)")
@click.option("--scratch", is_flag=True, help="re-initialise the backbone at random: the no-transfer baseline")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
@click.option("--targets", default="all-linear", show_default=True, help="LoRA layers: all-linear or names")
@click.option("--pooling", type=click.Choice(["auto", "mean", "last"]), default="auto", show_default=True,
              help="auto: mean for encoders, last token for decoders")
@steps_option(200)
@click.option("--lr", type=float, default=None, help="peak learning rate (default 5e-5 full, 5e-4 LoRA, 2e-3 head)")
@batch_option(16)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-len", type=int, default=128, show_default=True, help="tokens per text")
@click.option("--eval-split", type=float, default=0.2, show_default=True, help="held-out share of the records")
@eval_option(50)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="autocast dtype: auto|float32|bfloat16|float16")
@click.option("--device", default=None, help="cpu|cuda|mps|auto (default LAMINA_DEVICE)")
@click.option("--out", default=None, help="run folder (default LAMINA_HOME/runs/classify/<model>-<data>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@fail_cleanly
def classify(model_name: str, data: str, lora: bool, head_only: bool, scratch: bool, rank: int, alpha: float | None,
             targets: str, pooling: str, max_steps: int, lr: float | None, micro_batch_size: int, grad_accum: int,
             max_len: int, eval_split: float, eval_interval: int, seed: int, dtype: str, device: str | None,
             out: str | None, resume: bool) -> None:
    """Put a classification head on a pretrained model and train it on text/label pairs; reports hold-out accuracy.

    The classifier is saved to RUN/classifier (load it with lamina.llm.classify.TextClassifier.load).
    """
    from lamina.errors import ConfigError
    from lamina.llm.tuning.base import TuneRun
    from lamina.llm.tuning.classify import ClassifyArgs, train_classifier
    from lamina.llm.tuning.datasets import read_jsonl

    if lora and head_only:
        raise ConfigError("--lora and --head-only exclude each other: pick one (or neither, to train every weight)")
    use_thread_setting()
    settings = get_settings()
    mode = "lora" if lora else "head" if head_only else "full"
    args = ClassifyArgs(train=mode, pooling=pooling, max_len=max_len, scratch=scratch,  # type: ignore[arg-type]
                        eval_fraction=eval_split, split_seed=seed)
    tune = tune_args(max_steps, lr if lr is not None else {"full": 5e-5, "lora": 5e-4, "head": 2e-3}[mode],
                     micro_batch_size, grad_accum, eval_interval, seed, dtype)
    _, records = read_jsonl(data, formats=("classification",))
    run_dir = tune_run_dir("classify", out, model_name + ("-scratch" if scratch else ""), data)
    lora_cfg = lora_config(rank, alpha, targets) if lora else None
    with tune_progress(max_steps, [("accuracy", "acc")]) as progress:
        run = TuneRun(run_dir, settings.home, resume=resume, on_step=progress.update, on_stage=progress.stage)
        _, result = train_classifier(model_name, records, args, tune, run, lora=lora_cfg,
                                     device=device or settings.device)
    labels = len({str(r["label"]) for r in records})
    what = f"{mode}, scratch" if scratch else mode
    click.echo(f"{labels}-way classifier on {model_name} ({what}): {result.train_records} training texts, "
               f"{result.tune.steps} steps in {result.seconds:.0f}s")
    click.echo(f"  held-out accuracy on {result.eval_records} texts: {result.final['accuracy']:.3f} "
               f"(untrained head {result.before['accuracy']:.3f}, majority class {result.majority:.3f}, "
               f"chance {1 / labels:.3f})")
    if not math.isnan(result.final.get("loss", math.nan)):
        click.echo(f"  held-out loss {result.final['loss']:.3f} (untrained {result.before['loss']:.3f})")
    click.echo(f"saved {result.output}; run in {run_dir}")


# --- lora: LoRA adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors) --------------


@click.group("lora")
def lora_group() -> None:
    """LoRA adapters, in PEFT's folder layout (PEFT and Lamina load each other's)."""


@lora_group.command("merge")
@click.option("--model", "-m", "model_name", default=None, help="base model: id, .gguf file or HF folder [LAMINA_MODEL]")
@click.option("--adapter", required=True, type=click.Path(), help="adapter folder (adapter_config.json + adapter_model.safetensors)")
@click.option("--out", required=True, type=click.Path(), help="folder to write the merged model to")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the merged weights (the merge itself is done in float32)")
@click.option("--force", is_flag=True, help="merge although the adapter names another base id (shapes are still checked)")
@click.option("--overwrite", is_flag=True, help="replace a model folder already at --out")
@fail_cleanly
def lora_merge(model_name: str | None, adapter: str, out: str, dtype: str, force: bool, overwrite: bool) -> None:
    """Merge a LoRA adapter into its base model, as a folder that `lamina generate --model OUT` loads.

    An HF-folder base gives an HF folder (transformers loads it too); a GGUF base gives a Lamina folder
    with the tokenizer, chat template and EOS ids of the GGUF.
    """
    from lamina.infra.device import DTYPES
    from lamina.infra.registry import Registry
    from lamina.llm.formats.peft import merge_adapter

    settings = get_settings()
    use_thread_setting()
    entry = Registry(settings.home).resolve(model_name or settings.model)
    result = merge_adapter(entry, Path(adapter), Path(out), dtype=DTYPES[dtype], allow_other_base=force, overwrite=overwrite)
    click.echo(f"merged {adapter} into {entry.id} ({len(result.layers)} layers changed): {result.layout} folder {result.folder}")
    click.echo(f'try: lamina generate --model {result.folder} "Hello"', err=True)
