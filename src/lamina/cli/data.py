"""`lamina data ...`: training datasets in the data lake (LAMINA_HOME/datalake): raw text cleaned into
versioned Parquet, listed, shown and queried with SQL."""

from __future__ import annotations

import sys
from typing import Any

import click

from lamina.cli.common import fail_cleanly, human, progress_bar
from lamina.settings import get_settings


@click.group("data")
def data_group() -> None:
    """Training datasets: raw text cleaned into versioned Parquet in LAMINA_HOME/datalake, and SQL over them."""


def _lake() -> Any:
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
@fail_cleanly
def data_ingest(sources: tuple[str, ...], name: str, text_field: str | None, min_chars: int, max_chars: int, min_words: int,
                max_words: int, max_symbol_ratio: float, max_repeated_lines: float, no_dedup: bool, no_near_dedup: bool,
                scrub_pii: bool) -> None:
    """Clean SOURCES (.txt .md .jsonl .csv files, folders of them, or `pydoc`) into a new version of a dataset."""
    from lamina.foundation.data import CleaningOptions, build_dataset

    options = CleaningOptions(
        text_field=text_field, min_chars=min_chars, max_chars=max_chars, min_words=min_words, max_words=max_words,
        max_symbol_ratio=max_symbol_ratio, max_repeated_line_ratio=max_repeated_lines, dedup=not no_dedup,
        near_dedup=not no_near_dedup, scrub_pii=scrub_pii,
    )
    with progress_bar() as progress:
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
@fail_cleanly
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
@fail_cleanly
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
               f"bytes {counts.get('bytes', 0):,}  parquet {human(counts.get('parquet_bytes'), 'B')}")
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
@fail_cleanly
def data_sql(query: str, limit: int) -> None:
    """Run a read-only SQL query (DuckDB) over the latest version of each dataset, e.g.
    lamina data sql 'SELECT source, count(*) FROM "pydoc-clean" GROUP BY 1'."""
    columns, rows = _lake().sql(query, limit=max(0, limit) + 1)
    _print_rows(columns, rows[:limit], right=tuple(c for i, c in enumerate(columns) if rows and isinstance(rows[0][i], int | float)))
    more = f"; more not shown (--limit {limit})" if len(rows) > limit else ""
    click.echo(f"({min(len(rows), limit)} row{'s' if min(len(rows), limit) != 1 else ''}{more})", err=True)
