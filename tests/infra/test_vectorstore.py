"""Vector stores on both backends: SQLite as the record, FTS5 for BM25, FAISS as a rebuildable cache; PostgreSQL with
its full-text search and pgvector; OpenAI's filters on both."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lamina.errors import InvalidRequestError
from lamina.infra import vector_index
from lamina.infra.vectorstore import ChunkRecord, FileRecord, NotFoundError, VectorStores, compile_filter

DIM = 16
WORDS = ["apple", "banana", "cherry", "delta", "echo", "falcon", "granite", "harbor", "island", "jungle"]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _chunks(texts: list[str], vectors: np.ndarray, **attrs) -> list[ChunkRecord]:  # type: ignore[no-untyped-def]
    return [
        ChunkRecord(t, page=i + 1, start=i * 100, end=i * 100 + len(t), n_tokens=len(t.split()), attributes=dict(attrs),
                    content_hash=hashlib.sha256(t.encode()).hexdigest(), embedding=v)
        for i, (t, v) in enumerate(zip(texts, vectors, strict=True))
    ]


@pytest.fixture
def stores(database, tmp_path) -> VectorStores:  # type: ignore[no-untyped-def]
    """On each backend: SQLite (FTS5, FAISS) and PostgreSQL (full-text search, pgvector)."""
    return VectorStores(database, tmp_path / "indexes")


def _faiss_only(stores: VectorStores) -> None:
    if stores.pg:
        pytest.skip("on PostgreSQL pgvector searches the vectors: there is no FAISS index")


@pytest.fixture
def filled(stores: VectorStores):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    store = stores.create("docs", embedding_model="test", dim=DIM)
    vectors = {}
    for f in range(5):
        texts = [f"{WORDS[f]} {WORDS[(f + j) % 10]} number {f}-{j}" for j in range(8)]
        vecs = _unit(rng, len(texts))
        stores.put_file(store.id, FileRecord(f"file-{f}", f"doc{f}.txt", "completed", sha256=f"h{f}",
                                             attributes={"author": f"a{f % 2}", "year": 2020 + f}), _chunks(texts, vecs))
        vectors[f"file-{f}"] = vecs
    return stores, store, vectors


def test_vector_search_is_exact_cosine(filled) -> None:  # type: ignore[no-untyped-def]
    stores, store, vectors = filled
    all_vecs = np.concatenate(list(vectors.values()))
    query = all_vecs[11] + 0.01
    query /= np.linalg.norm(query)
    hits = stores.search(store.id, query_vector=query, k=5, mode="vector")
    expected = np.sort(all_vecs @ query)[::-1][:5]
    np.testing.assert_allclose([h.score for h in hits], expected, rtol=1e-5)
    assert hits[0].file_id == "file-1" and hits[0].page == 4 and hits[0].filename == "doc1.txt"
    assert hits[0].attributes == {"author": "a1", "year": 2021}


def test_bm25_and_hybrid(filled) -> None:  # type: ignore[no-untyped-def]
    stores, store, vectors = filled
    hits = stores.search(store.id, query_text="granite harbor", k=10, mode="bm25")
    assert hits and all("granite" in h.text or "harbor" in h.text for h in hits)
    assert stores.search(store.id, query_text="zebra", mode="bm25") == []
    query = vectors["file-3"][0]
    hybrid = stores.search(store.id, query_vector=query, query_text="delta", k=5, mode="hybrid")
    assert hybrid[0].file_id == "file-3" and hybrid[0].score == pytest.approx(1.0)  # first in both lists
    assert all(0 < h.score <= 1.0 for h in hybrid)
    assert stores.search(store.id, query_text="what's the [delta]?! OR NOT (", mode="bm25")  # FTS syntax is quoted away


@pytest.mark.parametrize(
    ("spec", "files"),
    [
        ({"type": "eq", "key": "author", "value": "a0"}, {"file-0", "file-2", "file-4"}),
        ({"type": "ne", "key": "author", "value": "a0"}, {"file-1", "file-3"}),
        ({"type": "gt", "key": "year", "value": 2022}, {"file-3", "file-4"}),
        ({"type": "gte", "key": "year", "value": 2022}, {"file-2", "file-3", "file-4"}),
        ({"type": "lt", "key": "year", "value": 2021}, {"file-0"}),
        ({"type": "lte", "key": "year", "value": 2021}, {"file-0", "file-1"}),
        ({"type": "in", "key": "filename", "value": ["doc1.txt", "doc4.txt"]}, {"file-1", "file-4"}),
        ({"type": "nin", "key": "file_id", "value": ["file-0", "file-1", "file-2"]}, {"file-3", "file-4"}),
        ({"type": "and", "filters": [{"type": "eq", "key": "author", "value": "a0"}, {"type": "gt", "key": "year", "value": 2020}]},
         {"file-2", "file-4"}),
        ({"type": "or", "filters": [{"type": "eq", "key": "page", "value": 99}, {"type": "eq", "key": "year", "value": 2023}]},
         {"file-3"}),
    ],
)
@pytest.mark.parametrize("mode", ["vector", "bm25", "hybrid"])
def test_filters(filled, spec, files, mode) -> None:  # type: ignore[no-untyped-def]
    stores, store, vectors = filled
    query = vectors["file-0"][0]
    hits = stores.search(store.id, query_vector=query, query_text="number", k=40, mode=mode, filters=spec)
    assert {h.file_id for h in hits} == files
    if mode == "vector":
        assert len(hits) == 8 * len(files)  # a filtered search still finds everything that matches


def test_filtered_search_through_the_index(filled, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    stores, store, vectors = filled
    _faiss_only(stores)
    monkeypatch.setattr("lamina.infra.vectorstore.EXACT_FILTER_LIMIT", 0)
    spec = {"type": "eq", "key": "author", "value": "a1"}
    hits = stores.search(store.id, query_vector=vectors["file-1"][2], k=3, mode="vector", filters=spec)
    assert hits[0].file_id == "file-1" and {h.file_id for h in hits} <= {"file-1", "file-3"}


@pytest.mark.parametrize(
    "spec",
    [{"type": "like", "key": "a", "value": 1}, {"type": "eq", "value": 1}, {"type": "in", "key": "a", "value": []},
     {"type": "and", "filters": []}, {"type": "eq", "key": "a", "value": {"x": 1}}, "author = 1"],
)
def test_bad_filters_are_refused(spec) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError):
        compile_filter(spec)


def test_score_threshold_and_k(filled) -> None:  # type: ignore[no-untyped-def]
    stores, store, vectors = filled
    query = vectors["file-2"][5]
    hits = stores.search(store.id, query_vector=query, k=10, mode="vector", score_threshold=0.99)
    assert len(hits) == 1 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidRequestError, match="number of results"):
        stores.search(store.id, query_vector=query, k=0, mode="vector")
    with pytest.raises(InvalidRequestError, match="empty"):
        stores.search(store.id, query_vector=query, query_text="  ", mode="hybrid")


def test_replacing_and_removing_a_file_updates_every_index(filled) -> None:  # type: ignore[no-untyped-def]
    stores, store, _ = filled
    rng = np.random.default_rng(9)
    new = _unit(rng, 2)
    stores.put_file(store.id, FileRecord("file-0", "doc0.txt", "completed", sha256="h0b"), _chunks(["zebra one", "zebra two"], new))
    assert stores.file(store.id, "file-0").chunk_count == 2
    assert all(h.file_id != "file-0" for h in stores.search(store.id, query_text="apple", k=50, mode="bm25"))  # old text gone from FTS
    assert stores.search(store.id, query_vector=new[1], k=1, mode="vector")[0].text == "zebra two"
    assert stores.remove_file(store.id, "file-0") is True
    assert stores.search(store.id, query_text="zebra", mode="bm25") == []
    assert all(h.file_id != "file-0" for h in stores.search(store.id, query_vector=new[1], k=40, mode="vector"))
    assert stores.remove_file(store.id, "file-0") is False
    assert stores.db.query_one("SELECT COUNT(*) FROM vs_chunks WHERE file_id = 'file-0'")[0] == 0


def test_exact_duplicate_chunks_are_dropped(stores: VectorStores) -> None:
    store = stores.create("dups", embedding_model="test", dim=DIM)
    v = _unit(np.random.default_rng(1), 3)
    stores.put_file(store.id, FileRecord("a", "a.txt", "completed"), _chunks(["same text", "other", "same text"], v))
    rec = stores.file(store.id, "a")
    assert rec.chunk_count == 2 and rec.duplicate_chunks == 1


def test_index_is_rebuilt_when_missing_stale_or_corrupt(filled) -> None:  # type: ignore[no-untyped-def]
    stores, store, vectors = filled
    _faiss_only(stores)
    query = vectors["file-4"][1]
    expected = stores.search(store.id, query_vector=query, k=3, mode="vector")
    path = stores.index_dir / f"{store.id}.faiss"
    assert path.exists() and path.with_suffix(".json").exists()

    def fresh() -> VectorStores:  # another process: nothing cached in memory
        return VectorStores(stores.db, stores.index_dir)

    path.with_suffix(".json").unlink()
    assert fresh().search(store.id, query_vector=query, k=3, mode="vector") == expected
    path.write_bytes(b"garbage" * 10)
    assert fresh().search(store.id, query_vector=query, k=3, mode="vector") == expected
    # another process changes the store: this one's cached index is stale and must notice
    other = fresh()
    other.put_file(store.id, FileRecord("late", "late.txt", "completed"), _chunks(["late"], query.reshape(1, -1) * 1.0))
    assert stores.search(store.id, query_vector=query, k=1, mode="vector")[0].file_id in ("late", "file-4")
    assert len(stores.search(store.id, query_vector=query, k=50, mode="vector")) == 41


def test_hnsw_above_the_threshold(stores: VectorStores, monkeypatch) -> None:
    _faiss_only(stores)
    monkeypatch.setattr(vector_index, "HNSW_THRESHOLD", 50)
    store = stores.create("big", embedding_model="test", dim=DIM)
    v = _unit(np.random.default_rng(2), 200)
    stores.put_file(store.id, FileRecord("f", "f.txt", "completed"), _chunks([f"chunk {i}" for i in range(200)], v))
    assert stores.index(store.id).kind == "hnsw"
    hits = stores.search(store.id, query_vector=v[17], k=5, mode="vector")
    assert hits[0].text == "chunk 17"
    stores.remove_file(store.id, "f")  # HNSW cannot remove in place: rebuilt on the next search
    assert stores.search(store.id, query_vector=v[17], k=5, mode="vector") == []


def test_stores_lifecycle(stores: VectorStores) -> None:
    store = stores.create("one", embedding_model="m", dim=DIM, metadata={"team": "x"})
    assert stores.get("one") == stores.get(store.id)
    with pytest.raises(InvalidRequestError, match="already exists"):
        stores.create("one", embedding_model="m", dim=DIM)
    renamed = stores.update(store.id, name="two")
    assert renamed.name == "two" and renamed.metadata == {"team": "x"}
    stores.put_file(store.id, FileRecord("f", "f.txt", "completed"), _chunks(["x"], _unit(np.random.default_rng(3), 1)))
    assert stores.stats(store.id)["chunks"] == 1
    stores.delete(store.id)
    with pytest.raises(NotFoundError, match="No vector store"):
        stores.get(store.id)
    assert stores.db.query_one("SELECT COUNT(*) FROM vs_chunks")[0] == 0
    if not stores.pg:  # PostgreSQL's text index is a column of vs_chunks
        assert stores.db.query_one("SELECT COUNT(*) FROM vs_chunks_fts")[0] == 0


def test_postgresql_searches_each_store_through_its_own_hnsw_index(stores: VectorStores) -> None:
    if not stores.pg:
        pytest.skip("pgvector's HNSW is the PostgreSQL side")
    store = stores.create("ann", embedding_model="test", dim=DIM)
    v = _unit(np.random.default_rng(4), 3000)
    stores.put_file(store.id, FileRecord("f", "f.txt", "completed"), _chunks([f"chunk {i}" for i in range(3000)], v))
    queries = _unit(np.random.default_rng(5), 20)
    recall = []
    for q in queries:
        exact = set(np.argsort(-(v @ q))[:10])
        got = {int(h.text.split()[1]) for h in stores.search(store.id, query_vector=q, k=10, mode="vector")}
        recall.append(len(exact & got) / 10)
    assert np.mean(recall) >= 0.9
    dim, q = DIM, stores._vector_param(queries[0])
    plan = stores.db.query(f"EXPLAIN SELECT c.id FROM vs_chunks c WHERE c.store_id = '{store.id}' ORDER BY CAST(c.embedding AS "
                           f"vector({dim})) <#> CAST(? AS vector({dim})) LIMIT 10", [q])
    assert any("vs_hnsw_" in r[0] for r in plan), plan
    stores.delete(store.id)
    assert stores.db.query("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'vs_hnsw_%'") == []
