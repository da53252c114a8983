"""The RAG assistant: answers with numbered sources (`lamina ask`), and retrieval evaluation
(`lamina eval retrieval`): hit@k and MRR of vector, BM25 and hybrid search on a question set.

A question set is JSONL, one `{"question": ..., "file": "name.txt" | ["a.txt", "b.txt"], "page": 3}` per line
(`page` optional); a hit is a retrieved chunk from one of the expected files (and page). `pydoc` names the
set that ships with Lamina, written over Python's bundled documentation (`lamina ingest pydoc`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import InvalidRequestError
from lamina.llm import LLM, SamplingParams
from lamina.llm.rag import Citation, Retriever, citations, ground

PYDOC_QA = Path(__file__).parent / "evals" / "pydoc_qa.jsonl"
MODES = ("vector", "bm25", "hybrid")


@dataclass
class Answer:
    """The streamed answer (iterate `pieces`) and the sources it was given."""

    pieces: Iterator[str]
    citations: list[Citation]


def ask(llm: LLM, retriever: Retriever, stores: Sequence[str], question: str, *, k: int = 4,
        params: SamplingParams | None = None) -> Answer:
    cited = citations(retriever.search(stores, question, k=k))
    messages = ground([{"role": "user", "content": question}], cited)
    return Answer(llm.stream_chat(messages, params or SamplingParams(temperature=0, max_tokens=256)), cited)


@dataclass(frozen=True)
class QAItem:
    question: str
    files: frozenset[str]
    page: int | None = None


@dataclass(frozen=True)
class MethodScore:
    mode: str
    hit_at_k: float
    mrr: float
    questions: int


def load_qa(path: str | Path) -> list[QAItem]:
    path = PYDOC_QA if str(path) == "pydoc" else Path(path)
    items = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except OSError as e:
        raise InvalidRequestError(f"cannot read the question set {path}: {e.strerror}", param="qa") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            files = record["file"]
            files = [files] if isinstance(files, str) else list(files)
            items.append(QAItem(str(record["question"]), frozenset(files), record.get("page")))
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidRequestError(
                f"{path}, line {n}: expected {{\"question\": ..., \"file\": ...}} ({type(e).__name__}: {e})", param="qa"
            ) from None
    if not items:
        raise InvalidRequestError(f"{path} holds no questions", param="qa")
    return items


def evaluate_retrieval(retriever: Retriever, store: str, items: Sequence[QAItem], k: int = 5) -> list[MethodScore]:
    scores = []
    for mode in MODES:
        hits = reciprocal = 0.0
        for item in items:
            results = retriever.search([store], item.question, k=k, mode=mode)  # type: ignore[arg-type]
            for rank, (_, hit) in enumerate(results, start=1):
                if hit.filename in item.files and (item.page is None or hit.page == item.page):
                    hits += 1
                    reciprocal += 1 / rank
                    break
        scores.append(MethodScore(mode, hits / len(items), reciprocal / len(items), len(items)))
    return scores
