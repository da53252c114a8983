"""Reading text files one way for every loader: bytes to text, JSONL lines to values, CSV to rows.

Two loaders read files: `lamina.foundation.documents` (RAG documents; errors name the argument `file`)
and `lamina.foundation.data` (training sources; errors name `sources`). What a record means differs
between them, how its bytes become text does not, so that part lives here. Every error is a
`DocumentError` of one line that names the file as the caller shows it (`name`) and says how to fix it;
`param` names the argument that held the file.

- Text: UTF-8, with or without a BOM, or UTF-16 with a BOM (what Windows editors save as "Unicode").
- JSONL: one JSON value per line, blank lines skipped; lines are split on "\\n" only.
- CSV: a header row, then data rows numbered from 1 (quoted newlines mean these are not line numbers).
  `large_fields=True` lifts the csv module's 128 KiB cap on one field for the length of the read only:
  the cap is process-wide state, so it is put back afterwards, and reads that change it take turns.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lamina.errors import InvalidRequestError

# The largest cap the csv module accepts on every platform (a C long); documents can be long.
_LARGE_FIELD_LIMIT = 2**31 - 1
# `csv.field_size_limit` is one value for the whole process: reads hold this lock while they rely on it,
# so one read's restoring the cap cannot cut another's short.
_FIELD_LIMIT_LOCK = threading.Lock()


class DocumentError(InvalidRequestError):
    """A file that cannot be ingested: an unsupported type, or content that cannot be read as text.

    A subclass of `InvalidRequestError` (HTTP 400, `invalid_request_error`): the fix is always on the
    caller's side (convert, decrypt, re-encode or repair the file).
    """

    code = "unreadable_document"


def read_bytes(path: Path, name: str, *, param: str) -> bytes:
    """The file's bytes; an unreadable file is a `DocumentError` naming `name`."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise DocumentError(f"{name!r}: cannot read the file: {e.strerror or e}", param=param) from None


def decode_text(data: bytes, name: str, *, param: str, advice: str = "") -> str:
    """UTF-8 (with or without a BOM), or UTF-16 with a BOM.

    `advice` is appended to the not-UTF-8 error after its re-encoding hint (e.g. ", or leave it out").
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DocumentError(f"{name!r} starts with a UTF-16 mark but is not valid UTF-16 ({e.reason})", param=param) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"{name!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {name} > out`{advice}",
            param=param,
        ) from None


def jsonl_values(text: str, name: str, *, param: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) for every non-blank line, in order.

    Lazy, so a caller's own complaint about line 1 comes before a syntax error on line 2.
    """
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentError(
                f"{name!r} line {number} is not valid JSON ({e.msg} at column {e.colno}); fix or remove that line",
                param=param,
            ) from None
        yield number, value


@contextmanager
def _field_size_limit(large: bool) -> Iterator[None]:
    with _FIELD_LIMIT_LOCK:
        if not large:
            yield
            return
        previous = csv.field_size_limit(max(csv.field_size_limit(), _LARGE_FIELD_LIMIT))
        try:
            yield
        finally:
            csv.field_size_limit(previous)


class CsvTable:
    """A CSV text's header, read at once, and its data rows, read on `rows()`."""

    def __init__(self, text: str, name: str, *, param: str, large_fields: bool = False) -> None:
        self.name, self.param, self.large_fields = name, param, large_fields
        self._reader = csv.DictReader(io.StringIO(text, newline=""))
        with _field_size_limit(large_fields):
            self.columns: list[str] = [c for c in self._reader.fieldnames or [] if c is not None]
        # Lower-cased and stripped; reversed so that the first spelling of a column wins.
        self._by_lower = {c.strip().lower(): c for c in reversed(self.columns)}

    def column(self, candidates: Iterable[str]) -> str | None:
        """The first candidate present, matched case-insensitively, as the header spells it."""
        return next((self._by_lower[c.lower()] for c in candidates if c.lower() in self._by_lower), None)

    def rows(self) -> list[tuple[int, dict[str, str]]]:
        """(1-based data row, {column: value}) in order. Missing cells of short rows read as "", and extra
        cells of long rows are dropped; a malformed row is a `DocumentError` naming it."""
        out: list[tuple[int, dict[str, str]]] = []
        row = 0
        with _field_size_limit(self.large_fields):
            try:
                for row, record in enumerate(self._reader, start=1):
                    # Short rows give None for missing columns; extra cells sit under the None key.
                    out.append((row, {k: v or "" for k, v in record.items() if k is not None}))
            except csv.Error as e:
                raise DocumentError(f"{self.name!r} is not valid CSV near data row {row + 1} ({e}); fix that row",
                                    param=self.param) from None
        return out


__all__ = ["CsvTable", "DocumentError", "decode_text", "jsonl_values", "read_bytes"]
