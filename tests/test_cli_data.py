"""`lamina data ingest|list|show|sql` as users run them: a real process, LAMINA_HOME in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def lamina(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAMINA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "lamina", "data", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def _sources(folder: Path) -> Path:
    folder.mkdir()
    sentence = "The {0} team wrote note {1} about the {0} river, the bridge over it, and the road to town {1}."
    for i in range(3):
        (folder / f"note{i}.txt").write_text(" ".join(sentence.format(w, i * 10 + j) for j, w in enumerate(["north", "south", "east"])))
    (folder / "copy.md").write_text((folder / "note0.txt").read_text())  # an exact duplicate
    (folder / "tiny.txt").write_text("too short")
    records = [{"text": f"Record {i}: ada{i}@example.org wrote about lanterns, meadows and glaciers in volume {i}, "
                        f"chapter {i * 3}, on page {i * 7} of the journal kept in the old harbor library."} for i in range(2)]
    (folder / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def test_ingest_list_show_sql(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _sources(tmp_path / "docs")

    ingest = lamina(home, "ingest", "docs", "--dataset", "my-notes", "--scrub-pii", cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    out = ingest.stdout
    for step, removed, kept in (("load", 0, 7), ("min_chars", 1, 6), ("exact_dedup", 1, 5), ("scrub_pii", 0, 5)):
        assert any(line.split()[:3] == [step, str(removed), str(kept)] for line in out.splitlines()), (step, out)
    assert "e.g. docs/note0.txt = docs/copy.md" in out  # the first copy in sorted order stays and "email=2" in out
    assert "my-notes v1: 5 documents" in out and str(home / "datalake" / "my-notes" / "v1") in out
    assert ingest.stderr == ""

    again = lamina(home, "ingest", "docs", "--dataset", "my-notes", "--min-chars", "0", "--min-words", "0", "--no-dedup",
                   "--no-near-dedup", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "my-notes v2: 7 documents" in again.stdout

    listed = lamina(home, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [r[:3] for r in rows] == [["my-notes", "v2", "7"]]
    every = lamina(home, "list", "--all")
    assert [line.split()[:2] for line in every.stdout.splitlines()[1:]] == [["my-notes", "v1"], ["my-notes", "v2"]]

    show = lamina(home, "show", "my-notes", "--version", "1", "--verify", "--docs", "5")
    assert show.returncode == 0, show.stderr
    assert show.stdout.startswith("my-notes v1  created ")
    assert "sources: docs" in show.stdout and "documents 5" in show.stdout and "verified" in show.stdout
    assert "--- docs/copy.md\nThe north team wrote note 0" in show.stdout  # sorted: copy.md comes first
    assert "--- docs/records.jsonl:2\nRecord 1: <EMAIL> wrote about lanterns" in show.stdout
    assert "--- docs/tiny.txt" not in show.stdout

    sql = lamina(home, "sql", 'SELECT source, count(*) AS n FROM "my-notes" GROUP BY source ORDER BY n DESC, source')
    assert sql.returncode == 0, sql.stderr
    lines = sql.stdout.splitlines()
    assert lines[0].split() == ["source", "n"] and lines[1].split() == ["docs/records.jsonl", "2"]
    assert len(lines) == 1 + 6 and sql.stderr.strip() == "(6 rows)"
    limited = lamina(home, "sql", 'SELECT doc_id FROM "my-notes" ORDER BY doc_id', "--limit", "2")
    assert len(limited.stdout.splitlines()) == 3 and "more not shown (--limit 2)" in limited.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["show", "nope"], "no dataset 'nope' in the data lake"),
        (["sql", "SELECT * FROM nope"], "Table with name nope does not exist!; dataset views: none (no datasets yet)"),
        (["sql", "DELETE FROM x"], "not DELETE"),
        (["ingest", "missing-folder", "--dataset", "x"], "no such file or folder: 'missing-folder'"),
        (["ingest", "pydoc", "--dataset", "x", "--min-chars", "100000", "--max-chars", "200000"],
         "dataset 'x' is empty: all 79 documents were removed by the min_chars filter (min_chars=100000); lower --min-chars"),
        (["ingest", "pydoc", "--dataset", "x", "--max-symbol-ratio", "2"], "max_symbol_ratio (--max-symbol-ratio) must be between 0 and 1"),
        (["ingest", "pydoc", "--dataset", "../up"], "invalid dataset name '../up'"),
    ],
)
def test_errors_are_one_line_with_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = lamina(tmp_path / "home", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
