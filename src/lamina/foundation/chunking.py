"""Token-aware chunking of documents for embedding, and exact-duplicate dropping.

An embedding encoder sees at most a few hundred tokens (all-MiniLM-L6-v2: 256, less [CLS] and [SEP]), so
documents are cut into chunks of at most `max_tokens` tokens of the encoder's own tokenizer. The rules:

- A chunk never spans two sections, so its page and record attributes are exact.
- A chunk is the exact substring `document_text(doc)[start:end]`, so a citation can point at it, and it
  starts and ends on a visible character (no leading or trailing whitespace).
- A chunk ends at the best boundary in the last quarter of its window: a paragraph break, else a line
  break or sentence end, else a space between words, else punctuation inside a "word" (`a-b`, `x.y`).
  Only when the last quarter lies inside one long word (a URL, a run of CJK characters with a byte-level
  tokenizer) is it cut between tokens.
- Consecutive chunks of a section overlap by about `overlap` tokens (the next one starts `overlap` tokens
  before the previous one's end, moved back to the start of a word), so a sentence cut at a boundary is
  whole in one of the two. Hence every character of a section is in some chunk; with `overlap=0` that
  still holds for every visible character, but whitespace between two chunks belongs to neither.
- `n_tokens` is the chunk's text encoded on its own, without special tokens; it is what the encoder will
  see and never exceeds `max_tokens`.

Tokenizer offsets are character spans into the text; WordPiece's spans skip whitespace and characters its
normaliser drops (accents it strips, control characters), so chunk bounds are computed from the spans
and then widened over such gaps rather than taken from the spans alone.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenizers import Tokenizer as Backend

from lamina.errors import InvalidRequestError
from lamina.foundation.documents import Attribute, Document
from lamina.foundation.tokenizer import Tokenizer

MIN_MAX_TOKENS = 16

# Sentence ends: a terminator, optionally followed by closing quotes or brackets, then whitespace. The
# CJK full stops end a sentence without a following space (those scripts do not put one).
_TERMINATORS = ".!?…"
_CJK_TERMINATORS = "。！？"
_CLOSERS = "\"')]}»”’"

# Cut preference, best first.
_PARAGRAPH, _LINE_OR_SENTENCE, _SPACED_WORD, _WORD, _TOKEN = 4, 3, 2, 1, 0


@dataclass(frozen=True)
class Chunk:
    """A piece of one section, sized for the encoder, located in the document's text."""

    text: str
    """Exactly `document_text(doc)[start:end]`."""
    page: int | None
    """The page of the chunk's first character (chunks never span pages)."""
    start: int
    end: int
    n_tokens: int
    """Tokens of `text` by the chunking tokenizer, without special tokens."""
    attributes: dict[str, Attribute] = field(default_factory=dict)
    """The section's attributes (JSONL/CSV record fields and `row`, HTML `title`)."""
    content_hash: str = ""
    """sha256 of the lowercased, whitespace-normalised text: equal for exact duplicates."""


def content_hash(text: str) -> str:
    """The key `dedupe_chunks` compares: case and whitespace differences do not make a chunk new."""
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def chunk_document(doc: Document, tokenizer: Tokenizer, *, max_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """Cut every section of `doc` into chunks of at most `max_tokens` tokens, overlapping by ~`overlap`.

    The defaults suit a 256-token encoder: 200 tokens plus [CLS]/[SEP] fit with room to spare, and a 40-token
    overlap (20 %) keeps sentences that straddle a cut whole in one chunk. Deterministic.
    """
    _validate(max_tokens, overlap)
    backend = _counting_backend(tokenizer)
    chunks: list[Chunk] = []
    for section in doc.sections:
        for start, end, n_tokens in _split(section.text, backend, max_tokens, overlap):
            text = section.text[start:end]
            chunks.append(
                Chunk(
                    text=text,
                    page=section.page,
                    start=section.start + start,
                    end=section.start + end,
                    n_tokens=n_tokens,
                    attributes=dict(section.attributes),
                    content_hash=content_hash(text),
                )
            )
    return chunks


def dedupe_chunks(chunks: Iterable[Chunk], seen: set[str] | None = None) -> list[Chunk]:
    """Drop chunks whose `content_hash` was seen before, keeping the first.

    `seen` is updated in place, so passing the same set for every file dedupes across files.
    """
    seen = set() if seen is None else seen
    kept: list[Chunk] = []
    for chunk in chunks:
        if chunk.content_hash in seen:
            continue
        seen.add(chunk.content_hash)
        kept.append(chunk)
    return kept


def _validate(max_tokens: int, overlap: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < MIN_MAX_TOKENS:
        raise InvalidRequestError(
            f"max_tokens={max_tokens!r} is too small: a chunk needs at least {MIN_MAX_TOKENS} tokens; "
            f"use {MIN_MAX_TOKENS} or more (200 suits a 256-token encoder such as all-MiniLM-L6-v2)",
            param="max_tokens",
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= max_tokens // 2:
        raise InvalidRequestError(
            f"overlap={overlap!r} must be at least 0 and at most max_tokens // 2 = {max_tokens // 2} "
            f"(chunks must move forward); use e.g. overlap={max_tokens // 5}",
            param="overlap",
        )


# The counting copy of each tokenizer whose tokenizer.json asks for truncation or padding, made once.
# Weak keys: the memo never keeps a tokenizer alive; the stored original backend detects a swapped one.
_COUNTING: weakref.WeakKeyDictionary[Tokenizer, tuple[Backend, Backend]] = weakref.WeakKeyDictionary()


def _counting_backend(tokenizer: Tokenizer) -> Backend:
    """The tokenizer's backend without truncation or padding.

    Embedding models' tokenizer.json files often truncate (all-MiniLM-L6-v2: to 128) and pad; counting with
    them would see every long section as 128 tokens and pads as text. The caller's tokenizer is not
    changed: the encoder may rely on those settings.
    """
    backend = tokenizer.backend
    if backend.truncation is None and backend.padding is None:
        return backend
    cached = _COUNTING.get(tokenizer)
    if cached is not None and cached[0] is backend:
        return cached[1]
    counting = Backend.from_str(backend.to_str())
    counting.no_truncation()
    counting.no_padding()
    _COUNTING[tokenizer] = (backend, counting)
    return counting


def _split(text: str, backend: Backend, max_tokens: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, n_tokens) of each chunk of one section's text, offsets into `text`."""
    encoding = backend.encode(text, add_special_tokens=False)
    # Tokens with an empty span (none for plain text, but a post-processor may add some) cannot be cut at.
    tokens = [(s, e, w) for (s, e), w in zip(encoding.offsets, encoding.word_ids, strict=True) if e > s]
    if len(tokens) <= max_tokens:
        return [(0, len(text), len(encoding.ids))]
    # Cut with the counts the tokens have in context, then count every chunk on its own in one batch (the
    # library runs it on all cores). Cut between words, WordPiece text counts the same; only if some chunk
    # counts more on its own (a cut inside a very long word; byte-level merges across the cut) is the
    # section cut again, counting each chunk before choosing the next.
    spans = _cut(text, tokens, max_tokens, overlap, None)
    counted = backend.encode_batch([text[s:e] for s, e, _ in spans], add_special_tokens=False)
    counts = [len(c.ids) for c in counted]
    if max(counts) <= max_tokens:
        return [(s, e, n) for (s, e, _), n in zip(spans, counts, strict=True)]
    return _cut(text, tokens, max_tokens, overlap, backend)


def _cut(
    text: str,
    tokens: list[tuple[int, int, int | None]],
    max_tokens: int,
    overlap: int,
    backend: Backend | None,
) -> list[tuple[int, int, int]]:
    """Chunk spans over `tokens` (start, end, word id). With `backend`, each chunk is counted on its own
    and shortened until it fits; without, its count is its number of tokens in context."""
    starts = [s for s, _, _ in tokens]
    ends = [e for _, e, _ in tokens]
    words = [w for _, _, w in tokens]
    n = len(tokens)
    spans: list[tuple[int, int, int]] = []
    a = 0  # first token of the current chunk
    while True:
        b = n if n - a <= max_tokens else _best_cut(text, starts, ends, words, a, max_tokens)
        while True:
            start = 0 if a == 0 else _skip_space(text, starts[a])
            end = len(text) if b == n else _end_after(text, ends[b - 1], starts[b])
            if backend is None:
                count = b - a
                break
            count = len(backend.encode(text[start:end], add_special_tokens=False).ids)
            if count <= max_tokens or b - a <= 1:
                break
            b = max(a + 1, b - (count - max_tokens))  # shorten by the excess and count again
        spans.append((start, end, count))
        if b >= n:
            return spans
        a = _next_start(text, starts, ends, words, a, b, overlap, max_tokens)


def _next_start(text: str, starts: list[int], ends: list[int], words: list[int | None], a: int, b: int, overlap: int, max_tokens: int) -> int:
    """The first token of the chunk after [a, b): `overlap` tokens back, moved back to the start of a word
    if one is near (a very long word is entered mid-way rather than making the step tiny)."""
    following = max(a + 1, b - overlap)
    floor = max(a + 1, following - max_tokens // 4)
    for level in (_SPACED_WORD, _WORD):
        for i in range(following, floor - 1, -1):
            if _word_start(text, starts, ends, words, i) >= level:
                return i
    return following


def _word_start(text: str, starts: list[int], ends: list[int], words: list[int | None], i: int) -> int:
    """_SPACED_WORD if token i starts a word after whitespace, _WORD after punctuation, else _TOKEN."""
    if words[i] is not None and words[i] == words[i - 1]:
        return _TOKEN
    # WordPiece's spans leave the space out (a gap before the token); byte-level BPE's start with it.
    spaced = starts[i] > ends[i - 1] or text[starts[i]].isspace()
    return _SPACED_WORD if spaced else _WORD


def _best_cut(text: str, starts: list[int], ends: list[int], words: list[int | None], a: int, max_tokens: int) -> int:
    """The end token (exclusive) for a chunk starting at token `a`: the latest best boundary in the last
    quarter of the window (paragraph > line or sentence > space between words > other word boundary)."""
    hi = a + max_tokens
    lo = hi - max_tokens // 4
    best, best_score = hi, -1
    for b in range(hi, lo - 1, -1):
        score = _boundary(text, starts, ends, words, b)
        if score > best_score:
            best, best_score = b, score
            if score == _PARAGRAPH:
                break
    return best  # with no boundary at all (one word longer than a quarter window): the full window


def _boundary(text: str, starts: list[int], ends: list[int], words: list[int | None], b: int) -> int:
    """How good a place to end a chunk the point between tokens b-1 and b is."""
    prev_end = ends[b - 1]
    # The whitespace after the last token: the gap before the next one (WordPiece), or that token's own
    # leading whitespace (byte-level BPE, where "\n\n" is a token).
    space = text[prev_end : _skip_space(text, prev_end)]
    if "\n\n" in space:
        return _PARAGRAPH
    if "\n" in space:
        return _LINE_OR_SENTENCE
    j = prev_end - 1
    while j > 0 and text[j] in _CLOSERS and prev_end - j <= 2:
        j -= 1
    if text[j] in _CJK_TERMINATORS or (space and text[j] in _TERMINATORS):
        return _LINE_OR_SENTENCE
    return _word_start(text, starts, ends, words, b)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _end_after(text: str, prev_end: int, next_start: int) -> int:
    """Where a chunk whose last token ends at `prev_end` ends: past any characters between it and the next
    token that no token covers (a stripped accent, say), but not past trailing whitespace."""
    return prev_end + len(text[prev_end:next_start].rstrip())


__all__ = ["MIN_MAX_TOKENS", "Chunk", "chunk_document", "content_hash", "dedupe_chunks"]
