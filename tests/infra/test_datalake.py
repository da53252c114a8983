"""The data lake: versions, atomic commits (crashes included), manifests and hashes, lookup errors, SQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lamina.errors import InvalidRequestError
from lamina.infra import datalake as datalake_module
from lamina.infra.datalake import DataLake, DatasetCorruptError, DatasetNotFoundError


def _table(n: int, prefix: str = "doc", **extra: list[str]) -> pa.Table:
    return pa.table({
        "doc_id": [f"{prefix}-{i}" for i in range(n)],
        "text": [f"text of {prefix} number {i} " * 3 for i in range(n)],
        "source": ["unit-test"] * n,
        **extra,
    })


@pytest.fixture
def lake(tmp_path: Path) -> DataLake:
    return DataLake(tmp_path / "datalake")


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(child.stdout)


# --- versions and reading ---------------------------------------------------------------------------------


def test_versions_list_get_read(lake: DataLake) -> None:
    first = lake.write("docs", _table(3), {"sources": ["a.txt"], "steps": []})
    second = lake.write("docs", _table(5, "other"), {"sources": ["b.txt"], "steps": [{"step": "load", "removed": 0, "kept": 5}]})
    assert (first.version, second.version) == (1, 2)
    assert (lake.root / "docs" / "v1" / "data-00000.parquet").is_file()
    assert (lake.root / "docs" / "latest").read_text() == "v2\n"

    assert [(d.name, d.version, d.is_latest) for d in lake.list()] == [("docs", 2, True)]
    assert [(d.version, d.is_latest) for d in lake.list(all_versions=True)] == [(1, False), (2, True)]
    assert lake.get("docs").version == 2
    assert lake.get("docs", 1).documents == 3
    assert lake.read("docs").column("doc_id").to_pylist() == [f"other-{i}" for i in range(5)]
    assert lake.read("docs", 1).column("doc_id").to_pylist() == ["doc-0", "doc-1", "doc-2"]
    assert lake.parquet_files("docs", 1) == [lake.root / "docs" / "v1" / "data-00000.parquet"]


def test_manifest_has_counts_hashes_schema_and_the_callers_keys(lake: DataLake) -> None:
    table = _table(4, lang=["en", "en", "fr", "de"])
    version = lake.write("docs", table, {"sources": ["pydoc"], "steps": [{"step": "x"}], "version": 99, "counts": "ignored"})
    on_disk = json.loads((version.path / "manifest.json").read_text())
    assert on_disk == version.manifest
    assert on_disk["name"] == "docs" and on_disk["version"] == 1  # the lake's keys win over the caller's
    assert on_disk["sources"] == ["pydoc"] and on_disk["steps"] == [{"step": "x"}]
    texts = table.column("text").to_pylist()
    assert on_disk["counts"]["documents"] == 4
    assert on_disk["counts"]["characters"] == sum(len(t) for t in texts)
    assert on_disk["counts"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert [c["name"] for c in on_disk["schema"]] == ["doc_id", "text", "source", "lang"]
    assert set(on_disk["hashes"]) == {"data-00000.parquet"} and len(on_disk["hashes"]["data-00000.parquet"]) == 64
    assert on_disk["created_at"].endswith("Z")
    assert lake.read("docs").column("lang").to_pylist() == ["en", "en", "fr", "de"]


def test_large_versions_are_split_into_parts_read_back_in_order(tmp_path: Path) -> None:
    lake = DataLake(tmp_path / "lake", part_bytes=200)
    version = lake.write("big", _table(20), {})
    assert len(version.files) > 2
    assert [p.name for p in version.files] == [f"data-{i:05d}.parquet" for i in range(len(version.files))]
    assert lake.read("big").column("doc_id").to_pylist() == [f"doc-{i}" for i in range(20)]
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in version.files) == 20
    lake.verify("big")


def test_same_table_gives_the_same_parquet_bytes(lake: DataLake) -> None:
    a = lake.write("a", _table(10), {"sources": ["x"]})
    b = lake.write("b", _table(10), {"sources": ["y"]})
    assert a.manifest["hashes"] == b.manifest["hashes"]


# --- integrity --------------------------------------------------------------------------------------------


def test_verify_detects_tampering_missing_and_extra_files(lake: DataLake) -> None:
    version = lake.write("docs", _table(5), {})
    assert lake.verify("docs", 1).version == 1
    part = version.path / "data-00000.parquet"
    original = part.read_bytes()

    part.write_bytes(original[:-10] + b"x" * 10)
    with pytest.raises(DatasetCorruptError, match=r"docs v1 is corrupt: data-00000.parquet has sha256 .* but the manifest says"):
        lake.verify("docs")
    part.unlink()
    with pytest.raises(DatasetCorruptError, match=r"data-00000\.parquet is missing"):
        lake.verify("docs")
    part.write_bytes(original)
    (version.path / "data-00001.parquet").write_bytes(original)
    with pytest.raises(DatasetCorruptError, match=r"data-00001\.parquet is not in the manifest"):
        lake.verify("docs")


# --- atomic writes ----------------------------------------------------------------------------------------


def test_leftover_tmp_folder_is_ignored_then_cleaned(lake: DataLake) -> None:
    lake.write("docs", _table(2), {})
    crashed = lake.root / "docs" / f".v2.tmp-{_dead_pid()}-0badc0de"
    crashed.mkdir()
    (crashed / "data-00000.parquet").write_bytes(b"half a file")
    only_tmp = lake.root / "fresh" / f".v1.tmp-{_dead_pid()}-0badc0de"
    only_tmp.mkdir(parents=True)
    running = lake.root / "docs" / f".v2.tmp-{os.getppid()}-00c0ffee"  # a writer that is still running
    running.mkdir()

    assert [d.label for d in lake.list(all_versions=True)] == ["docs v1"]
    assert lake.get("docs").version == 1
    with pytest.raises(DatasetNotFoundError):
        lake.get("fresh")

    assert lake.write("docs", _table(3), {}).version == 2
    assert not crashed.exists() and running.exists()
    assert lake.write("fresh", _table(1), {}).version == 1
    assert not only_tmp.exists()


def test_a_failed_write_leaves_no_version_and_no_tmp(lake: DataLake, monkeypatch: pytest.MonkeyPatch) -> None:
    lake.write("docs", _table(2), {})

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datalake_module.pq, "write_table", broken)
    with pytest.raises(OSError, match="No space left"):
        lake.write("docs", _table(3), {})
    assert [p.name for p in (lake.root / "docs").iterdir() if p.name.startswith(".")] == []
    assert lake.get("docs").version == 1


def test_killed_before_the_commit_leaves_only_an_invisible_tmp(lake: DataLake) -> None:
    lake.write("docs", _table(2), {})
    # A writer process that dies (os._exit: no cleanup, like kill -9) at the moment it would commit.
    script = (
        "import os, sys\n"
        "import pyarrow as pa\n"
        "from lamina.infra import datalake\n"
        "datalake.os.rename = lambda *a: os._exit(9)\n"
        "table = pa.table({'doc_id': ['x'], 'text': ['t'], 'source': ['s']})\n"
        "datalake.DataLake(sys.argv[1]).write('docs', table, {})\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(lake.root)], capture_output=True, text=True, timeout=60)
    assert child.returncode == 9, child.stderr
    leftovers = [p for p in (lake.root / "docs").iterdir() if p.name.startswith(".v2.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()  # complete, but never committed

    assert lake.get("docs").version == 1 and len(lake.list(all_versions=True)) == 1
    assert lake.write("docs", _table(4), {}).version == 2
    assert not leftovers[0].exists()


def test_a_writer_that_loses_the_race_for_a_number_takes_the_next(lake: DataLake, monkeypatch: pytest.MonkeyPatch) -> None:
    original = DataLake._write_parts
    raced = []

    def write_parts_then_race(self: DataLake, tmp: Path, table: pa.Table) -> dict[str, str]:
        hashes = original(self, tmp, table)
        if not raced:  # another writer commits v1 while this one is still writing it
            raced.append(None)
            raced[0] = DataLake(self.root).write("docs", _table(1, "rival"), {})
        return hashes

    monkeypatch.setattr(DataLake, "_write_parts", write_parts_then_race)
    mine = lake.write("docs", _table(3), {})
    assert raced[0].version == 1 and mine.version == 2
    assert mine.manifest["version"] == 2
    assert lake.read("docs", 1).column("doc_id").to_pylist() == ["rival-0"]
    assert lake.read("docs", 2).num_rows == 3


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../escape", ".hidden", "has space", "a/b", "x" * 129, "quote\"d"])
def test_invalid_names_are_refused(lake: DataLake, name: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid dataset name"):
        lake.write(name, _table(1), {})


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (pa.table({"doc_id": ["a"], "text": ["t"]}), r"lacks the column\(s\) \['source'\]"),
        (pa.table({"doc_id": ["a"], "text": ["t"], "source": ["s"], "n": [1]}), "column 'n' is int64"),
        (pa.table({"doc_id": ["a", "b"], "text": ["t", None], "source": ["s", "s"]}), "column 'text' has 1 null"),
        (pa.table({"doc_id": ["a", "a"], "text": ["t", "u"], "source": ["s", "s"]}), "doc_id 'a' appears more than once"),
    ],
)
def test_bad_tables_are_refused(lake: DataLake, table: pa.Table, expected: str) -> None:
    with pytest.raises(InvalidRequestError, match=expected):
        lake.write("docs", table, {})
    assert lake.list() == []


def test_names_differing_only_in_case_are_refused(lake: DataLake) -> None:
    lake.write("Docs", _table(1), {})
    with pytest.raises(InvalidRequestError, match="differs from the existing 'Docs' only in case"):
        lake.write("docs", _table(1), {})


def test_unknown_dataset_and_version_errors_list_what_exists(lake: DataLake) -> None:
    with pytest.raises(DatasetNotFoundError, match="datasets: none yet"):
        lake.get("docs")
    lake.write("docs", _table(1), {})
    lake.write("docs", _table(2), {})
    lake.write("web-text", _table(1), {})
    with pytest.raises(DatasetNotFoundError, match=r"no dataset 'nope' .*datasets: docs, web-text") as err:
        lake.read("nope")
    assert err.value.status_code == 404 and isinstance(err.value, LookupError) and "\n" not in err.value.message
    with pytest.raises(DatasetNotFoundError, match="dataset 'docs' has no version 7; versions: v1, v2"):
        lake.get("docs", 7)


# --- SQL --------------------------------------------------------------------------------------------------


def test_sql_has_a_view_per_dataset_on_its_latest_version(lake: DataLake) -> None:
    lake.write("docs", _table(2), {})
    lake.write("docs", _table(4), {})
    lake.write("web-text", _table(3, "web", lang=["en", "fr", "en"]), {})
    columns, rows = lake.sql('SELECT count(*) AS n FROM docs')
    assert columns == ["n"] and rows == [(4,)]
    columns, rows = lake.sql('SELECT lang, count(*) FROM "web-text" GROUP BY lang ORDER BY lang')
    assert rows == [("en", 2), ("fr", 1)]
    _, rows = lake.sql("SELECT d.doc_id FROM docs d JOIN \"web-text\" w ON d.source = w.source ORDER BY 1 LIMIT 1")
    assert rows == [("doc-0",)]
    _, rows = lake.sql("SELECT doc_id FROM docs ORDER BY doc_id", limit=2)
    assert rows == [("doc-0",), ("doc-1",)]
    _, rows = lake.sql("SHOW TABLES")
    assert sorted(r[0] for r in rows) == ["docs", "web-text"]


def test_sql_on_an_empty_lake(lake: DataLake) -> None:
    assert lake.sql("SELECT 42") == (["42"], [(42,)])
    with pytest.raises(InvalidRequestError, match=r"dataset views: none \(no datasets yet\)"):
        lake.sql("SELECT * FROM docs")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELEC 1", r'SQL error: Parser Error: syntax error at or near "SELEC"; dataset views: docs, "my-data" \(names with "-" or "." need the double quotes\)$'),
        ("SELECT * FROM nope", r"SQL error: Catalog Error: Table with name nope does not exist!; dataset views: "),
        ("SELECT * FROM my-data", r'syntax error at or near "-"; dataset views: docs, "my-data" \(names with'),
        ("SELECT nocol FROM docs", r'Referenced column "nocol" not found .*; dataset views: docs, "my-data"'),
        ("SELECT 1; SELECT 2", r"one SQL statement at a time \(got 2\)"),
        ("COPY (SELECT 1) TO 'out.csv'", "not COPY: the lake changes only through `lamina data ingest`"),
        ("CREATE TABLE t AS SELECT 1", "not CREATE"),
        ("DROP VIEW docs", "not DROP"),
        ("SET enable_external_access = true", "not SET|not VARIABLE_SET"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ],
)
def test_sql_errors_are_one_line_and_list_the_views(lake: DataLake, query: str, expected: str) -> None:
    lake.write("docs", _table(1), {})
    lake.write("my-data", _table(1), {})
    with pytest.raises(InvalidRequestError, match=expected) as err:
        lake.sql(query)
    assert "\n" not in err.value.message and err.value.param == "query"
    assert not (Path.cwd() / "out.csv").exists()
    assert lake.read("docs").num_rows == 1  # nothing changed
