"""`lamina gan ...` and `lamina experiment ...`: the conditional GAN on scikit-learn's handwritten digits, and
the experiment that asks whether its samples help a classifier that has 10 % of the labels.

Thin verbs over `lamina.foundation.gan` and `lamina.foundation.experiments`. GAN runs live in
`LAMINA_HOME/runs/gan/<name>/`, the experiment's reports in `LAMINA_HOME/experiments/digits/`.
"""

from __future__ import annotations

from pathlib import Path

import click

from lamina.cli.common import CONTEXT_SETTINGS, StepProgress, fail_cleanly, progress_bar, use_thread_setting
from lamina.settings import get_settings

MAX_GRID = 4096  # images in one PNG grid from `lamina gan sample`
RUN_HELP = "run name under LAMINA_HOME/runs/gan, or a folder path"


def _run_dir(run: str) -> Path:
    """A run name (a folder under LAMINA_HOME/runs/gan) or, when it looks like a path, that folder."""
    if "/" in run or run.startswith((".", "~")):
        return Path(run).expanduser()
    return get_settings().home / "runs" / "gan" / run


@click.group(context_settings=CONTEXT_SETTINGS)
def gan() -> None:
    """A conditional DCGAN on scikit-learn's 8x8 handwritten digits: train it, draw digits as PNG grids."""


@gan.command("train")
@click.option("--run", default="digits", show_default=True, help=RUN_HELP)
@click.option("--steps", type=int, default=3000, show_default=True,
              help="training steps (one D and one G update each)")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Adam learning rate of both networks")
@click.option("--loss", type=click.Choice(["hinge", "nonsaturating"]), default="hinge", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="initial weights, batches and noise")
@click.option("--resume", is_flag=True, help="continue the run's latest checkpoint (to a larger --steps)")
@fail_cleanly
def gan_train(run: str, steps: int, batch_size: int, lr: float, loss: str, seed: int, resume: bool) -> None:
    """Train the GAN on the digits' training split.

    The held-out test images are never seen. The run folder gets checkpoints, losses and a grid of samples.
    """
    from lamina.arch.gan import GANConfig
    from lamina.errors import InvalidRequestError
    from lamina.foundation.checkpoint import latest_checkpoint
    from lamina.foundation.gan import GanTrainArgs, GanTrainer, load_digits_split

    args = GanTrainArgs(steps=steps, batch_size=batch_size, lr=lr, loss=loss,  # type: ignore[arg-type]
                        seed=seed, save_interval=max(1, min(500, steps)))
    folder = _run_dir(run)
    existing = latest_checkpoint(folder / "checkpoints")
    if existing is not None and not resume:
        raise InvalidRequestError(f"{folder} already holds a GAN trained for {existing.step} steps: pass "
                                  "--resume to continue it (with a larger --steps), or choose another --run",
                                  param="run")
    use_thread_setting()
    digits = load_digits_split()
    with StepProgress(steps, _describe_step) as progress:
        trainer = GanTrainer(GANConfig(), args, digits.train_images, digits.train_labels, folder,
                             on_step=progress.update)
        params = trainer.generator.num_params() + trainer.discriminator.num_params()
        click.echo(f"training the GAN ({params:,} parameters) on {len(digits.train_images)} digits "
                   f"for {steps} steps", err=True)
        result = trainer.run(resume=resume)
    click.echo(f"done in {result.seconds:.0f} s: D loss {result.d_loss:.3f}, G loss {result.g_loss:.3f}")
    click.echo(f"run folder     {folder}")
    click.echo(f"samples        {folder / 'samples.png'}  (10 of every digit)")
    click.echo(f"losses         {folder / 'metrics.jsonl'}")
    click.echo(f"next           lamina gan sample --run {run} --digit 7 --n 64")


@gan.command("sample")
@click.option("--digit", type=int, required=True, help="the digit to draw, 0..9")
@click.option("--n", type=int, default=64, show_default=True, help=f"how many images (at most {MAX_GRID})")
@click.option("--run", default="digits", show_default=True, help=RUN_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="the same seed draws the same images")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG file to write [default: <run folder>/digit-<digit>.png]")
@fail_cleanly
def gan_sample(digit: int, n: int, run: str, seed: int, out: Path | None) -> None:
    """Draw n images of one digit as a PNG grid, from a trained GAN."""
    from lamina.errors import InvalidRequestError
    from lamina.foundation.checkpoint import latest_checkpoint
    from lamina.foundation.gan import load_generator, sample, save_grid_png

    if not 1 <= n <= MAX_GRID:
        raise InvalidRequestError(f"--n must be in 1..{MAX_GRID} (got {n})", param="n")
    folder = _run_dir(run)
    if latest_checkpoint(folder / "checkpoints") is None:
        raise InvalidRequestError(f"no trained generator in {folder}: run `lamina gan train --run {run}` "
                                  "first", param="run")
    use_thread_setting()
    generator = load_generator(folder)
    images = sample(generator, digit, n, seed=seed)
    path = save_grid_png(out or folder / f"digit-{digit}.png", images,
                         title=f"{n} samples of the digit {digit}")
    click.echo(f"wrote {n} samples of the digit {digit} to {path}")


@click.group(context_settings=CONTEXT_SETTINGS)
def experiment() -> None:
    """Experiments that run end to end and write a results table (markdown, JSON and PNG)."""


@experiment.command("digits")
@click.option("--label-fraction", type=float, default=0.1, show_default=True,
              help="share of the training digits whose labels are kept")
@click.option("--seeds", type=int, default=3, show_default=True,
              help="repeats, each with another labelled subset and initialisation")
@click.option("--gan-steps", type=int, default=3000, show_default=True, help="GAN training steps, per seed")
@click.option("--classifier-steps", type=int, default=600, show_default=True,
              help="training steps of every classifier, whatever its data")
@click.option("--synthetic-per-class", type=int, default=200, show_default=True,
              help="GAN samples per digit for the augmented classifier")
@click.option("--synthetic-share", type=float, default=0.5, show_default=True,
              help="share of every augmented batch that is GAN samples")
@click.option("--rounds", type=int, default=3, show_default=True, help="self-training rounds")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="least probability for a pseudo-label to be kept")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="report folder [default: LAMINA_HOME/experiments/digits]")
@fail_cleanly
def experiment_digits(label_fraction: float, seeds: int, gan_steps: int, classifier_steps: int,
                      synthetic_per_class: int, synthetic_share: float, rounds: int, confidence: float,
                      out: Path | None) -> None:
    """Few labels (10 % by default): supervised, + GAN samples, self-training; all labels as the ceiling.

    Every classifier is scored on the same held-out real digits; the GAN is judged by the fully supervised
    classifier (its accuracy on the samples, and a Fréchet distance on its features). Writes results.md,
    results.json and results.png, and a GAN run folder per seed.
    """
    from lamina.foundation.experiments import ClassifierArgs, DigitsExperimentArgs, run_digits_experiment
    from lamina.foundation.gan import GanTrainArgs

    args = DigitsExperimentArgs(
        label_fraction=label_fraction, seeds=seeds, synthetic_per_class=synthetic_per_class,
        synthetic_share=synthetic_share, self_training_rounds=rounds, confidence=confidence,
        gan=GanTrainArgs(steps=gan_steps, save_interval=gan_steps, log_interval=max(1, min(50, gan_steps))),
        classifier=ClassifierArgs(steps=classifier_steps),
    )
    folder = out or get_settings().home / "experiments" / "digits"
    use_thread_setting()
    with _PhaseProgress() as progress:
        result = run_digits_experiment(args, folder, on_phase=progress.update)
    click.echo((folder / "results.md").read_text())
    click.echo(f"took {result.seconds:.0f} s; wrote {', '.join(str(p) for p in result.files)}")
    click.echo(f"GAN samples: {folder}/gan-seed<k>/samples.png; more with "
               f"`lamina gan sample --run {folder}/gan-seed0 --digit 7`")


def _describe_step(stats) -> str:  # type: ignore[no-untyped-def]
    return f"D {stats.d_loss:.3f} | G {stats.g_loss:.3f} | {stats.steps_per_s:.0f} steps/s"


class _PhaseProgress:
    """The experiment's phases: a progress bar on a terminal, otherwise one line each on stderr."""

    def __enter__(self) -> _PhaseProgress:
        import time

        self.began = time.perf_counter()
        self.progress = progress_bar(elapsed=True)
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def update(self, done: int, total: int, text: str) -> None:
        import time

        if not self.progress.disable:
            self.progress.update(self.task, completed=done, total=total, description=text)
        elif text != "done":
            click.echo(f"[{time.perf_counter() - self.began:5.0f} s] {text}", err=True)
