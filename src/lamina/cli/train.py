"""`lamina tokenizer train`, `lamina pretrain` and `lamina evaluate`: a tokenizer and a model from scratch
on a data-lake dataset, and how well a model predicts held-out text."""

from __future__ import annotations

import math
import os
import sys

import click

from lamina.cli.common import StepProgress, fail_cleanly, load_llm, use_thread_setting
from lamina.settings import get_settings


@click.group()
def tokenizer() -> None:
    """Train tokenizers."""


@tokenizer.command("train")
@click.option("--dataset", required=True, help="data-lake dataset to learn from (`lamina data list`)")
@click.option("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at least 257)")
@click.option("--out", type=click.Path(), default=None, help="folder for tokenizer.json [LAMINA_HOME/tokenizers/NAME-bpeN]")
@fail_cleanly
def tokenizer_train(dataset: str, vocab_size: int, out: str | None) -> None:
    """Byte-level BPE, saved as tokenizer.json (loadable by transformers and Lamina)."""
    from pathlib import Path

    from lamina.foundation.data import iter_texts
    from lamina.foundation.tokenizer_train import save_tokenizer, train_bpe
    from lamina.infra.datalake import DataLake

    home = get_settings().home
    lake = DataLake(home / "datalake")
    version = lake.get(dataset)
    tok = train_bpe((text for _, text in iter_texts(lake, dataset, version.version)), vocab_size)
    folder = Path(out) if out else home / "tokenizers" / f"{dataset}-v{version.version}-bpe{vocab_size}"
    save_tokenizer(tok, folder)
    sample = "def greet(name):\n    return f'Hello, {name}!'"
    n = len(tok.encode(sample, add_special_tokens=False))
    click.echo(f"{folder}: {tok.vocab_size} tokens; {len(sample) / n:.2f} characters per token on a code sample")


@click.command()
@click.option("--config", "config_path", default="pydoc", show_default=True, help="run YAML, or a preset name")
@click.option("--resume", is_flag=True, help="continue from the run's last checkpoint")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="under torchrun: DDP, or FSDP full sharding")
@click.option("--max-steps", type=int, default=None, help="override train.max_steps")
@click.option("--name", default=None, help="override the run/model name")
@fail_cleanly
def pretrain(config_path: str, resume: bool, strategy: str, max_steps: int | None, name: str | None) -> None:
    """Train a model from scratch (no options: a small GPT-2 on Python's docs, ~10 min on 2 cores).

    Distributed: torchrun --nproc_per_node N -m lamina pretrain --config FILE [--strategy fsdp]
    """
    import dataclasses
    import logging

    from lamina.foundation.pretrain import pretrain as run_pretrain
    from lamina.foundation.train_config import RunConfig
    from lamina.infra.distributed import Distributed

    settings = get_settings()
    if "WORLD_SIZE" not in os.environ:
        use_thread_setting()
    config = RunConfig.from_yaml(config_path)
    if max_steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=max_steps))
    if name is not None:
        config = dataclasses.replace(config, name=name)
    dist = Distributed.from_env(strategy)  # type: ignore[arg-type]
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    try:
        # on stdout and kept once done (a training log), drawn by rank 0 alone
        with StepProgress(config.train.max_steps, _describe_step, _evaluation_line, show=dist.is_main,
                          stderr=False, transient=False, terminal_only=False) as progress:
            result = run_pretrain(config, settings.home, dist=dist, resume=resume, on_step=progress.update)
    finally:
        dist.close()
    if dist.is_main:
        click.echo(f"{config.name}: {result.steps} steps, train loss {result.train_loss:.3f}, val loss {result.val_loss:.3f} "
                   f"(perplexity {math.exp(min(result.val_loss, 50)):.1f}); run in {result.run_dir}")
        if result.model_dir is not None:
            click.echo(f"registered as {config.name!r}: lamina generate --model {config.name} --raw \"The\"")
    if dist.enabled:
        # Every file is written and the group is destroyed; what is left is the interpreter's own teardown, where
        # torch 2.13's gloo sometimes aborts ("terminate called without an active exception": 1 run in 6 of a
        # 2-rank FSDP run on a loaded 2-core machine), and torchrun then reports the whole run failed. Leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


def _describe_step(stats) -> str:  # type: ignore[no-untyped-def]
    return f"loss {stats.loss:.3f} | {stats.tokens_per_s:,.0f} tok/s | MFU {stats.mfu:.0%}"


def _evaluation_line(stats) -> str | None:  # type: ignore[no-untyped-def]
    if stats.val_loss is None:
        return None
    return (f"step {stats.step}: train {stats.loss:.3f}, val {stats.val_loss:.3f} "
            f"(ppl {math.exp(min(stats.val_loss, 50)):.1f}), {stats.tokens_per_s:,.0f} tok/s, MFU {stats.mfu:.0%}")


@click.command()
@click.option("--model", "-m", "model_name", default=None, help="model to score (id or path); not needed with --cv")
@click.option("--dataset", required=True, help="data-lake dataset")
@click.option("--cv", type=int, default=None, help="k-fold cross-validation: k trainings with --config")
@click.option("--config", "config_path", default="pydoc", show_default=True, help="run YAML for --cv trainings")
@fail_cleanly
def evaluate(model_name: str | None, dataset: str, cv: int | None, config_path: str) -> None:
    """Hold-out loss and perplexity of a model, or k-fold cross-validation (mean ± std of val loss)."""
    import dataclasses

    from lamina.errors import InvalidRequestError
    from lamina.foundation.evaluate import cross_validate, evaluation_documents, holdout_loss
    from lamina.foundation.train_config import RunConfig
    from lamina.infra.checkpoint import read_json
    from lamina.infra.datalake import DataLake

    home = get_settings().home
    if cv is not None:
        config = RunConfig.from_yaml(config_path)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset=dataset))
        result = cross_validate(config, home, cv)
        folds = ", ".join(f"{x:.3f}" for x in result.losses)
        click.echo(f"{cv}-fold cross-validation of {config.name} on {dataset} (seed {config.data.seed}): "
                   f"val loss {result.mean:.3f} ± {result.std:.3f} (folds: {folds})")
        return
    if model_name is None:
        raise InvalidRequestError("give --model NAME to score a model, or --cv K to cross-validate", param="model")
    llm = load_llm(model_name, "cpu", "float32")
    trained_on = None
    if llm.entry is not None and (llm.entry.path / "training.json").exists():
        trained_on = read_json(llm.entry.path / "training.json").get("shards")
    docs = evaluation_documents(DataLake(home / "datalake"), dataset, trained_on)
    result = holdout_loss(llm.model, llm.tokenizer, docs, llm.config.max_seq_len)
    click.echo(f"{llm.name} on {dataset}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
               f"({result.tokens:,} tokens, {result.documents} documents)")
