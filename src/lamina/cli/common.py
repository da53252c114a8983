"""What the `lamina` commands share: help settings, the one-line error report, the model and sampling
options, loading a model, the progress bar, and human-readable sizes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from lamina.errors import LaminaError
from lamina.settings import get_settings

if TYPE_CHECKING:
    from rich.progress import Progress

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# Library errors name the parameter; on the command line, name the flag that sets it.
FLAGS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "model", "device", "dtype"}


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A `LaminaError` (bad input) becomes `error: <message>` on stderr and exit status 2; anything else is a bug
    and keeps its traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LaminaError as e:
            flag = f" (--{e.param.replace('_', '-')})" if e.param in FLAGS else ""
            click.echo(f"error: {e.message}{flag}", err=True)
            sys.exit(2)

    return wrapper


def use_thread_setting() -> int:
    """Set torch's threads from LAMINA_THREADS (every command that computes does this first)."""
    from lamina.infra.device import set_threads

    return set_threads(get_settings().threads)


# --- models and sampling -----------------------------------------------------------------------------------


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--dtype", default=None, help="auto|float32|bfloat16|float16 (auto: fastest measured here) [LAMINA_DTYPE]")(fn)
    fn = click.option("--device", default=None, help="auto|cpu|cuda|cuda:N|mps [LAMINA_DEVICE]")(fn)
    fn = click.option("--model", "-m", default=None, help="model id (see `lamina models`), .gguf file or HF folder [LAMINA_MODEL]")(fn)
    return fn


def sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--max-tokens", type=int, default=256, show_default=True, help="most tokens to generate"),
        click.option("--temperature", "-t", type=float, default=0.7, show_default=True, help="0 = greedy"),
        click.option("--top-p", type=float, default=0.9, show_default=True, help="nucleus sampling; 1 = off"),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off"),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="0 = off"),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off"),
        click.option("--seed", type=int, default=None, help="makes sampling reproducible"),
        click.option("--stop", multiple=True, help="stop at this string (repeatable)"),
        click.option("--system", default=None, help="system prompt"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_params(kw: dict[str, Any]) -> Any:
    """The `SamplingParams` of the `sampling_options` flags (validated: a bad value is a one-line error)."""
    from lamina.llm import SamplingParams

    return SamplingParams(
        max_tokens=kw["max_tokens"],
        temperature=kw["temperature"],
        top_p=kw["top_p"],
        top_k=kw["top_k"],
        min_p=kw["min_p"],
        repetition_penalty=kw["repetition_penalty"],
        seed=kw["seed"],
        stop=tuple(kw["stop"]),
    )


def load_llm(model: str | None, device: str | None, dtype: str | None) -> Any:
    """`LLM.load` behind a spinner on stderr, with the thread setting applied."""
    from rich.console import Console

    from lamina.llm import LLM

    use_thread_setting()
    name = model or get_settings().model
    with Console(stderr=True).status(f"loading {name}", spinner="dots"):
        return LLM.load(model, device=device, dtype=dtype)


# --- progress and sizes ------------------------------------------------------------------------------------


def progress_bar(*, stderr: bool = True, transient: bool = True, terminal_only: bool = True,
                 elapsed: bool = False, enabled: bool = True) -> Progress:
    """The CLI's one progress bar (rich): description, bar, done/total, then the time left (or, for work of
    unknown length, the time elapsed).

    stderr: draw it on stderr, so that stdout carries only the command's result. terminal_only: switch it
    off where that stream is not a terminal (a pipe, a log, a test): there it would only add a blank line
    before the output and any error; `progress.console.print` still prints lines. transient: remove the bar
    once the work is done. enabled=False: draw nothing at all.
    """
    from rich import get_console
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True) if stderr else get_console()  # rich's own console writes to stdout
    clock = TimeElapsedColumn() if elapsed else TimeRemainingColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), clock, console=console,
                    transient=transient, disable=not enabled or (terminal_only and not console.is_terminal))


class StepProgress:
    """A progress bar over a training loop's steps, moved by the loop's `on_step(stats)` callback.

    `describe(stats)` is the bar's text; `note(stats)`, when it returns a line (an evaluation, say), is
    printed above the bar. `show=False` (a non-main rank under torchrun) prints nothing at all.
    """

    def __init__(self, total: int, describe: Callable[[Any], str], note: Callable[[Any], str | None] | None = None,
                 *, start: str = "training", show: bool = True, **bar: Any) -> None:
        self.describe, self.note, self.show = describe, note, show
        self.progress = progress_bar(enabled=show, **bar)
        self.task = self.progress.add_task(start, total=total)

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def stage(self, text: str) -> None:
        """What the run is doing before its first step (loading, encoding, scoring the baseline)."""
        self.progress.update(self.task, description=text)

    def update(self, stats: Any) -> None:
        if not self.show:
            return
        self.progress.update(self.task, completed=stats.step, description=self.describe(stats))
        line = self.note(stats) if self.note is not None else None
        if line is not None:
            self.progress.console.print(line, highlight=False)


def human(n: int | None, unit: str = "") -> str:
    """134.5M (parameters), 270.9MB (bytes): SI prefixes, powers of 1000, as `rich.filesize` picks them."""
    from rich.filesize import pick_unit_and_suffix

    if n is None:
        return "?"
    base, prefix = pick_unit_and_suffix(int(n), ["", "K", "M", "G", "T"], 1000)
    return f"{n:.0f}{unit}" if base == 1 else f"{n / base:.1f}{prefix}{unit}"
