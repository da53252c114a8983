"""Document ingestion for RAG: from a file (or uploaded bytes) to cleaned text in located sections.

A `Document` is a list of `Section`s, each a piece of cleaned text that knows where it came from: the PDF
page, or the JSONL/CSV record (`attributes["row"]`). Chunking (`lamina.foundation.chunking`) never lets a
chunk span two sections, so every chunk can cite one page or one record exactly.

One coordinate system is shared by sections and chunks: `document_text(doc)`, the sections' texts joined
with "\\n\\n". `Section.start` and `Chunk.start/end` are character offsets into it, so a citation is the
exact substring `document_text(doc)[start:end]`.

Readers, by suffix:
- .txt / .md: the whole file is one section (Markdown is kept as text: its markup is what a reader sees).
- .html / .htm: the visible text only, via the stdlib `html.parser` (no new dependency). Scripts, styles,
  `<noscript>`, `<template>`, `<svg>`, comments and elements marked `hidden` are dropped, and so are the
  boilerplate containers `<nav>`, `<aside>`, `<form>`, and `<header>`/`<footer>` outside an `<article>` or
  `<main>` (inside one they are the article's own heading and byline). If dropping boilerplate leaves no
  text (ASP.NET pages wrap the whole body in a `<form>`), the boilerplate is kept instead. The `<title>`
  is not put into the text, where it would repeat the page's `<h1>` and the site's name, but is kept as
  the section's `attributes["title"]` so every chunk can name its page.
- .pdf: pypdf, one section per page that has text, `page` = the 1-based physical page number.
- .jsonl: one section per record; the text is the first string among `TEXT_KEYS`, the record's other
  scalar fields become attributes, plus `row` = the 1-based line number in the file.
- .csv: one section per row; the text is the `text`/`content`/`body` column when there is one (the other
  columns become attributes), otherwise "column: value" lines of every column; `row` = the 1-based data
  row (the header is not counted; quoted newlines mean this is not a line number).

Bytes become text, and JSONL/CSV become records, in `lamina.foundation.readers`, which the training-data
loader (`lamina.foundation.data`) shares. Chunking lives in `lamina.foundation.chunking`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from lamina.foundation.readers import CsvTable, DocumentError, decode_text, jsonl_values, read_bytes

logger = logging.getLogger(__name__)

Attribute = str | int | float | bool

SUPPORTED_SUFFIXES: dict[str, str] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".jsonl": "jsonl",
    ".csv": "csv",
}

# Where a JSONL record keeps its text, in order of preference (`page_content` is LangChain's export).
TEXT_KEYS: tuple[str, ...] = ("text", "content", "body", "page_content")
# The CSV columns that hold the text (matched case-insensitively).
CSV_TEXT_COLUMNS: tuple[str, ...] = ("text", "content", "body")

SECTION_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Section:
    """A piece of a document with its own location."""

    text: str
    """Cleaned text (see `clean_text`); never empty."""
    page: int | None
    """1-based PDF page number; None for other formats."""
    start: int
    """Offset of `text` in `document_text(doc)`."""
    attributes: dict[str, Attribute] = field(default_factory=dict)
    """Record fields and `row` for JSONL/CSV, `title` for HTML; {} otherwise."""


@dataclass(frozen=True)
class Document:
    path: str
    """As given (`str` of the Path)."""
    filename: str
    """Base name; its suffix decided `kind`."""
    kind: str
    """One of SUPPORTED_SUFFIXES' values: txt, md, html, pdf, jsonl, csv."""
    sections: list[Section]
    sha256: str
    """Of the raw file bytes, so re-uploading an unchanged file can be recognised."""
    n_bytes: int


def document_text(doc: Document) -> str:
    """The sections' texts joined with "\\n\\n": the text that `Section.start` and chunk offsets index."""
    return SECTION_SEPARATOR.join(s.text for s in doc.sections)


# --- cleaning -------------------------------------------------------------------------------------------

# One translate table for the per-character work, so cleaning a megabyte costs milliseconds, not a
# Python loop. Control characters go (except \n and \t), page/line separators become line breaks (dropping
# a form feed would glue the words on either side together), Unicode spaces become " ", and invisible
# characters that split words for a tokenizer go: zero-width space/joiners, word joiner, BOM, soft hyphen.
_CONTROL = [*range(0x00, 0x20), *range(0x7F, 0xA0)]
_UNICODE_SPACES = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
_TRANSLATE: dict[int, str | None] = {
    **{c: None for c in _CONTROL},
    **{ord(c): " " for c in _UNICODE_SPACES},
    **{ord(c): None for c in _INVISIBLE},
    ord("\n"): "\n",
    ord("\t"): "\t",
    ord("\f"): "\n",
    ord("\v"): "\n",
    0x85: "\n",  # NEL
    0x2028: "\n",  # LINE SEPARATOR
    0x2029: "\n\n",  # PARAGRAPH SEPARATOR
}
_CRLF = re.compile(r"\r\n?")
# A run of spaces/tabs after a visible character: collapsed to one space. Leading indentation has no
# visible character before it and is kept, so code blocks and nested lists keep their shape.
_INNER_RUN = re.compile(r"(?<=[^ \t\n])[ \t]+")
_TRAILING = re.compile(r"[ \t]+(?=\n)")
_BLANK_RUN = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise text for indexing and citation, keeping line and paragraph structure.

    NFC; CRLF/CR -> LF; control characters removed (\\n and \\t kept; form feed, vertical tab and Unicode
    line separators become line breaks); NBSP and other Unicode spaces -> " "; zero-width characters,
    BOM and soft hyphens removed; runs of spaces/tabs inside a line -> one space (leading indentation is
    kept); trailing spaces removed; three or more line breaks -> two (one blank line, a paragraph break);
    the whole stripped.
    """
    text = _CRLF.sub("\n", text)
    text = text.translate(_TRANSLATE)
    text = unicodedata.normalize("NFC", text)
    text = _INNER_RUN.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


# --- loading --------------------------------------------------------------------------------------------


def load_document(path: str | Path, *, data: bytes | None = None, filename: str | None = None) -> Document:
    """Read and clean one file into located sections.

    `data` lets the API pass uploaded bytes (then `path` is only recorded, and `filename`, or else the
    path's name, gives the type); otherwise the file at `path` is read. Raises `DocumentError` with one
    line naming the file for unsupported types, empty files, encrypted or corrupt PDFs, non-UTF-8 text,
    bad JSONL lines and records without text.
    """
    name = filename or Path(path).name
    suffix = Path(name).suffix.lower()
    kind = SUPPORTED_SUFFIXES.get(suffix)
    if kind is None:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise DocumentError(
            f"{name!r}: unsupported file type {suffix or '(no suffix)'!r}; supported: {supported} "
            f"(convert the file to one of these, e.g. .docx to .pdf or .txt)",
            param="file",
            code="unsupported_document",
        )
    if data is None:
        data = read_bytes(Path(path), str(path), param="file")
    if not data:
        raise DocumentError(f"{name!r} is empty (0 bytes); upload a file with text in it", param="file")

    readers = {"txt": _read_plain, "md": _read_plain, "html": _read_html, "pdf": _read_pdf, "jsonl": _read_jsonl, "csv": _read_csv}
    pieces = readers[kind](data, name)
    sections = _place(pieces)
    if not sections:
        hint = " (a scanned PDF has only images: run OCR on it first)" if kind == "pdf" else ""
        raise DocumentError(f"{name!r} has no text after cleaning{hint}", param="file")
    return Document(
        path=str(path),
        filename=name,
        kind=kind,
        sections=sections,
        sha256=hashlib.sha256(data).hexdigest(),
        n_bytes=len(data),
    )


@dataclass(frozen=True)
class _Piece:
    """A section before it has an offset: raw text, its page and attributes."""

    text: str
    page: int | None = None
    attributes: dict[str, Attribute] = field(default_factory=dict)


def _place(pieces: list[_Piece]) -> list[Section]:
    """Clean each piece, drop the empty ones, and give the rest their offsets in the joined text."""
    sections: list[Section] = []
    offset = 0
    for piece in pieces:
        text = clean_text(piece.text)
        if not text:
            continue
        sections.append(Section(text=text, page=piece.page, start=offset, attributes=piece.attributes))
        offset += len(text) + len(SECTION_SEPARATOR)
    return sections


def _decode(data: bytes, name: str) -> str:
    return decode_text(data, name, param="file")


def _read_plain(data: bytes, name: str) -> list[_Piece]:
    return [_Piece(_decode(data, name))]


# --- HTML -----------------------------------------------------------------------------------------------

# Never visible: dropped whatever happens.
# (Not <head>: its end tag is optional, and an unclosed one would hide the whole page; the only text in a
# head is the <title>, which is handled on its own.)
_HIDDEN_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "object", "canvas"})
# Visible but not content: dropped unless that leaves nothing.
_BOILERPLATE_TAGS = frozenset({"nav", "header", "footer", "aside", "form"})
# Inside these, <header>/<footer> belong to the content (an article's title and byline).
_CONTENT_ROOTS = frozenset({"article", "main"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"})
_PARAGRAPH_TAGS = frozenset({
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre", "section",
    "article", "main", "figure", "hr", "address", "details", "fieldset",
})  # fmt: skip
_LINE_TAGS = frozenset({
    "br", "div", "li", "dt", "dd", "tr", "caption", "figcaption", "summary", "body", "legend", "option",
    "header", "footer", "nav", "aside", "form", "label", "textarea",
})  # fmt: skip
_CELL_TAGS = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's whitespace; NBSP is text and survives until clean_text
_DISPLAY_NONE = re.compile(r"display\s*:\s*none", re.IGNORECASE)
_META_CHARSET = re.compile(rb"""charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


class _VisibleText(HTMLParser):
    """Collects text as a browser would show it, marking which pieces sit inside boilerplate."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        # What a browser would lay out, in order: text, or a break (1 = new line, 2 = new paragraph),
        # each marked as inside boilerplate or not, and text as inside <pre> or not.
        self.items: list[tuple[str | int, bool, bool]] = []
        self.title: list[str] = []
        # Open elements whose content is suppressed: [tag, nesting depth of that tag name, is_boilerplate].
        self._suppress: list[list[Any]] = []
        self._content_roots = 0
        self._pre = 0
        self._in_title = False

    def _hidden(self) -> bool:
        return any(not boiler for _, _, boiler in self._suppress)

    def _boiler(self) -> bool:
        return any(boiler for _, _, boiler in self._suppress)

    def _emit(self, item: str | int) -> None:
        if not self._hidden():
            self.items.append((item, self._boiler(), self._pre > 0))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._suppress and self._suppress[-1][0] == tag:
            self._suppress[-1][1] += 1
            return
        if tag == "title":
            # Only the page's own title: an <svg> inside the body can have a <title> of its own.
            self._in_title = not self._suppress
            return
        if tag in _VOID_TAGS:
            if tag in ("br", "hr"):
                self._emit(2 if tag == "hr" else 1)
            return
        attributes = dict(attrs)
        hidden = "hidden" in attributes or bool(_DISPLAY_NONE.search(attributes.get("style") or ""))
        if tag in _HIDDEN_TAGS or hidden:
            self._suppress.append([tag, 1, False])
            return
        if tag in _BOILERPLATE_TAGS and not (tag in ("header", "footer") and self._content_roots):
            self._suppress.append([tag, 1, True])
            return
        if tag in _CONTENT_ROOTS:
            self._content_roots += 1
        if tag == "pre":
            self._pre += 1
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            return
        # Close the innermost suppressing element of this name, and any left unclosed inside it.
        for i in range(len(self._suppress) - 1, -1, -1):
            if self._suppress[i][0] == tag:
                self._suppress[i][1] -= 1
                if self._suppress[i][1] == 0:
                    del self._suppress[i:]
                return
        if tag in _CONTENT_ROOTS and self._content_roots:
            self._content_roots -= 1
        if tag == "pre" and self._pre:
            self._pre -= 1
        self._break(tag)

    def _break(self, tag: str) -> None:
        if tag in _PARAGRAPH_TAGS:
            self._emit(2)
        elif tag in _LINE_TAGS:
            self._emit(1)
        elif tag in _CELL_TAGS:
            self._emit(" ")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
            return
        self._emit(data if self._pre else _HTML_SPACE.sub(" ", data))

    # Comments, doctypes and processing instructions are not text: HTMLParser's handlers for them
    # (handle_comment, handle_decl, handle_pi) already do nothing.


def _decode_html(data: bytes, name: str) -> str:
    """UTF-8 first; otherwise the charset the page declares in a <meta> tag, if Python knows it."""
    try:
        return _decode(data, name)
    except DocumentError:
        match = _META_CHARSET.search(data[:4096])
        if match is None:
            raise
        charset = match.group(1).decode("ascii")
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError) as e:
            raise DocumentError(
                f"{name!r} is neither UTF-8 nor valid {charset!r} as its <meta charset> says ({e}); re-save it as UTF-8",
                param="file",
            ) from None


def _html_text(items: list[tuple[str | int, bool, bool]], keep_boilerplate: bool) -> str:
    """Lay the parsed items out as text: adjacent breaks merge into the largest one (as block margins do),
    and outside <pre> the spaces at the start of a line are dropped."""
    out: list[str] = []
    pending = 0  # the break owed before the next text
    for item, boiler, pre in items:
        if boiler and not keep_boilerplate:
            continue
        if isinstance(item, int):
            pending = max(pending, item)
            continue
        at_line_start = not out or pending > 0
        text = item if pre or not at_line_start else item.lstrip(" ")
        if not text:
            continue
        if pending and out:
            out.append("\n" * pending)  # spaces before it go in clean_text, with all trailing spaces
        pending = 0
        out.append(text)
    return "".join(out)


def _read_html(data: bytes, name: str) -> list[_Piece]:
    parser = _VisibleText()
    parser.feed(_decode_html(data, name))
    parser.close()
    text = _html_text(parser.items, keep_boilerplate=False)
    if not clean_text(text):
        text = _html_text(parser.items, keep_boilerplate=True)
    title = clean_text(_HTML_SPACE.sub(" ", "".join(parser.title)))
    if not clean_text(text):
        text = title  # a page whose only text is its title
    return [_Piece(text, attributes={"title": title} if title else {})]


# --- PDF ------------------------------------------------------------------------------------------------


def _read_pdf(data: bytes, name: str) -> list[_Piece]:
    import pypdf  # imported here: only PDF ingestion needs it
    from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

    if b"%PDF-" not in data[:1024]:  # where the PDF spec allows the header to be
        raise DocumentError(f"{name!r} is not a PDF (no %PDF- header); check the file's type", param="file")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            # decrypt("") opens files that only have an owner password (no password to view them).
            raise FileNotDecryptedError("needs a password")
        pages = list(reader.pages)
    except (FileNotDecryptedError, DependencyError) as e:
        raise DocumentError(
            f"{name!r} is an encrypted PDF ({e}); decrypt it first, e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`",
            param="file",
        ) from None
    except (PyPdfError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        # pypdf reports malformed files with whatever exception its parser hits, not only its own errors.
        raise DocumentError(
            f"{name!r} is a corrupt or unreadable PDF ({type(e).__name__}: {e}); re-export or repair it (e.g. `qpdf in.pdf out.pdf`)",
            param="file",
        ) from None

    pieces: list[_Piece] = []
    failed: list[int] = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text()
        except (PyPdfError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
            # One damaged page should not lose the rest of the document; it is logged and skipped.
            logger.warning("%s: cannot extract text from page %d: %s: %s", name, number, type(e).__name__, e)
            failed.append(number)
            continue
        pieces.append(_Piece(text or "", page=number))
    if pages and len(failed) == len(pages):
        raise DocumentError(f"{name!r} is a corrupt PDF: no page could be read; re-export or repair it", param="file")
    return pieces


# --- JSONL and CSV --------------------------------------------------------------------------------------


def _scalar_attributes(record: dict[str, Any], skip: str | None) -> dict[str, Attribute]:
    """The record's str/int/float/bool fields; nested values and nulls are not filterable metadata."""
    return {k: v for k, v in record.items() if k != skip and isinstance(v, str | int | float | bool)}


def _read_jsonl(data: bytes, name: str) -> list[_Piece]:
    pieces: list[_Piece] = []
    for number, record in jsonl_values(_decode(data, name), name, param="file"):
        if isinstance(record, str):  # a bare string per line is a record that is all text
            pieces.append(_Piece(record, attributes={"row": number}))
            continue
        if not isinstance(record, dict):
            raise DocumentError(
                f"{name!r} line {number} is a JSON {type(record).__name__}, not an object; "
                f"each line must be an object with one of the keys {list(TEXT_KEYS)}",
                param="file",
            )
        key = next((k for k in TEXT_KEYS if isinstance(record.get(k), str)), None)
        if key is None:
            raise DocumentError(
                f"{name!r} line {number} has no text field: expected a string under one of {list(TEXT_KEYS)}, "
                f"found keys {sorted(record)[:10]}",
                param="file",
            )
        pieces.append(_Piece(record[key], attributes={**_scalar_attributes(record, key), "row": number}))
    return pieces


def _read_csv(data: bytes, name: str) -> list[_Piece]:
    table = CsvTable(_decode(data, name), name, param="file")
    text_column = table.column(CSV_TEXT_COLUMNS)
    pieces: list[_Piece] = []
    for row, values in table.rows():
        if text_column is not None:
            attributes: dict[str, Attribute] = {k: v for k, v in values.items() if k != text_column}
            pieces.append(_Piece(values.get(text_column, ""), attributes={**attributes, "row": row}))
        else:
            lines = [f"{k}: {v}" for k, v in values.items() if v.strip()]
            pieces.append(_Piece("\n".join(lines), attributes={"row": row}))
    return pieces


__all__ = [
    "CSV_TEXT_COLUMNS",
    "SUPPORTED_SUFFIXES",
    "TEXT_KEYS",
    "Document",
    "DocumentError",
    "Section",
    "clean_text",
    "document_text",
    "load_document",
]
