"""`lamina ingest`, `lamina ask` and `lamina eval retrieval` as users run them, crash included."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.foundation.test_documents import encrypt_pdf, make_pdf

pytestmark = pytest.mark.e2e

TOPICS = ["volcanoes", "glaciers", "deserts", "rainforests", "coral reefs", "tundra", "savannas", "wetlands"]


def lamina(home: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAMINA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _corpus(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        text = "\n\n".join(f"Document {i} is about {topic}. Paragraph {p} notes fact number {i * 10 + p} about {topic}, "
                           f"which matters for field study {i}-{p}." for p in range(6))
        path = folder / f"doc{i:03d}.txt"
        path.write_text(text)
        paths.append(path)
    return paths


def _check_consistent(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    files = db.execute("SELECT COUNT(*), COUNT(DISTINCT source) FROM vs_files").fetchone()
    assert files[0] == files[1], "a file is present twice"
    orphans = db.execute("SELECT COUNT(*) FROM vs_chunks c LEFT JOIN vs_files f ON f.store_id = c.store_id AND f.file_id = c.file_id "
                         "WHERE f.file_id IS NULL").fetchone()[0]
    assert orphans == 0, "chunks without their file"
    mismatched = db.execute("SELECT COUNT(*) FROM vs_files f WHERE chunk_count != (SELECT COUNT(*) FROM vs_chunks c "
                            "WHERE c.store_id = f.store_id AND c.file_id = f.file_id)").fetchone()[0]
    assert mismatched == 0, "a file whose chunks are partly there"
    chunks = db.execute("SELECT COUNT(*) FROM vs_chunks").fetchone()[0]
    assert db.execute("SELECT COUNT(*) FROM vs_chunks_fts").fetchone()[0] == chunks
    return {"files": files[0], "chunks": chunks}


def test_kill_9_during_ingest_then_rerun(tmp_path) -> None:
    home = tmp_path / "home"
    paths = _corpus(tmp_path / "docs", 48)
    env = {**os.environ, "LAMINA_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "ingest", str(tmp_path / "docs"), "--store", "crash"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = home / "lamina.db"
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            done = sqlite3.connect(db_path, timeout=1).execute("SELECT COUNT(*) FROM vs_files").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 6:
            break
    assert proc.poll() is None, "ingest finished before it could be killed; use more files"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _check_consistent(db_path)
    assert 6 <= partial["files"] < len(paths)

    rerun = lamina(home, "ingest", str(tmp_path / "docs"), "--store", "crash")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(paths) - partial['files']} file(s) added" in rerun.stdout and f"{partial['files']} unchanged" in rerun.stdout
    final = _check_consistent(db_path)
    assert final["files"] == len(paths)

    from lamina.foundation.embeddings import Embedder
    from lamina.infra.db import open_database
    from lamina.infra.vectorstore import VectorStores

    stores = VectorStores(open_database(db_path), home / "vector_stores")
    index = stores.index("crash")
    assert index.size == final["chunks"]
    question = "fact number 455 about tundra"  # doc045 is about tundra, and only it holds fact 455
    query = Embedder.load("all-minilm-l6-v2", home=home).embed([question])[0]
    assert stores.search("crash", query_text=question, k=3, mode="bm25")[0].filename == "doc045.txt"
    assert stores.search("crash", query_vector=query, query_text=question, k=3)[0].filename == "doc045.txt"


def test_ingest_reports_bad_files_and_goes_on(tmp_path) -> None:
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    _corpus(docs, 2)
    (docs / "empty.txt").write_bytes(b"")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage")
    (docs / "secret.pdf").write_bytes(encrypt_pdf(make_pdf(["top secret"]), "hunter2"))
    (docs / "good.pdf").write_bytes(make_pdf(["Penguins live in the southern hemisphere.", "Emperor penguins breed in winter."]))
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    result = lamina(home, "ingest", str(docs), str(tmp_path / "notes.docx"), "--store", "mixed", "--attr", "team=geo")
    assert result.returncode == 1
    assert "3 file(s) added" in result.stdout and "4 failed" in result.stdout
    for expected in ("empty.txt", "broken.pdf", "secret.pdf", "encrypted", "notes.docx", "unsupported"):
        assert expected in result.stdout + result.stderr, expected
    again = lamina(home, "ingest", str(docs), "--store", "mixed")
    assert "0 file(s) added" in again.stdout and "3 unchanged" in again.stdout  # failed files are retried, unchanged ones skipped

    (docs / "doc000.txt").write_text("Document zero now only talks about comets and their tails.")
    changed = lamina(home, "ingest", str(docs / "doc000.txt"), "--store", "mixed")
    assert "1 file(s) added" in changed.stdout
    db = sqlite3.connect(home / "lamina.db")
    texts = [r[0] for r in db.execute("SELECT c.text FROM vs_chunks c JOIN vs_files f USING (store_id, file_id) WHERE f.filename = 'doc000.txt'")]
    assert texts == ["Document zero now only talks about comets and their tails."]
    attrs = {json.loads(r[0]).get("team") for r in db.execute("SELECT attributes FROM vs_chunks")}
    assert "geo" in attrs


def test_ask_answers_with_numbered_sources(tmp_path) -> None:
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "mascot.txt").write_text("The Lamina project's mascot is a basalt tortoise named Quill.")
    (docs / "manual.pdf").write_bytes(make_pdf(["Chapter one: installing.", "To reset the device, hold the red button for ten seconds."]))
    assert lamina(home, "ingest", str(docs), "--store", "kb").returncode == 0
    result = lamina(home, "ask", "How do I reset the device?", "--store", "kb", "--k", "2")
    assert result.returncode == 0, result.stderr
    answer, sources = result.stdout.split("Sources:")
    assert "button" in answer.lower()
    first = sources.strip().splitlines()[0]
    assert first.startswith("[1] manual.pdf, page 2 (score") and "red button" in first
    bad = lamina(home, "ask", "  ", "--store", "kb")
    assert bad.returncode == 2 and "query is empty" in bad.stderr
    unknown = lamina(home, "ask", "hi", "--store", "nope")
    assert unknown.returncode == 2 and "No vector store 'nope'" in unknown.stderr and "kb" in unknown.stderr


def test_eval_retrieval_reports_three_methods(tmp_path) -> None:
    home = tmp_path / "home"
    _corpus(tmp_path / "docs", 8)
    assert lamina(home, "ingest", str(tmp_path / "docs"), "--store", "ev").returncode == 0
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": f"fact number {i * 10 + 3} about {TOPICS[i]}", "file": f"doc{i:03d}.txt"})
                            for i in range(8)))
    result = lamina(home, "eval", "retrieval", "--store", "ev", "--qa", str(qa), "--k", "3")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"vector", "bm25", "hybrid"}
    assert all(0.0 <= hit <= 1.0 and 0.0 <= mrr <= hit for hit, mrr in rows.values())
    assert rows["bm25"][0] == 1.0  # the exact fact numbers are lexical matches
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "x"}\n')
    bad = lamina(home, "eval", "retrieval", "--store", "ev", "--qa", str(broken))
    assert bad.returncode == 2 and "line 1" in bad.stderr


def test_shipped_pydoc_question_set_is_well_formed() -> None:
    from lamina.apps.rag import load_qa
    from lamina.foundation.corpora import pydoc_topics

    items = load_qa("pydoc")
    topics = {f"{t}.txt" for t in pydoc_topics()}
    assert len(items) >= 40 and all(item.files <= topics for item in items)
    assert np.mean([len(i.question.split()) for i in items]) > 6
