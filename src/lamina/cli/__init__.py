"""The `lamina` command: thin verbs over the library, and the composition root that wires the layers.

Every verb parses its flags, calls library functions, and prints. Errors Lamina raises on purpose
(`LaminaError`) are printed as one line, `error: <what is wrong and how to fix it>`, with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from lamina.cli.common import CONTEXT_SETTINGS, _fail_cleanly
from lamina.errors import LaminaError
from lamina.settings import get_settings


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
@click.option("--kv-cache-gb", type=float, default=2.0, show_default=True,
              help="memory for keys/values of running requests; requests that do not fit wait")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="weight-only quantisation (faster decoding where the kernels are; refused where they are not)")
@click.option("--lora", multiple=True, metavar="NAME=PATH",
              help="serve a LoRA adapter (PEFT folder) as model NAME beside the base model (repeatable)")
@_model_options
@_fail_cleanly
def serve(host: str | None, port: int | None, api_key: str | None, insecure: bool, max_running: int, max_upload_mb: float,
          kv_cache_gb: float, quantize: str | None, lora: tuple[str, ...], model: str | None, device: str | None,
          dtype: str | None) -> None:
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
    from lamina.llm.engine.core import EngineArgs

    settings = get_settings()
    set_threads(settings.threads)
    args = ServeArgs(
        model=model or settings.model, host=host or settings.host, port=port or settings.port,
        api_key=api_key or settings.api_key, insecure=insecure, device=device or settings.device,
        dtype=dtype or settings.dtype, home=settings.home,
        engine=EngineArgs(max_running=max_running, kv_cache_gb=kv_cache_gb),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024), quantize=quantize, lora=tuple(_pairs(lora, "--lora")),
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


def _pairs(values: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
    from lamina.errors import InvalidRequestError

    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise InvalidRequestError(f"{flag} takes NAME=PATH, got {value!r}")
        out.append((name.strip(), rest.strip()))
    return out


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


# --- data: training datasets in the data lake (LAMINA_HOME/datalake) -------------------------------------


@cli.group("data")
def data_group() -> None:
    """Training datasets: raw text cleaned into versioned Parquet in LAMINA_HOME/datalake, and SQL over them."""


def _lake():  # type: ignore[no-untyped-def]
    from lamina.infra.datalake import DataLake

    return DataLake(get_settings().home / "datalake")


def _cleaning_default(name: str) -> Any:
    from lamina.foundation.data import CleaningOptions

    return getattr(CleaningOptions(), name)


def _print_rows(columns: list[str], rows: list[tuple[Any, ...]], right: tuple[str, ...] = ()) -> None:
    """A borderless table; cells are plain text (never rich markup), one line each."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*(Text(_cell(value)) for value in row))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _cell(value: Any, width: int = 80) -> str:
    text = "NULL" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _step_rows(steps: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    rows = []
    for s in steps:
        notes = [f"{k}={v}" for k, v in {**s.get("params", {}), **s.get("details", {})}.items()]
        if s.get("examples"):
            notes.append(f"e.g. {s['examples'][0]}")
        rows.append((s["step"], s["removed"], s["kept"], s["chars_after"], "  ".join(notes)))
    return rows


@data_group.command("ingest")
@click.argument("sources", nargs=-1, required=True)
@click.option("--dataset", "name", required=True, help="dataset name; each ingest adds a version (v1, v2, ...)")
@click.option("--text-field", default=None, help="JSONL key / CSV column with the text [default: text, content or body]")
@click.option("--min-chars", type=int, default=_cleaning_default("min_chars"), show_default=True, help="drop shorter documents")
@click.option("--max-chars", type=int, default=_cleaning_default("max_chars"), show_default=True, help="drop longer documents")
@click.option("--min-words", type=int, default=_cleaning_default("min_words"), show_default=True, help="drop documents with fewer words")
@click.option("--max-words", type=int, default=_cleaning_default("max_words"), show_default=True, help="drop documents with more words")
@click.option("--max-symbol-ratio", type=float, default=_cleaning_default("max_symbol_ratio"), show_default=True,
              help="drop documents with a larger share of non-alphanumeric, non-space characters (1 = off)")
@click.option("--max-repeated-lines", type=float, default=_cleaning_default("max_repeated_line_ratio"), show_default=True,
              help="drop documents with a larger share of lines repeating an earlier one (1 = off)")
@click.option("--no-dedup", is_flag=True, help="keep exact duplicates")
@click.option("--no-near-dedup", is_flag=True, help="keep near-duplicates (MinHash, Jaccard >= 0.8)")
@click.option("--scrub-pii", is_flag=True, help="replace emails, phone numbers and keys with <EMAIL>, <PHONE>, <SECRET>")
@_fail_cleanly
def data_ingest(sources: tuple[str, ...], name: str, text_field: str | None, min_chars: int, max_chars: int, min_words: int,
                max_words: int, max_symbol_ratio: float, max_repeated_lines: float, no_dedup: bool, no_near_dedup: bool,
                scrub_pii: bool) -> None:
    """Clean SOURCES (.txt .md .jsonl .csv files, folders of them, or `pydoc`) into a new version of a dataset."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lamina.foundation.data import CleaningOptions, build_dataset

    options = CleaningOptions(
        text_field=text_field, min_chars=min_chars, max_chars=max_chars, min_words=min_words, max_words=max_words,
        max_symbol_ratio=max_symbol_ratio, max_repeated_line_ratio=max_repeated_lines, dedup=not no_dedup,
        near_dedup=not no_near_dedup, scrub_pii=scrub_pii,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    # Off when stderr is not a terminal: there it would only add a blank line before any error.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = progress.add_task(step, total=total)
            progress.update(tasks[step], completed=done, total=total)

        version, report = build_dataset(_lake(), name, list(sources), options, progress=on_progress)
    _print_rows(["step", "removed", "kept", "chars", "notes"], _step_rows(report.to_manifest()), right=("removed", "kept", "chars"))
    click.echo(f"{version.label}: {version.documents:,} documents, {version.characters:,} characters "
               f"(from {report.input_documents:,}), in {version.path}")


@data_group.command("list")
@click.option("--all", "all_versions", is_flag=True, help="every version, not only the latest of each dataset")
@_fail_cleanly
def data_list(all_versions: bool) -> None:
    """Datasets in the data lake: version, documents, characters, when, from what."""
    rows = [(d.name, f"v{d.version}" + (" (latest)" if all_versions and d.is_latest else ""), d.documents, d.characters,
             d.created_at, ", ".join(map(str, d.manifest.get("sources", []))))
            for d in _lake().list(all_versions=all_versions)]
    if not rows:
        click.echo("no datasets yet; create one with `lamina data ingest SRC... --dataset NAME`")
        return
    _print_rows(["dataset", "version", "documents", "characters", "created", "sources"], rows, right=("documents", "characters"))


@data_group.command("show")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="version number [default: the latest]")
@click.option("--docs", type=int, default=3, show_default=True, help="how many documents to preview")
@click.option("--verify", is_flag=True, help="recompute the Parquet files' sha256 against the manifest")
@_fail_cleanly
def data_show(name: str, version: int | None, docs: int, verify: bool) -> None:
    """A dataset version's manifest (sources, counts, files, cleaning steps) and its first documents."""
    import itertools

    from lamina.foundation.data import iter_texts

    lake = _lake()
    dataset = lake.verify(name, version) if verify else lake.get(name, version)
    m = dataset.manifest
    counts = m.get("counts", {})
    click.echo(f"{dataset.label}{' (latest)' if dataset.is_latest else ''}  created {dataset.created_at}  {dataset.path}")
    click.echo(f"sources: {', '.join(map(str, m.get('sources', []))) or '-'}")
    click.echo(f"documents {counts.get('documents', 0):,}  characters {counts.get('characters', 0):,}  "
               f"bytes {counts.get('bytes', 0):,}  parquet {_human(counts.get('parquet_bytes'), 'B')}")
    click.echo("schema: " + ", ".join(f"{c['name']} {c['type']}" for c in m.get("schema", [])))
    for filename, digest in sorted(m.get("hashes", {}).items()):
        click.echo(f"file {filename}  sha256 {digest}{'  verified' if verify else ''}")
    if m.get("steps"):
        _print_rows(["step", "removed", "kept", "chars", "notes"], _step_rows(m["steps"]), right=("removed", "kept", "chars"))
    for doc_id, text in itertools.islice(iter_texts(lake, name, dataset.version), max(0, docs)):
        click.echo(f"--- {doc_id}\n{_cell(text, 300)}")


@data_group.command("sql")
@click.argument("query")
@click.option("--limit", type=int, default=50, show_default=True, help="most rows printed")
@_fail_cleanly
def data_sql(query: str, limit: int) -> None:
    """Run a read-only SQL query (DuckDB) over the latest version of each dataset, e.g.
    lamina data sql 'SELECT source, count(*) FROM "pydoc-clean" GROUP BY 1'."""
    columns, rows = _lake().sql(query, limit=max(0, limit) + 1)
    _print_rows(columns, rows[:limit], right=tuple(c for i, c in enumerate(columns) if rows and isinstance(rows[0][i], int | float)))
    more = f"; more not shown (--limit {limit})" if len(rows) > limit else ""
    click.echo(f"({min(len(rows), limit)} row{'s' if min(len(rows), limit) != 1 else ''}{more})", err=True)


# --- end of data -----------------------------------------------------------------------------------------


@cli.command()
@_fail_cleanly
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
    from lamina.llm.kernels import native

    reason = native.unavailable_reason()
    lib = None if reason else native.library(settings.home / "cache")
    if lib is not None:
        click.echo(f"native CPU kernels: built ({lib._name})")
    else:
        click.echo(f"native CPU kernels: unavailable ({reason or 'compiling failed; see the log'}); PyTorch's kernels serve")
    click.echo("models:")
    for entry in Registry(settings.home).list():
        click.echo(f"  {entry.id:24} {entry.format:5} {_human(entry.size_bytes, 'B'):>8}  {entry.path}")


@cli.group()
def tokenizer() -> None:
    """Train tokenizers."""


@tokenizer.command("train")
@click.option("--dataset", required=True, help="data-lake dataset to learn from (`lamina data list`)")
@click.option("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at least 257)")
@click.option("--out", type=click.Path(), default=None, help="folder for tokenizer.json [LAMINA_HOME/tokenizers/NAME-bpeN]")
@_fail_cleanly
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


@cli.command()
@click.option("--config", "config_path", default="pydoc", show_default=True, help="run YAML, or a preset name")
@click.option("--resume", is_flag=True, help="continue from the run's last checkpoint")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="under torchrun: DDP, or FSDP full sharding")
@click.option("--max-steps", type=int, default=None, help="override train.max_steps")
@click.option("--name", default=None, help="override the run/model name")
@_fail_cleanly
def pretrain(config_path: str, resume: bool, strategy: str, max_steps: int | None, name: str | None) -> None:
    """Train a model from scratch (no options: a small GPT-2 on Python's docs, ~10 min on 2 cores).

    Distributed: torchrun --nproc_per_node N -m lamina pretrain --config FILE [--strategy fsdp]
    """
    import dataclasses
    import logging

    from lamina.foundation.pretrain import pretrain as run_pretrain
    from lamina.foundation.train_config import RunConfig
    from lamina.infra.device import set_threads
    from lamina.infra.distributed import Distributed

    settings = get_settings()
    if "WORLD_SIZE" not in os.environ:
        set_threads(settings.threads)
    config = RunConfig.from_yaml(config_path)
    if max_steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=max_steps))
    if name is not None:
        config = dataclasses.replace(config, name=name)
    dist = Distributed.from_env(strategy)  # type: ignore[arg-type]
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    try:
        with _TrainProgress(config.train.max_steps, enabled=dist.is_main) as progress:
            result = run_pretrain(config, settings.home, dist=dist, resume=resume, on_step=progress.update)
    finally:
        dist.close()
    if dist.is_main:
        click.echo(f"{config.name}: {result.steps} steps, train loss {result.train_loss:.3f}, val loss {result.val_loss:.3f} "
                   f"(perplexity {math.exp(min(result.val_loss, 50)):.1f}); run in {result.run_dir}")
        if result.model_dir is not None:
            click.echo(f"registered as {config.name!r}: lamina generate --model {config.name} --raw \"The\"")


class _TrainProgress:
    """A rich progress bar with loss, tokens/s and MFU; a plain line per evaluation."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.progress = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.progress.__enter__()
            self.task = self.progress.add_task("training", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def update(self, stats) -> None:  # type: ignore[no-untyped-def]
        if self.progress is None:
            return
        text = f"loss {stats.loss:.3f} | {stats.tokens_per_s:,.0f} tok/s | MFU {stats.mfu:.0%}"
        self.progress.update(self.task, completed=stats.step, description=text)
        if stats.val_loss is not None:
            self.progress.console.print(f"step {stats.step}: train {stats.loss:.3f}, val {stats.val_loss:.3f} "
                                        f"(ppl {math.exp(min(stats.val_loss, 50)):.1f}), {stats.tokens_per_s:,.0f} tok/s, "
                                        f"MFU {stats.mfu:.0%}", highlight=False)


@cli.command()
@click.option("--model", "-m", "model_name", default=None, help="model to score (id or path); not needed with --cv")
@click.option("--dataset", required=True, help="data-lake dataset")
@click.option("--cv", type=int, default=None, help="k-fold cross-validation: k trainings with --config")
@click.option("--config", "config_path", default="pydoc", show_default=True, help="run YAML for --cv trainings")
@_fail_cleanly
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
    llm = _load_llm(model_name, "cpu", "float32")
    trained_on = None
    if llm.entry is not None and (llm.entry.path / "training.json").exists():
        trained_on = read_json(llm.entry.path / "training.json").get("shards")
    docs = evaluation_documents(DataLake(home / "datalake"), dataset, trained_on)
    result = holdout_loss(llm.model, llm.tokenizer, docs, llm.config.max_seq_len)
    click.echo(f"{llm.name} on {dataset}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
               f"({result.tokens:,} tokens, {result.documents} documents)")


# --- lora: LoRA adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors) --------------


@cli.group("lora")
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
@_fail_cleanly
def lora_merge(model_name: str | None, adapter: str, out: str, dtype: str, force: bool, overwrite: bool) -> None:
    """Merge a LoRA adapter into its base model, as a folder that `lamina generate --model OUT` loads.

    An HF-folder base gives an HF folder (transformers loads it too); a GGUF base gives a Lamina folder
    with the tokenizer, chat template and EOS ids of the GGUF.
    """
    from pathlib import Path

    from lamina.infra.device import DTYPES, set_threads
    from lamina.infra.registry import Registry
    from lamina.llm.tuning.adapters import merge_adapter

    settings = get_settings()
    set_threads(settings.threads)
    entry = Registry(settings.home).resolve(model_name or settings.model)
    result = merge_adapter(entry, Path(adapter), Path(out), dtype=DTYPES[dtype], allow_other_base=force, overwrite=overwrite)
    click.echo(f"merged {adapter} into {entry.id} ({len(result.layers)} layers changed): {result.layout} folder {result.folder}")
    click.echo(f'try: lamina generate --model {result.folder} "Hello"', err=True)


# --- end of lora -----------------------------------------------------------------------------------------


def _human(n: int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    value = float(n)
    for prefix in ("", "K", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.0f}{prefix}{unit}" if prefix == "" else f"{value:.1f}{prefix}{unit}"
        value /= 1000
    return str(n)

def _register() -> None:
    import lamina.cli.dpo  # noqa: F401 (registers `finetune dpo` and `finetune classify` on the group)
    from lamina.cli.finetune import finetune
    from lamina.cli.gan import experiment, gan

    cli.add_command(finetune)
    cli.add_command(gan)
    cli.add_command(experiment)


_register()


def main() -> None:
    cli(prog_name="lamina")
