"""`lamina info` and `lamina models`: what this machine offers (devices, dtypes, kernels) and which models
Lamina can run here."""

from __future__ import annotations

import sys

import click

from lamina.cli.common import fail_cleanly, human, use_thread_setting
from lamina.errors import LaminaError
from lamina.settings import get_settings


@click.command()
@fail_cleanly
def models() -> None:
    """List the models Lamina can run here (id, family, parameters, format, size, source)."""
    from rich.console import Console
    from rich.table import Table

    from lamina.infra.registry import Registry
    from lamina.llm.formats.loader import summarize

    table = Table(box=None, header_style="bold")
    for column in ("id", "task", "family", "params", "context", "format", "size", "source"):
        table.add_column(column, justify="right" if column in ("params", "size", "context") else "left")
    for entry in Registry(get_settings().home).list():
        try:
            s = summarize(entry)
            family, params, context = s.family, human(s.params), str(s.context or "?")
        except LaminaError as e:
            family, params, context = f"unreadable: {e.message}", "?", "?"
        table.add_row(entry.id, entry.task, family, params, context, entry.format, human(entry.size_bytes, "B"), entry.source)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@click.command()
@fail_cleanly
def info() -> None:
    """Devices, threads, the dtype `auto` picks, versions, LAMINA_HOME and models."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import lamina
    from lamina.infra.device import list_devices, probe_dtypes, resolve_device
    from lamina.infra.registry import Registry
    from lamina.llm.kernels import native

    settings = get_settings()
    threads = use_thread_setting()
    click.echo(f"lamina {lamina.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    versions = []
    for package in ("numpy", "tokenizers", "safetensors", "gguf", "transformers"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    click.echo("  " + "  ".join(versions))
    click.echo(f"LAMINA_HOME {settings.home}")
    click.echo(f"threads {threads} (torch intra-op; LAMINA_THREADS sets it)")
    click.echo("devices:")
    for d in list_devices():
        memory = human(d.memory_bytes, "B") if d.memory_bytes else "?"
        click.echo(f"  {d.name:8} {d.model}  memory {memory}  {d.detail}")
    device = resolve_device(settings.device)
    cache = settings.cache_for(settings.home)
    probe = probe_dtypes(device, cache)
    speeds = ", ".join(f"{k} {v:.0f}" for k, v in probe.gflops.items())
    click.echo(f"dtype auto on {device}: {probe.choice} (GEMM GFLOP/s: {speeds})")
    options = native.NativeOptions.from_settings(settings)  # LAMINA_NATIVE, LAMINA_NATIVE_MARCH, LAMINA_CC
    reason = native.unavailable_reason(options)
    path = None if reason else native.library_path(cache, options)
    if path is not None:
        click.echo(f"native CPU kernels: built for {native.isa(cache, options)} ({path})")
    else:
        click.echo(f"native CPU kernels: unavailable ({reason or 'compiling failed; see the log'}); PyTorch's kernels serve")
    _default_precision(settings, device, options)
    click.echo("models:")
    for entry in Registry(settings.home).list():
        click.echo(f"  {entry.id:24} {entry.format:5} {human(entry.size_bytes, 'B'):>8}  {entry.path}")


def _default_precision(settings, device, options) -> None:  # type: ignore[no-untyped-def]
    """What `lamina serve` with no flags serves the default model in, and why."""
    from lamina.errors import LaminaError
    from lamina.infra.registry import Registry
    from lamina.llm.llm import resolve_precision

    try:
        entry = Registry(settings.home).resolve(settings.model)
    except LaminaError as e:
        click.echo(f"default precision: unknown ({e})")
        return
    asked = settings.dtype if settings.dtype != "auto" else None
    p = resolve_precision(entry, device, asked, settings.quantize, options)
    weights = p.quantize or f"{p.dtype} floats"
    click.echo(f"default precision for {entry.id}: {weights} (quantize {settings.quantize}: {p.reason})")
