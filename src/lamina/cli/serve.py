"""`lamina serve`, `lamina keys` and `lamina usage`: the API server, its keys, and what was served."""

from __future__ import annotations

from typing import Any

import click

from lamina.cli.common import fail_cleanly, model_options, use_thread_setting
from lamina.settings import get_settings


class EngineDefault(click.Option):
    """An option whose default is the `EngineArgs` field of the same name, so the engine alone owns it.

    Read when the command runs or shows its help, not at start-up: importing the engine takes seconds.
    """

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        from lamina.llm.engine.core import EngineArgs

        return getattr(EngineArgs, self.name or "")


@click.command()
@click.option("--host", default=None, help="address to listen on [LAMINA_HOST, default 127.0.0.1]")
@click.option("--port", type=int, default=None, help="port [LAMINA_PORT, default 8000]")
@click.option("--api-key", default=None, help="require this key (Authorization: Bearer KEY) [LAMINA_API_KEY]")
@click.option("--database-url", default=None,
              help="postgresql://user:password@host/db: keys, usage, conversations, files, vector stores and stored "
                   "responses in PostgreSQL (with pgvector), shared by every replica that names it "
                   "[LAMINA_DATABASE_URL, default: SQLite in LAMINA_HOME]")
@click.option("--ray", "use_ray", is_flag=True,
              help="serve on Ray Serve: --replicas engine replicas as deployments behind a prefix-aware router")
@click.option("--ray-address", default=None, help="with --ray: the cluster to join (host:port; default: start a local one)")
@click.option("--replicas", type=click.IntRange(1, 256), default=2, show_default=True, help="with --ray: engine replicas")
@click.option("--routing", type=click.Choice(["prefix", "round_robin"]), default="prefix", show_default=True,
              help="with --ray: how the router picks a replica (prefix: cache affinity with a load guard)")
@click.option("--insecure", is_flag=True, help="allow a non-loopback address with no API key at all")
@click.option("--max-running", cls=EngineDefault, type=int, show_default=True, help="requests decoded at once; more wait")
@click.option("--batch-concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
              help="lines of a batch (/v1/batches) running at once; they start only while no interactive request waits")
@click.option("--max-upload-mb", type=float, default=64, show_default=True, help="largest file POST /v1/files accepts")
@click.option("--kv-cache-gb", cls=EngineDefault, type=float, show_default=True,
              help="memory for keys/values of running requests; requests that do not fit wait")
@click.option("--kv-cache-dtype", cls=EngineDefault, type=click.Choice(["auto", "float32", "bfloat16"]), show_default=True,
              help="how keys and values are stored (auto: bfloat16 under quantised weights, else the model's dtype)")
@click.option("--speculative-tokens", cls=EngineDefault, type=click.IntRange(0, 16), show_default=True,
              help="prompt-lookup draft tokens each greedy request verifies per step (0 off; a request's "
                   "speculative_tokens overrides it)")
@click.option("--max-request-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="end a request still generating this long after it arrived (finish reason length); default: no limit")
@click.option("--quantize", type=click.Choice(["auto", "none", "int8", "int4"]), default=None,
              help="weight-only quantisation [LAMINA_QUANTIZE, default auto: a GGUF's own Q4_1/Q8_0 blocks where the "
                   "native kernels run and no --dtype is given; `lamina info` says what it resolves to]")
@click.option("--lora", multiple=True, metavar="NAME=PATH",
              help="serve a LoRA adapter (PEFT folder) as model NAME beside the base model (repeatable)")
@click.option("--mcp-config", type=click.Path(dir_okay=False), default=None,
              help='MCP servers whose tools the web chat can enable ({"mcpServers": {...}}, as `lamina agent` takes)')
@click.option("--tool-adapter", default="auto", show_default=True,
              help="tool-use LoRA adapter served beside the model for the web chat's tools: auto (the one shipped for "
                   "the model, if any), none, or a folder")
@model_options
@fail_cleanly
def serve(host: str | None, port: int | None, api_key: str | None, database_url: str | None, use_ray: bool, ray_address: str | None,
          replicas: int, routing: str, insecure: bool, max_running: int,
          batch_concurrency: int, max_upload_mb: float,
          kv_cache_gb: float, kv_cache_dtype: str, speculative_tokens: int, max_request_seconds: float | None, quantize: str | None, lora: tuple[str, ...], mcp_config: str | None, tool_adapter: str,
          model: str | None, device: str | None, dtype: str | None) -> None:
    """Serve the OpenAI-compatible API and the web chat (http://HOST:PORT/)."""
    import dataclasses
    import logging

    import uvicorn

    from lamina.api.app import ServeArgs
    from lamina.api.security import check_exposure
    from lamina.apps.agents.adapters import tool_adapter_for
    from lamina.apps.agents.mcp import load_mcp_config
    from lamina.apps.server import build_app
    from lamina.llm.engine.core import EngineArgs

    use_thread_setting()
    mcp_servers = load_mcp_config(mcp_config) if mcp_config else []
    flags = {"model": model, "host": host, "port": port, "api_key": api_key, "device": device, "dtype": dtype,
             "database_url": database_url}
    # a flag given on the command line wins over its LAMINA_* setting
    settings = get_settings().model_copy(update={k: v for k, v in flags.items() if v})
    args = ServeArgs(
        settings, insecure=insecure, engine=EngineArgs(max_running=max_running, kv_cache_gb=kv_cache_gb, kv_cache_dtype=kv_cache_dtype,
                                                       speculative_tokens=speculative_tokens, max_request_seconds=max_request_seconds),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024), quantize=quantize, lora=tuple(_pairs(lora, "--lora")),
        batch_concurrency=batch_concurrency,
    )
    tools = tool_adapter_for(settings.model, tool_adapter)
    if tools is not None and tools[0] not in dict(args.lora):
        args = dataclasses.replace(args, lora=(*args.lora, tools))
    check_exposure(settings.host, insecure=insecure, database=args.database, api_key=settings.api_key)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if use_ray:
        import functools

        from lamina.api.ray_serve import serve_on_ray

        click.echo(f"Lamina serving {args.model} on Ray Serve: {replicas} replicas, {routing} routing, "
                   f"at http://{settings.host}:{settings.port}/", err=True)
        serve_on_ray(functools.partial(build_app, mcp_servers=mcp_servers, tool_model=tools[0] if tools else None), args,
                     replicas=replicas, policy=routing, address=ray_address, host=settings.host, port=settings.port,  # type: ignore[arg-type]
                     cpus_per_replica=float(settings.threads or 1))
        return
    app = build_app(args, mcp_servers=mcp_servers, tool_model=tools[0] if tools else None)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    click.echo(f"Lamina serving {args.model} at http://{shown}:{settings.port}/  (API: http://{shown}:{settings.port}/v1)",
               err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=10)


def _pairs(values: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
    from lamina.errors import InvalidRequestError

    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise InvalidRequestError(f"{flag} takes NAME=PATH, got {value!r}")
        out.append((name.strip(), rest.strip()))
    return out


# --- keys and usage ----------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Manage API keys (stored hashed in LAMINA_HOME/lamina.db)."""


def _key_store() -> Any:
    from lamina.api.keys import KeyStore
    from lamina.infra.db import open_database

    return KeyStore(open_database(get_settings().database_for(get_settings().home)))


@keys.command("create")
@click.option("--name", required=True, help="a label for the key")
@click.option("--rpm", type=int, default=None, help="requests per minute allowed")
@click.option("--tpm", type=int, default=None, help="tokens (prompt + completion) per minute allowed")
@click.option("--models", default=None, help="comma-separated model ids the key may use (default: all)")
@fail_cleanly
def keys_create(name: str, rpm: int | None, tpm: int | None, models: str | None) -> None:
    """Create a key; it is printed once and cannot be shown again."""
    key, secret = _key_store().create(name, rpm=rpm, tpm=tpm, models=[m.strip() for m in (models or "").split(",") if m.strip()])
    click.echo(secret)
    click.echo(f"created key {key.name!r} ({key.prefix}...); store it now, it is not shown again", err=True)


@keys.command("list")
@fail_cleanly
def keys_list() -> None:
    """List keys (never the secrets)."""
    import datetime

    for k in _key_store().list():
        state = "active" if k.active else f"revoked {datetime.datetime.fromtimestamp(k.revoked_at or 0):%Y-%m-%d %H:%M}"
        limits = f"rpm={k.rpm or '-'} tpm={k.tpm or '-'} models={','.join(k.models) or 'all'}"
        click.echo(f"{k.name:20} {k.prefix}...  {limits:40} {state}")


@keys.command("revoke")
@click.argument("name")
@fail_cleanly
def keys_revoke(name: str) -> None:
    """Revoke a key by name or prefix; it stops working at once."""
    key = _key_store().revoke(name)
    click.echo(f"revoked key {key.name!r} ({key.prefix}...)")


@click.command()
@fail_cleanly
def usage() -> None:
    """Requests and tokens per key and model, from the usage log."""
    from lamina.api.usage import UsageLog
    from lamina.infra.db import open_database

    rows = UsageLog(open_database(get_settings().database_for(get_settings().home))).totals()
    click.echo(f"{'key':20} {'model':24} {'requests':>8} {'errors':>6} {'prompt':>9} {'completion':>10} {'mean ms':>8}")
    for r in rows:
        click.echo(f"{r['key']:20} {r['model']:24} {r['requests']:8} {r['errors']:6} {r['prompt_tokens']:9} "
                   f"{r['completion_tokens']:10} {r['mean_latency_ms'] or 0:8.0f}")
