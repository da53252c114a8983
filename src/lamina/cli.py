"""The `lamina` command: thin verbs over the library, and the composition root that wires the layers.

Every verb parses its flags, calls library functions, and prints. Errors Lamina raises on purpose
(`LaminaError`) are printed as one line, `error: <what is wrong and how to fix it>`, with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from lamina.errors import LaminaError
from lamina.settings import get_settings

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LaminaError as e:
            flag = f" (--{e.param.replace('_', '-')})" if e.param in _FLAGS else ""
            click.echo(f"error: {e.message}{flag}", err=True)
            sys.exit(2)

    return wrapper


# Library errors name the parameter; on the command line, name the flag that sets it.
_FLAGS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "model", "device", "dtype"}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lamina")
def cli() -> None:
    """Lamina: a six-layer generative-AI stack (infra, arch, foundation, llm, api, apps) on plain PyTorch."""


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--dtype", default=None, help="auto|float32|bfloat16|float16 (auto: fastest measured here) [LAMINA_DTYPE]")(fn)
    fn = click.option("--device", default=None, help="auto|cpu|cuda|cuda:N|mps [LAMINA_DEVICE]")(fn)
    fn = click.option("--model", "-m", default=None, help="model id (see `lamina models`), .gguf file or HF folder [LAMINA_MODEL]")(fn)
    return fn


def _sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def _sampling(kw: dict[str, Any]) -> Any:
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


def _load_llm(model: str | None, device: str | None, dtype: str | None) -> Any:
    from rich.console import Console

    from lamina.infra.device import set_threads
    from lamina.llm import LLM

    set_threads(get_settings().threads)
    name = model or get_settings().model
    with Console(stderr=True).status(f"loading {name}", spinner="dots"):
        return LLM.load(model, device=device, dtype=dtype)


@cli.command()
@click.argument("prompt")
@_model_options
@_sampling_options
@click.option("--raw", is_flag=True, help="continue the text as is, without the chat template")
@_fail_cleanly
def generate(prompt: str, model: str | None, device: str | None, dtype: str | None, raw: bool, **kw: Any) -> None:
    """Answer PROMPT (a chat turn for chat models; plain continuation with --raw or for base models)."""
    from lamina.errors import InvalidRequestError

    if not prompt.strip():
        raise InvalidRequestError('the prompt is empty: pass some text, e.g. lamina generate "Hello"')
    params = _sampling(kw)  # validate flags before spending time on loading
    llm = _load_llm(model, device, dtype)
    if raw or llm.chat_template is None:
        text = prompt if kw["system"] is None else f"{kw['system']}\n\n{prompt}"
        pieces = llm.stream(text, params)
    else:
        messages = ([{"role": "system", "content": kw["system"]}] if kw["system"] else []) + [{"role": "user", "content": prompt}]
        pieces = llm.stream_chat(messages, params)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@cli.command()
@_model_options
@_sampling_options
@_fail_cleanly
def chat(model: str | None, device: str | None, dtype: str | None, **kw: Any) -> None:
    """Talk to a model: streaming answers, history kept; /reset forgets it, /exit (or Ctrl-D) leaves."""
    params = _sampling(kw)
    llm = _load_llm(model, device, dtype)
    system = [{"role": "system", "content": kw["system"]}] if kw["system"] else []
    history: list[dict[str, str]] = []
    click.echo(f"{llm.name} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}). /reset clears the history, /exit leaves.", err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history.clear()
            click.echo("(history cleared)", err=True)
            continue
        if text.startswith("/"):
            click.echo(f"unknown command {text!r}; commands: /reset, /exit", err=True)
            continue
        history.append({"role": "user", "content": text})
        answer: list[str] = []
        try:
            for piece in llm.stream_chat(system + history, params):
                answer.append(piece)
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [interrupted]", nl=False)
        except LaminaError as e:
            history.pop()
            click.echo(f"error: {e.message}", err=True)
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(answer)})


@cli.command()
@click.option("--host", default=None, help="address to listen on [LAMINA_HOST, default 127.0.0.1]")
@click.option("--port", type=int, default=None, help="port [LAMINA_PORT, default 8000]")
@click.option("--api-key", default=None, help="require this key (Authorization: Bearer KEY) [LAMINA_API_KEY]")
@click.option("--insecure", is_flag=True, help="allow a non-loopback address with no API key at all")
@click.option("--max-running", type=int, default=16, show_default=True, help="requests decoded at once; more wait")
@click.option("--max-upload-mb", type=float, default=64, show_default=True, help="largest file POST /v1/files accepts")
@_model_options
@_fail_cleanly
def serve(host: str | None, port: int | None, api_key: str | None, insecure: bool, max_running: int, max_upload_mb: float,
          model: str | None, device: str | None, dtype: str | None) -> None:
    """Serve the OpenAI-compatible API and the web chat (http://HOST:PORT/)."""
    import ipaddress
    import logging

    import uvicorn

    from lamina.api.app import ServeArgs
    from lamina.api.keys import KeyStore
    from lamina.apps.server import build_app
    from lamina.errors import InvalidRequestError
    from lamina.infra.db import Database
    from lamina.infra.device import set_threads
    from lamina.llm.engine import EngineArgs

    settings = get_settings()
    set_threads(settings.threads)
    args = ServeArgs(
        model=model or settings.model, host=host or settings.host, port=port or settings.port,
        api_key=api_key or settings.api_key, insecure=insecure, device=device or settings.device,
        dtype=dtype or settings.dtype, home=settings.home, engine=EngineArgs(max_running=max_running),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
    )
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not insecure and not KeyStore(Database(args.database), args.api_key).auth_required():
        raise InvalidRequestError(
            f"refusing to listen on {args.host} without an API key: pass --api-key KEY (or create one with "
            "`lamina keys create --name NAME`), or --insecure to serve anyone who can reach this address"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_app(args)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    click.echo(f"Lamina serving {args.model} at http://{shown}:{args.port}/  (API: http://{shown}:{args.port}/v1)", err=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)


@cli.group()
def keys() -> None:
    """Manage API keys (stored hashed in LAMINA_HOME/lamina.db)."""


def _key_store():  # type: ignore[no-untyped-def]
    from lamina.api.keys import KeyStore
    from lamina.infra.db import Database

    return KeyStore(Database(get_settings().home / "lamina.db"))


@keys.command("create")
@click.option("--name", required=True, help="a label for the key")
@click.option("--rpm", type=int, default=None, help="requests per minute allowed")
@click.option("--tpm", type=int, default=None, help="tokens (prompt + completion) per minute allowed")
@click.option("--models", default=None, help="comma-separated model ids the key may use (default: all)")
@_fail_cleanly
def keys_create(name: str, rpm: int | None, tpm: int | None, models: str | None) -> None:
    """Create a key; it is printed once and cannot be shown again."""
    key, secret = _key_store().create(name, rpm=rpm, tpm=tpm, models=[m.strip() for m in (models or "").split(",") if m.strip()])
    click.echo(secret)
    click.echo(f"created key {key.name!r} ({key.prefix}...); store it now, it is not shown again", err=True)


@keys.command("list")
@_fail_cleanly
def keys_list() -> None:
    """List keys (never the secrets)."""
    import datetime

    for k in _key_store().list():
        state = "active" if k.active else f"revoked {datetime.datetime.fromtimestamp(k.revoked_at or 0):%Y-%m-%d %H:%M}"
        limits = f"rpm={k.rpm or '-'} tpm={k.tpm or '-'} models={','.join(k.models) or 'all'}"
        click.echo(f"{k.name:20} {k.prefix}...  {limits:40} {state}")


@keys.command("revoke")
@click.argument("name")
@_fail_cleanly
def keys_revoke(name: str) -> None:
    """Revoke a key by name or prefix; it stops working at once."""
    key = _key_store().revoke(name)
    click.echo(f"revoked key {key.name!r} ({key.prefix}...)")


@cli.command()
@_fail_cleanly
def usage() -> None:
    """Requests and tokens per key and model, from the usage log."""
    from lamina.api.usage import UsageLog
    from lamina.infra.db import Database

    rows = UsageLog(Database(get_settings().home / "lamina.db")).totals()
    click.echo(f"{'key':20} {'model':24} {'requests':>8} {'errors':>6} {'prompt':>9} {'completion':>10} {'mean ms':>8}")
    for r in rows:
        click.echo(f"{r['key']:20} {r['model']:24} {r['requests']:8} {r['errors']:6} {r['prompt_tokens']:9} "
                   f"{r['completion_tokens']:10} {r['mean_latency_ms'] or 0:8.0f}")


def _rag_parts(embedding_model: str = "all-minilm-l6-v2"):  # type: ignore[no-untyped-def]
    from lamina.foundation.embeddings import Embedder
    from lamina.infra.db import Database
    from lamina.infra.vectorstore import VectorStores

    home = get_settings().home
    stores = VectorStores(Database(home / "lamina.db"), home / "vector_stores")
    return stores, Embedder.load(embedding_model, device="cpu", dtype="float32", home=home)


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--store", required=True, help="vector store name (created on first use)")
@click.option("--chunk-tokens", type=int, default=200, show_default=True, help="chunk size, in embedding-model tokens")
@click.option("--overlap", type=int, default=40, show_default=True, help="tokens shared by consecutive chunks")
@click.option("--attr", multiple=True, help="attribute KEY=VALUE stored with every chunk (repeatable)")
@_fail_cleanly
def ingest(paths: tuple[str, ...], store: str, chunk_tokens: int, overlap: int, attr: tuple[str, ...]) -> None:
    """Add files and folders (.txt .md .html .pdf .jsonl .csv) to a vector store; `pydoc` is Python's docs.

    Unchanged files are skipped, changed ones replaced; a file that cannot be read is reported and the rest go on.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lamina.errors import InvalidRequestError
    from lamina.foundation.corpora import export_pydoc
    from lamina.foundation.ingest import Ingestor, expand_paths

    attributes: dict[str, str] = {}
    for item in attr:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"--attr needs KEY=VALUE (got {item!r})", param="attr")
        attributes[key] = value
    sources = [str(export_pydoc(get_settings().home / "corpora" / "pydoc")[0].parent) if p == "pydoc" else p for p in paths]
    files = expand_paths(sources)
    vector_stores, embedder = _rag_parts()
    info = vector_stores.find(store) or vector_stores.create(
        store, embedding_model=embedder.name, dim=embedder.dim, chunk_tokens=chunk_tokens, chunk_overlap=overlap)
    ingestor = Ingestor(vector_stores, info, embedder)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"ingesting into {store}", total=len(files))

        def on_file(path, record) -> None:  # type: ignore[no-untyped-def]
            progress.advance(task)
            if record is not None and record.status == "failed":
                progress.console.print(f"error: {record.error}", style="red", highlight=False)

        report = ingestor.ingest_paths(files, attributes=attributes, on_file=on_file)
    click.echo(f"{store}: {len(report.added)} file(s) added ({report.chunks} chunks, {report.chunks_per_second:.0f} chunks/s), "
               f"{len(report.unchanged)} unchanged, {len(report.failed)} failed")
    if report.failed:
        sys.exit(1)


@cli.command()
@click.argument("question")
@click.option("--store", "stores", multiple=True, required=True, help="vector store name (repeatable)")
@click.option("--k", type=int, default=4, show_default=True, help="passages given to the model")
@_model_options
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True)
@_fail_cleanly
def ask(question: str, stores: tuple[str, ...], k: int, model: str | None, device: str | None, dtype: str | None,
        max_tokens: int, temperature: float) -> None:
    """Answer QUESTION from documents in vector stores, with numbered sources (file, page)."""
    from lamina.apps.rag import ask as rag_ask
    from lamina.llm import SamplingParams
    from lamina.llm.rag import Retriever

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    vector_stores, embedder = _rag_parts()
    llm = _load_llm(model, device, dtype)
    answer = rag_ask(llm, Retriever(vector_stores, embedder), list(stores), question, k=k, params=params)
    for piece in answer.pieces:
        click.echo(piece, nl=False)
    click.echo("\n")
    click.echo("Sources:")
    for c in answer.citations:
        where = f", page {c.page}" if c.page is not None else ""
        click.echo(f"  [{c.index}] {c.filename}{where} (score {c.score:.3f}): {c.snippet}")


@cli.group("eval")
def eval_group() -> None:
    """Evaluate parts of the stack on labelled data."""


@eval_group.command("retrieval")
@click.option("--store", required=True, help="vector store to search")
@click.option("--qa", default="pydoc", show_default=True, help="JSONL of {question, file[, page]}; `pydoc` is the shipped set")
@click.option("--k", type=int, default=5, show_default=True)
@_fail_cleanly
def eval_retrieval(store: str, qa: str, k: int) -> None:
    """hit@k and MRR of vector, BM25 and hybrid search, side by side."""
    from lamina.apps.rag import evaluate_retrieval, load_qa
    from lamina.llm.rag import Retriever

    items = load_qa(qa)
    vector_stores, embedder = _rag_parts()
    vector_stores.get(store)
    click.echo(f"{len(items)} questions, store {store!r}, k={k}")
    click.echo(f"{'method':8} {'hit@' + str(k):>7} {'MRR':>6}")
    for score in evaluate_retrieval(Retriever(vector_stores, embedder), store, items, k):
        click.echo(f"{score.mode:8} {score.hit_at_k:7.3f} {score.mrr:6.3f}")


@cli.command()
@_fail_cleanly
def models() -> None:
    """List the models Lamina can run here (id, family, parameters, format, size, source)."""
    from rich.console import Console
    from rich.table import Table

    from lamina.infra.registry import Registry
    from lamina.llm.loader import summarize

    table = Table(box=None, header_style="bold")
    for column in ("id", "task", "family", "params", "context", "format", "size", "source"):
        table.add_column(column, justify="right" if column in ("params", "size", "context") else "left")
    for entry in Registry(get_settings().home).list():
        try:
            s = summarize(entry)
            family, params, context = s.family, _human(s.params), str(s.context or "?")
        except LaminaError as e:
            family, params, context = f"unreadable: {e.message}", "?", "?"
        table.add_row(entry.id, entry.task, family, params, context, entry.format, _human(entry.size_bytes, "B"), entry.source)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@cli.command()
@_fail_cleanly
def info() -> None:
    """Devices, threads, the dtype `auto` picks, versions, LAMINA_HOME and models."""
    import platform

    import torch

    import lamina
    from lamina.infra.device import list_devices, probe_dtypes, resolve_device, set_threads
    from lamina.infra.registry import Registry

    settings = get_settings()
    threads = set_threads(settings.threads)
    click.echo(f"lamina {lamina.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    from importlib.metadata import PackageNotFoundError, version

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
        memory = _human(d.memory_bytes, "B") if d.memory_bytes else "?"
        click.echo(f"  {d.name:8} {d.model}  memory {memory}  {d.detail}")
    device = resolve_device(settings.device)
    probe = probe_dtypes(device, settings.home / "cache")
    speeds = ", ".join(f"{k} {v:.0f}" for k, v in probe.gflops.items())
    click.echo(f"dtype auto on {device}: {probe.choice} (GEMM GFLOP/s: {speeds})")
    click.echo("models:")
    for entry in Registry(settings.home).list():
        click.echo(f"  {entry.id:24} {entry.format:5} {_human(entry.size_bytes, 'B'):>8}  {entry.path}")


def _human(n: int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    value = float(n)
    for prefix in ("", "K", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.0f}{prefix}{unit}" if prefix == "" else f"{value:.1f}{prefix}{unit}"
        value /= 1000
    return str(n)


def main() -> None:
    cli(prog_name="lamina")
