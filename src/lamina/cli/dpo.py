"""`lamina finetune dpo` and `lamina finetune classify`: thin verbs over lamina.llm.tuning.dpo and lamina.llm.classify.

Importing this module registers both commands on the `finetune` group (lamina.cli does it at start-up).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from lamina.cli.common import _fail_cleanly
from lamina.cli.finetune import _Progress, _run_dir, _tune_args, finetune
from lamina.settings import get_settings


def _lora_config(rank: int, alpha: float | None, targets: str) -> Any:
    from lamina.arch.lora import ALL_LINEAR, LoRAConfig

    names = ALL_LINEAR if targets == ALL_LINEAR else tuple(t.strip() for t in targets.split(",") if t.strip())
    alpha = alpha if alpha is not None else 2.0 * rank
    return LoRAConfig(r=rank, alpha=alpha, target_modules=names)  # type: ignore[arg-type]


def _setup_threads() -> None:
    from lamina.infra.device import set_threads

    set_threads(get_settings().threads)


# --- dpo -------------------------------------------------------------------------------------------------


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
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=None, help="peak learning rate (default 1e-4 with --lora, 5e-6 without)")
@click.option("--batch-size", type=int, default=4, show_default=True, help="pairs per step")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-len", type=int, default=512, show_default=True, help="prompt + reply tokens per sequence")
@click.option("--eval-split", type=float, default=0.2, show_default=True, help="held-out share of the pairs")
@click.option("--eval-every", type=int, default=25, show_default=True, help="evaluate and checkpoint every N steps")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="autocast dtype: auto|float32|bfloat16|float16")
@click.option("--device", default=None, help="cpu|cuda|mps|auto (default LAMINA_DEVICE)")
@click.option("--out", default=None, help="run folder (default LAMINA_HOME/runs/dpo/<model>-<data>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@_fail_cleanly
def dpo(model_name: str | None, data: str, lora: bool, rank: int, alpha: float | None, targets: str,
        adapter: str | None, beta: float, steps: int, lr: float | None, batch_size: int, grad_accum: int,
        max_len: int, eval_split: float, eval_every: int, seed: int, dtype: str, device: str | None, out: str | None,
        resume: bool) -> None:
    """Preference-tune a model with DPO (sigmoid loss) on prompt/chosen/rejected pairs; reports held-out rewards.

    Writes LoRA adapters (PEFT layout) or a full model folder, metrics.jsonl and loss.png to the run folder.
    """
    from lamina.llm.llm import LLM
    from lamina.llm.tuning.datasets import read_jsonl
    from lamina.llm.tuning.dpo import DPOArgs, run_dpo

    _setup_threads()
    args = DPOArgs(beta=beta, max_len=max_len, eval_fraction=eval_split, split_seed=seed)
    tune = _tune_args(steps, lr if lr is not None else (1e-4 if lora else 5e-6), batch_size, grad_accum, eval_every,
                      seed, dtype)
    lora_cfg = _lora_config(rank, alpha, targets) if lora else None
    _, records = read_jsonl(data, formats=("preference",))
    model = model_name or get_settings().model
    run_dir = _run_dir("dpo", out, model, data)
    llm = LLM.load(model, device=device, dtype="float32")  # fp32 master weights; autocast per --dtype
    show = [("reward_accuracy", "acc"), ("reward_margin", "margin")]
    with _Progress(steps, show) as progress:
        result = run_dpo(llm, records, args, tune, run_dir, lora=lora_cfg, adapter=Path(adapter) if adapter else None,
                         resume=resume, on_step=progress.update, on_stage=progress.stage)
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


# --- classify --------------------------------------------------------------------------------------------


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
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--lr", type=float, default=None, help="peak learning rate (default 5e-5 full, 5e-4 LoRA, 2e-3 head)")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-len", type=int, default=128, show_default=True, help="tokens per text")
@click.option("--eval-split", type=float, default=0.2, show_default=True, help="held-out share of the records")
@click.option("--eval-every", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="autocast dtype: auto|float32|bfloat16|float16")
@click.option("--device", default=None, help="cpu|cuda|mps|auto (default LAMINA_DEVICE)")
@click.option("--out", default=None, help="run folder (default LAMINA_HOME/runs/classify/<model>-<data>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@_fail_cleanly
def classify(model_name: str, data: str, lora: bool, head_only: bool, scratch: bool, rank: int, alpha: float | None,
             targets: str, pooling: str, steps: int, lr: float | None, batch_size: int, grad_accum: int, max_len: int,
             eval_split: float, eval_every: int, seed: int, dtype: str, device: str | None, out: str | None,
             resume: bool) -> None:
    """Put a classification head on a pretrained model and train it on text/label pairs; reports hold-out accuracy.

    The classifier is saved to RUN/classifier (load it with lamina.llm.classify.TextClassifier.load).
    """
    from lamina.errors import ConfigError
    from lamina.llm.tuning.classify import ClassifyArgs, train_classifier
    from lamina.llm.tuning.datasets import read_jsonl

    if lora and head_only:
        raise ConfigError("--lora and --head-only exclude each other: pick one (or neither, to train every weight)")
    _setup_threads()
    mode = "lora" if lora else "head" if head_only else "full"
    args = ClassifyArgs(train=mode, pooling=pooling, max_len=max_len, scratch=scratch,  # type: ignore[arg-type]
                        eval_fraction=eval_split, split_seed=seed)
    tune = _tune_args(steps, lr if lr is not None else {"full": 5e-5, "lora": 5e-4, "head": 2e-3}[mode], batch_size,
                      grad_accum, eval_every, seed, dtype)
    _, records = read_jsonl(data, formats=("classification",))
    run_dir = _run_dir("classify", out, model_name + ("-scratch" if scratch else ""), data)
    lora_cfg = _lora_config(rank, alpha, targets) if lora else None
    with _Progress(steps, [("accuracy", "acc")]) as progress:
        _, result = train_classifier(model_name, records, args, tune, run_dir, lora=lora_cfg, resume=resume,
                                     device=device or get_settings().device, on_step=progress.update,
                                     on_stage=progress.stage)
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
