"""`lamina ingest`, `lamina ask` and `lamina eval retrieval`: documents into vector stores, answers with
sources from them, and how well retrieval finds the right passages."""

from __future__ import annotations

import sys
from typing import Any

import click

from lamina.cli.common import fail_cleanly, load_llm, model_options, progress_bar
from lamina.settings import get_settings


def _rag_parts(embedding_model: str = "all-minilm-l6-v2") -> tuple[Any, Any]:
    """The vector stores of LAMINA_HOME and the embedder they were built with."""
    from lamina.foundation.embeddings import Embedder
    from lamina.infra.db import open_database
    from lamina.infra.vectorstore import VectorStores

    home = get_settings().home
    stores = VectorStores(open_database(get_settings().database_for(home)), home / "vector_stores")
    return stores, Embedder.load(embedding_model, device="cpu", dtype="float32", home=home)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--store", required=True, help="vector store name (created on first use)")
@click.option("--chunk-tokens", type=int, default=200, show_default=True, help="chunk size, in embedding-model tokens")
@click.option("--overlap", type=int, default=40, show_default=True, help="tokens shared by consecutive chunks")
@click.option("--attr", multiple=True, help="attribute KEY=VALUE stored with every chunk (repeatable)")
@fail_cleanly
def ingest(paths: tuple[str, ...], store: str, chunk_tokens: int, overlap: int, attr: tuple[str, ...]) -> None:
    """Add files and folders (.txt .md .html .pdf .jsonl .csv) to a vector store; `pydoc` is Python's docs.

    Unchanged files are skipped, changed ones replaced; a file that cannot be read is reported and the rest go on.
    """
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
    with progress_bar(stderr=False, terminal_only=False) as progress:
        task = progress.add_task(f"ingesting into {store}", total=len(files))

        def on_file(path: Any, record: Any) -> None:
            progress.advance(task)
            if record is not None and record.status == "failed":
                progress.console.print(f"error: {record.error}", style="red", highlight=False)

        report = ingestor.ingest_paths(files, attributes=attributes, on_file=on_file)
    click.echo(f"{store}: {len(report.added)} file(s) added ({report.chunks} chunks, {report.chunks_per_second:.0f} chunks/s), "
               f"{len(report.unchanged)} unchanged, {len(report.failed)} failed")
    if report.failed:
        sys.exit(1)


@click.command()
@click.argument("question")
@click.option("--store", "stores", multiple=True, required=True, help="vector store name (repeatable)")
@click.option("--k", type=int, default=4, show_default=True, help="passages given to the model")
@model_options
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True)
@fail_cleanly
def ask(question: str, stores: tuple[str, ...], k: int, model: str | None, device: str | None, dtype: str | None,
        max_tokens: int, temperature: float) -> None:
    """Answer QUESTION from documents in vector stores, with numbered sources (file, page)."""
    from lamina.apps.rag import ask as rag_ask
    from lamina.llm import SamplingParams
    from lamina.llm.rag import Retriever

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    vector_stores, embedder = _rag_parts()
    llm = load_llm(model, device, dtype)
    answer = rag_ask(llm, Retriever(vector_stores, embedder), list(stores), question, k=k, params=params)
    for piece in answer.pieces:
        click.echo(piece, nl=False)
    click.echo("\n")
    click.echo("Sources:")
    for c in answer.citations:
        where = f", page {c.page}" if c.page is not None else ""
        click.echo(f"  [{c.index}] {c.filename}{where} (score {c.score:.3f}): {c.snippet}")


@click.group("eval")
def eval_group() -> None:
    """Evaluate parts of the stack on labelled data."""


@eval_group.command("retrieval")
@click.option("--store", required=True, help="vector store to search")
@click.option("--qa", default="pydoc", show_default=True, help="JSONL of {question, file[, page]}; `pydoc` is the shipped set")
@click.option("--k", type=int, default=5, show_default=True)
@fail_cleanly
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
