"""Vector search: how good and how fast is the store's index, and how fast is ingestion?

Questions, each answered in one run:
1. Random 384-d vectors (100k, L2-normalised; queries are stored vectors plus noise, so each has real near
   neighbours): recall@10 of HNSW (the index used from `HNSW_THRESHOLD` vectors on) against exact search,
   and p50/p99 latency of one query for exact (`IndexFlatIP`) and HNSW, at several efSearch values.
2. Exact-search latency against store size: where should a store switch from exact search to HNSW?
3. Real chunk embeddings (Python's bundled docs, `lamina ingest pydoc`, all-MiniLM-L6-v2): ingestion
   chunks/s end to end (load, clean, chunk, embed, store), then recall@10 of HNSW against exact on those
   vectors, and p50/p99 latency of a whole store query (SQLite + FTS5 + FAISS + fetching the hits) in each
   retrieval mode.

    python bench/search.py [--n 100000] [--queries 200] [--threads 2] [--skip-ingest]

Prints tables and writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _latencies(fn, queries: np.ndarray) -> tuple[float, float, list]:  # type: ignore[no-untyped-def]
    results, times = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), results


def _recall(exact: list[np.ndarray], approx: list[np.ndarray], k: int = 10) -> float:
    return float(np.mean([len(set(e[:k]) & set(a[:k])) / k for e, a in zip(exact, approx, strict=True)]))


def random_vectors(n: int, n_queries: int, dim: int = 384) -> dict:
    import faiss

    from lamina.infra import vector_index
    from lamina.infra.vector_index import VectorIndex

    rng = np.random.default_rng(0)
    data = _unit(rng.standard_normal((n, dim)))
    picks = rng.choice(n, n_queries, replace=False)
    queries = _unit(data[picks] + 0.6 * _unit(rng.standard_normal((n_queries, dim))))
    ids = np.arange(n, dtype=np.int64)
    flat = VectorIndex.build(Path("unused"), dim, 0, ids[:0], data[:0])  # an empty exact index, then fill it
    flat.add(ids, data, 0)
    p50_flat, p99_flat, exact = _latencies(lambda q: flat.search(q, 10)[1], queries)
    t = time.perf_counter()
    saved = vector_index.HNSW_THRESHOLD
    vector_index.HNSW_THRESHOLD = 0
    try:
        hnsw = VectorIndex.build(Path("unused"), dim, 0, ids, data)
    finally:
        vector_index.HNSW_THRESHOLD = saved
    build_s = time.perf_counter() - t
    saved_ef = vector_index.HNSW_EF_SEARCH
    rows = [{"index": "exact (IndexFlatIP)", "efSearch": None, "recall@10": 1.0, "p50_ms": p50_flat, "p99_ms": p99_flat}]
    for ef in (64, 256, 512, 1024):
        vector_index.HNSW_EF_SEARCH = ef  # read by VectorIndex.search at each call
        p50, p99, approx = _latencies(lambda q: hnsw.search(q, 10)[1], queries)
        rows.append({"index": f"HNSW M={vector_index.HNSW_M} efC={vector_index.HNSW_EF_CONSTRUCTION}", "efSearch": ef, "recall@10": _recall(exact, approx),
                     "p50_ms": p50, "p99_ms": p99})
    vector_index.HNSW_EF_SEARCH = saved_ef
    sizes = []
    for size in sorted({5_000, 20_000, 50_000, n}):
        index = faiss.IndexFlatIP(dim)
        index.add(data[:size])
        p50, p99, _ = _latencies(lambda q, index=index: index.search(q.reshape(1, -1), 10), queries[:100])
        sizes.append({"vectors": size, "exact_p50_ms": p50, "exact_p99_ms": p99})
    return {"n": n, "dim": dim, "queries": n_queries, "hnsw_build_s": build_s, "rows": rows, "exact_by_size": sizes}


def real_chunks(skip_ingest: bool) -> dict:
    from lamina.apps.rag import load_qa
    from lamina.foundation.corpora import export_pydoc
    from lamina.foundation.embeddings import Embedder
    from lamina.foundation.ingest import Ingestor
    from lamina.infra.db import open_database
    from lamina.infra.vector_index import VectorIndex
    from lamina.infra.vectorstore import VectorStores

    home = Path(tempfile.mkdtemp(prefix="lamina-bench-search-"))
    embedder = Embedder.load("all-minilm-l6-v2", device="cpu", dtype="float32", home=home)
    stores = VectorStores(open_database(home / "lamina.db"), home / "vector_stores")
    store = stores.create("pydoc", embedding_model=embedder.name, dim=embedder.dim)
    paths = export_pydoc(home / "corpora" / "pydoc")
    if skip_ingest:
        paths = paths[:10]
    report = Ingestor(stores, store, embedder).ingest_paths(paths)
    ids, vectors = stores._all_vectors(stores.get(store.id))
    questions = [item.question for item in load_qa("pydoc")]
    q_vectors = embedder.embed(questions)
    exact = VectorIndex.build(Path("unused"), embedder.dim, 0, ids, vectors)
    from lamina.infra import vector_index

    saved = vector_index.HNSW_THRESHOLD
    vector_index.HNSW_THRESHOLD = 0
    try:
        hnsw = VectorIndex.build(Path("unused"), embedder.dim, 0, ids, vectors)
    finally:
        vector_index.HNSW_THRESHOLD = saved
    _, _, exact_ids = _latencies(lambda q: exact.search(q, 10)[1], q_vectors)
    _, _, hnsw_ids = _latencies(lambda q: hnsw.search(q, 10)[1], q_vectors)
    modes = []
    for mode in ("vector", "bm25", "hybrid"):
        def run(i: int, mode: str = mode) -> object:
            return stores.search(store.id, query_vector=q_vectors[i], query_text=questions[i], k=10, mode=mode)  # type: ignore[arg-type]

        run(0)
        p50, p99, _ = _latencies(run, np.arange(len(questions)))
        modes.append({"mode": mode, "p50_ms": p50, "p99_ms": p99})
    embed_p50, embed_p99, _ = _latencies(lambda q: embedder.embed([q]), np.array(questions))
    return {
        "files": len(report.added), "chunks": report.chunks, "ingest_seconds": report.seconds,
        "ingest_chunks_per_s": report.chunks_per_second, "hnsw_recall@10": _recall(exact_ids, hnsw_ids),
        "store_query": modes, "query_embedding_p50_ms": embed_p50, "query_embedding_p99_ms": embed_p99,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ingest", action="store_true", help="ingest only 10 pydoc topics (quick check)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)

    rand = random_vectors(args.n, args.queries)
    print(f"\n1. {rand['n']:,} random {rand['dim']}-d vectors, {rand['queries']} queries, one at a time "
          f"(HNSW build {rand['hnsw_build_s']:.1f} s)")
    print(f"{'index':28} {'efSearch':>8} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rand["rows"]:
        print(f"{r['index']:28} {r['efSearch'] or '-':>8} {r['recall@10']:9.3f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    print("\n2. exact search latency by store size")
    for s in rand["exact_by_size"]:
        print(f"{s['vectors']:>9,} vectors: p50 {s['exact_p50_ms']:6.2f} ms  p99 {s['exact_p99_ms']:6.2f} ms")
    real = real_chunks(args.skip_ingest)
    print(f"\n3. pydoc through all-MiniLM-L6-v2 (float32): {real['files']} files, {real['chunks']} chunks, "
          f"ingested in {real['ingest_seconds']:.1f} s = {real['ingest_chunks_per_s']:.1f} chunks/s")
    print(f"   HNSW recall@10 against exact on the real chunks (45 questions): {real['hnsw_recall@10']:.3f}")
    print(f"   query embedding p50 {real['query_embedding_p50_ms']:.1f} ms, p99 {real['query_embedding_p99_ms']:.1f} ms")
    for m in real["store_query"]:
        print(f"   store query {m['mode']:7} (k=10): p50 {m['p50_ms']:.2f} ms  p99 {m['p99_ms']:.2f} ms (embedding not included)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"random": rand, "pydoc": real, "threads": args.threads}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
