"""Token-aware chunking with the embedding model's own WordPiece tokenizer, dedup, and text cleaning."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend

from lamina.errors import InvalidRequestError
from lamina.foundation.chunking import Chunk, chunk_document, content_hash, dedupe_chunks
from lamina.foundation.documents import Document, clean_text, document_text, load_document
from lamina.foundation.tokenizer import Tokenizer, _bytes_to_unicode
from tests.foundation.test_documents import make_pdf

WORDS = (
    "the", "a", "retrieval", "model", "reads", "documents", "and", "answers", "questions", "with", "citations",
    "from", "pages", "unbelievably", "tokenization", "embeddings", "café", "naïve", "q\u0301uiet", "東京", "🙂",
    "x2", "well-known", "don't",
    "tax\u0301", "odd\ufffd",  # WordPiece drops this accent and U+FFFD: no token covers them
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lamina.infra.registry import Registry

    return Registry(tmp_path_factory.mktemp("home")).resolve("all-minilm-l6-v2").path / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="module")
def count(tokenizer_path: Path):  # type: ignore[no-untyped-def]
    """An independent token counter: the same tokenizer.json with truncation and padding switched off."""
    backend = Backend.from_file(str(tokenizer_path))
    backend.no_truncation()
    backend.no_padding()
    return lambda text: len(backend.encode(text, add_special_tokens=False).ids)


ASCII_WORDS = tuple(w for w in WORDS if w.isascii())


def prose(seed: int, paragraphs: int, terminators: str = ".?!", sentences: int = 0, words: tuple[str, ...] = WORDS) -> str:
    """Random sentences from `words`; `sentences` per paragraph, or 1 to 9 when 0."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        paragraph = [
            " ".join(rng.choice(words) for _ in range(rng.randint(4, 25))).capitalize() + rng.choice(terminators)
            for _ in range(sentences or rng.randint(1, 9))
        ]
        out.append(" ".join(paragraph))
    return "\n\n".join(out)


def txt(text: str, name: str = "doc.txt") -> Document:
    return load_document(name, data=text.encode("utf-8"))


def sections_of(doc: Document, chunk: Chunk) -> list[int]:
    return [i for i, s in enumerate(doc.sections) if s.start <= chunk.start and chunk.end <= s.start + len(s.text)]


def check_invariants(doc: Document, chunks: list[Chunk], max_tokens: int, overlap: int, count) -> None:  # type: ignore[no-untyped-def]
    full = document_text(doc)
    for chunk in chunks:
        assert chunk.text == full[chunk.start : chunk.end]
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.n_tokens == count(chunk.text) <= max_tokens, chunk
        [i] = sections_of(doc, chunk)  # inside exactly one section
        assert (chunk.page, chunk.attributes) == (doc.sections[i].page, doc.sections[i].attributes)
        assert chunk.content_hash == content_hash(chunk.text)
    # Coverage: every character of every section (with overlap 0: every visible one) is in some chunk.
    covered = bytearray(len(full))
    for chunk in chunks:
        covered[chunk.start : chunk.end] = b"\x01" * (chunk.end - chunk.start)
    for section in doc.sections:
        for offset, char in enumerate(section.text, start=section.start):
            if overlap > 0 or not char.isspace():
                assert covered[offset], (offset, char, full[offset - 20 : offset + 20])


# --- size, coverage, location ----------------------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "overlap"), [(200, 40), (64, 10), (16, 0), (33, 15), (40, 20)])
def test_chunks_fit_cover_and_point_at_their_text(tokenizer, count, max_tokens: int, overlap: int) -> None:  # type: ignore[no-untyped-def]
    doc = txt(prose(1, 30))
    assert count(document_text(doc)) > 5 * max_tokens
    chunks = chunk_document(doc, tokenizer, max_tokens=max_tokens, overlap=overlap)
    assert len(chunks) > 5
    check_invariants(doc, chunks, max_tokens, overlap, count)
    assert sum(c.n_tokens for c in chunks) / len(chunks) > 0.6 * max_tokens  # not needlessly small


def test_counting_is_not_truncated_or_padded(tokenizer, count) -> None:  # type: ignore[no-untyped-def]
    backend = tokenizer.backend
    assert backend.truncation is not None and backend.padding is not None  # what makes this test meaningful
    text = " ".join(WORDS[i % 7] for i in range(170))  # ~170 tokens: above the file's 128-token truncation
    [chunk] = chunk_document(txt(text), tokenizer)
    assert chunk.n_tokens == count(text) > 128
    [short] = chunk_document(txt("Hello world."), tokenizer)
    assert short.n_tokens == 3  # no [PAD]s counted
    long_doc = txt(" ".join(WORDS[i % 7] for i in range(1000)))
    chunks = chunk_document(long_doc, tokenizer)
    assert len(chunks) >= 5 and all(c.n_tokens <= 200 for c in chunks)
    assert chunks[-1].end == len(document_text(long_doc))
    # The caller's tokenizer keeps its settings: the encoder still needs them.
    assert backend.truncation is not None and backend.truncation["max_length"] == 128 and backend.padding is not None


def test_consecutive_chunks_of_a_section_overlap(tokenizer, count) -> None:  # type: ignore[no-untyped-def]
    doc = txt(prose(2, 1, terminators=",", sentences=30))  # one long paragraph of one long sentence
    chunks = chunk_document(doc, tokenizer, max_tokens=100, overlap=30)
    assert len(chunks) >= 4
    full = document_text(doc)
    for prev, nxt in itertools.pairwise(chunks):
        assert prev.start < nxt.start < prev.end < nxt.end
        shared = count(full[nxt.start : prev.end])
        assert 30 <= shared <= 36, (shared, full[nxt.start : prev.end])  # ~overlap, moved back to a word start
    no_overlap = chunk_document(doc, tokenizer, max_tokens=100, overlap=0)
    assert all(p.end < n.start for p, n in itertools.pairwise(no_overlap))


def test_chunks_never_span_pages_or_records(tokenizer, count) -> None:  # type: ignore[no-untyped-def]
    pages = [prose(10 + i, 1, sentences=8, words=ASCII_WORDS).replace(". ", ".\n") for i in range(3)]
    pdf = load_document("book.pdf", data=make_pdf([pages[0], "", pages[1], pages[2]]))
    assert [s.page for s in pdf.sections] == [1, 3, 4]
    chunks = chunk_document(pdf, tokenizer, max_tokens=48, overlap=8)
    check_invariants(pdf, chunks, 48, 8, count)
    assert {c.page for c in chunks} == {1, 3, 4}
    assert all(c.page is not None for c in chunks)

    records = [{"text": prose(20 + i, 2), "source": f"s{i}", "score": i / 2} for i in range(4)]
    jsonl = load_document("r.jsonl", data="\n".join(json.dumps(r) for r in records).encode())
    chunks = chunk_document(jsonl, tokenizer, max_tokens=40, overlap=10)
    check_invariants(jsonl, chunks, 40, 10, count)
    assert {c.attributes["row"] for c in chunks} == {1, 2, 3, 4}
    assert all(c.attributes["source"] == f"s{int(c.attributes['row']) - 1}" for c in chunks)


def test_short_sections_are_one_chunk_each(tokenizer) -> None:  # type: ignore[no-untyped-def]
    doc = load_document("p.csv", data=b"text,id\nFirst row.,a\nSecond row.,b\n")
    chunks = chunk_document(doc, tokenizer)
    assert [(c.text, c.start, c.end, c.attributes) for c in chunks] == [
        ("First row.", 0, 10, {"id": "a", "row": 1}),
        ("Second row.", 12, 23, {"id": "b", "row": 2}),
    ]


# --- where cuts fall --------------------------------------------------------------------------------------

SENTENCE = "alpha beta gamma delta epsilon zeta eta."  # 8 tokens


def test_cuts_prefer_sentence_ends(tokenizer, count) -> None:  # type: ignore[no-untyped-def]
    assert count(SENTENCE) == 8
    doc = txt(" ".join([SENTENCE] * 40))
    chunks = chunk_document(doc, tokenizer, max_tokens=50, overlap=5)
    assert len(chunks) > 5
    assert all(c.text.endswith(".") for c in chunks)
    exact = chunk_document(doc, tokenizer, max_tokens=50, overlap=0)
    assert all(c.n_tokens == 48 for c in exact[:-1])  # six sentences; the 50-token window would cut one
    # The same words without full stops end wherever the window ends, between two words.
    plain = txt(" ".join([SENTENCE.rstrip(".")] * 40))
    full = document_text(plain)
    cut = chunk_document(plain, tokenizer, max_tokens=50, overlap=5)
    assert [c.n_tokens for c in cut[:-1]] == [50] * (len(cut) - 1)
    assert all(full[c.end] == " " and (c.start == 0 or full[c.start - 1] == " ") for c in cut[:-1])


def test_cuts_prefer_a_paragraph_break_to_a_later_sentence_end(tokenizer) -> None:  # type: ignore[no-untyped-def]
    first = " ".join([SENTENCE] * 5)  # 40 tokens, then a paragraph break
    doc = txt(first + "\n\n" + " ".join([SENTENCE] * 5))
    chunks = chunk_document(doc, tokenizer, max_tokens=48, overlap=0)
    assert chunks[0].text == first  # not the 48-token cut one sentence into the next paragraph
    line = txt(first + "\nnext line goes on and on and on with no end in sight at all")
    assert chunk_document(line, tokenizer, max_tokens=48, overlap=0)[0].text == first


def test_words_are_never_cut(tokenizer, count) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(["unbelievably tokenization"] * 60)  # 5 + 2 WordPiece tokens per pair
    doc = txt(text)
    for overlap in (0, 7):
        chunks = chunk_document(doc, tokenizer, max_tokens=20, overlap=overlap)
        check_invariants(doc, chunks, 20, overlap, count)
        for c in chunks:
            assert set(c.text.split()) <= {"unbelievably", "tokenization"}
            assert c.start == 0 or text[c.start - 1] == " "
    # Without spaces, a cut still falls at punctuation rather than between a word's pieces.
    hyphens = txt("-".join(["unbelievably"] * 40))
    for overlap in (0, 7):
        chunks = chunk_document(hyphens, tokenizer, max_tokens=20, overlap=overlap)
        check_invariants(hyphens, chunks, 20, overlap, count)
        assert all(set(c.text.split("-")) <= {"unbelievably", ""} for c in chunks)


def test_any_tokenizer_and_words_longer_than_a_chunk() -> None:
    """A byte-level BPE with no merges (every byte a token, a CJK character three), on text whose "words"
    are longer than a chunk: cuts fall between tokens, even inside a character's bytes, and the counts
    still hold when each chunk is tokenised on its own."""
    table = _bytes_to_unicode()
    tokenizer = Tokenizer.byte_level_bpe([table[b] for b in range(256)], [])
    backend = tokenizer.backend

    def count(text: str) -> int:
        return len(backend.encode(text, add_special_tokens=False).ids)

    doc = txt("東京は日本の首都です。" * 30 + "\n\n" + "x" * 300 + " short words here. " * 10)
    for max_tokens, overlap in ((16, 0), (50, 20)):
        chunks = chunk_document(doc, tokenizer, max_tokens=max_tokens, overlap=overlap)
        check_invariants(doc, chunks, max_tokens, overlap, count)


def test_chunking_is_deterministic(tokenizer) -> None:  # type: ignore[no-untyped-def]
    doc = txt(prose(5, 20))
    assert chunk_document(doc, tokenizer, max_tokens=64, overlap=16) == chunk_document(doc, tokenizer, max_tokens=64, overlap=16)


# --- dedup and validation ---------------------------------------------------------------------------------


def test_dedupe_drops_exact_duplicates_within_and_across_files(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = [{"text": "Same text here."}, {"text": "same  TEXT\nhere."}, {"text": "Other text."}]
    doc = load_document("a.jsonl", data="\n".join(json.dumps(r) for r in rows).encode())
    chunks = chunk_document(doc, tokenizer)
    assert chunks[0].content_hash == chunks[1].content_hash != chunks[2].content_hash
    seen: set[str] = set()
    kept = dedupe_chunks(chunks, seen)
    assert [(c.text, c.attributes["row"]) for c in kept] == [("Same text here.", 1), ("Other text.", 3)]
    assert seen == {chunks[0].content_hash, chunks[2].content_hash}
    later = chunk_document(txt("OTHER   text."), tokenizer)
    assert dedupe_chunks(later, seen) == []
    assert dedupe_chunks(later) == later  # a fresh `seen` per call


@pytest.mark.parametrize(
    ("max_tokens", "overlap", "param", "message"),
    [
        (15, 0, "max_tokens", r"max_tokens=15 is too small.*use 16 or more"),
        (True, 0, "max_tokens", r"max_tokens=True"),
        (200, -1, "overlap", r"overlap=-1 must be at least 0 and at most max_tokens // 2 = 100.*overlap=40"),
        (200, 101, "overlap", r"overlap=101 must be"),
        (16, 9, "overlap", r"at most max_tokens // 2 = 8"),
    ],
)
def test_bad_sizes_are_refused(tokenizer, max_tokens, overlap, param: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=message) as info:
        chunk_document(txt("Some text."), tokenizer, max_tokens=max_tokens, overlap=overlap)
    assert info.value.param == param and info.value.status_code == 400


def test_largest_valid_overlap_is_accepted(tokenizer, count) -> None:  # type: ignore[no-untyped-def]
    doc = txt(prose(7, 10))
    chunks = chunk_document(doc, tokenizer, max_tokens=16, overlap=7)
    check_invariants(doc, chunks, 16, 7, count)


# --- cleaning ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("cafe\u0301", "café"),  # NFC: e + combining acute -> é
        ("a\x00b\x07c\x1bd\x7fe\x85f", "abcde\nf"),  # control characters go; NEL is a line break
        ("tab\tkept?\n", "tab kept?"),  # a tab inside a line is a run of spaces
        ("page\fbreak", "page\nbreak"),  # a form feed separates, it does not glue
        ("one\r\ntwo\rthree\n", "one\ntwo\nthree"),
        ("no\u00a0break\u2009thin\u3000wide", "no break thin wide"),
        ("zero\u200bwidth\u200c\u200dji\ufeffner\u00adhyphen", "zerowidthjinerhyphen"),
        ("many    spaces \t here   \nnext", "many spaces here\nnext"),
        ("a\n\n\n\n\nb\n\nc\n \n \t\n\nd", "a\n\nb\n\nc\n\nd"),  # whitespace-only lines are blank too
        ("code:\n    indented  line", "code:\n    indented line"),  # indentation kept, inner runs not
        ("  \n\n  padded \n\n ", "padded"),
        ("\u2028\u2029", ""),
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean
    assert clean_text(clean) == clean  # idempotent
