"""Training data: raw text -> cleaned, de-duplicated documents -> a versioned dataset in the data lake.

`build_dataset(lake, name, sources, options)` loads documents, runs the cleaning steps in order, and
commits what is left as the next version of `name` (`lamina.infra.datalake`), with the per-step report
in the version's manifest. The same sources and options give the same documents in the same order and
byte-identical Parquet files (same hashes).

Sources, each a path or a corpus name:
- .txt / .md / .markdown: one document per file; doc_id is the path as given.
- folders: walked recursively for those suffixes and .jsonl/.csv, in sorted order; hidden files skipped.
- .jsonl: one document per record, its text under `text_field` (default: the first string among
  text/content/body/page_content); doc_id is "PATH:LINE".
- .csv: one document per row, its text in the `text_field` column (default: text/content/body); doc_id is
  "PATH:ROW" (data rows from 1, the header not counted).
- `pydoc`: Python's reference topics (`lamina.foundation.corpora`), doc_id "pydoc:<topic>".

Steps (each reports documents removed and kept, and characters before and after):
1. normalize: `clean_text` (NFC, control and invisible characters, whitespace runs; indentation kept);
   documents left empty go.
2. quality filters, defaults measured on pydoc (79 topics) and on stdlib/site-packages source files:
   - min_chars 100, min_words 20: the shortest pydoc topic ("await") has 201 characters and 28 words;
     common pretraining minimums of 50 words would drop 5 short but real topics.
   - max_chars 1,000,000, max_words 200,000: only dumps far beyond any document (the longest pydoc
     topic has 62k characters).
   - max_symbol_ratio 0.5, the share of characters that are neither alphanumeric nor whitespace:
     prose has 0.03-0.10, Python modules up to 0.26, JavaScript up to 0.34, and the reST tables of
     pydoc's "operator-summary" and "typesseq-mutable" 0.38 and 0.45 (0.3 would drop both). Above 0.5
     a document is more punctuation than text: ASCII art, markup soup, binary debris.
   - max_repeated_line_ratio 0.4, the share of non-blank lines that repeat an earlier line: pydoc
     tops out at 0.22 ("raise"), but code repeats `}`, `else:` and `return None`: at Gopher's 0.3 for
     web text, 6 % of the stdlib's modules would go; at 0.4, one in 167.
   With these defaults no pydoc topic is dropped by a filter.
3. exact_dedup: sha256 of the normalised text; the first copy stays (pydoc's "else" and "if" topics are
   the same text, so "if" goes).
4. near_dedup: MinHash LSH (datasketch) over lower-cased word 5-shingles, 128 permutations; a document
   whose estimated Jaccard similarity to an earlier kept one is at least 0.8 goes. The signatures of
   the kept documents stay in memory (about 1 KB each).
5. scrub_pii (off by default): emails, phone numbers, and secrets (AWS access key ids, GitHub and
   OpenAI-style tokens, long hex/base64 values assigned to key/secret/token/password names) become
   <EMAIL>, <PHONE>, <SECRET>. It runs last, on the documents that are kept, so filters and dedup judge
   the text as written.

`iter_texts(lake, name)` streams (doc_id, text) pairs batch by batch for tokenizer and training code.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import InvalidRequestError
from lamina.foundation.corpora import pydoc_topics
from lamina.foundation.documents import CSV_TEXT_COLUMNS, TEXT_KEYS, clean_text
from lamina.foundation.readers import CsvTable, DocumentError, decode_text, jsonl_values, read_bytes

if TYPE_CHECKING:
    # Only for annotations: importing this module stays light (no pyarrow), so the CLI can read
    # `CleaningOptions`' defaults for its --help without loading the Parquet stack.
    from lamina.infra.datalake import DataLake, DatasetVersion

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
RECORD_SUFFIXES = (".jsonl", ".csv")
DATA_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
CORPORA = ("pydoc",)

ProgressFn = Callable[[str, int, int], None]
"""Called as progress(step, done, total) during long steps (loading, near_dedup)."""


class EmptyDatasetError(InvalidRequestError):
    """No document is left to write; `step` names the step that removed the last ones ("load" if none came)."""

    code = "empty_dataset"

    def __init__(self, message: str, *, step: str) -> None:
        super().__init__(message, param="sources" if step == "load" else step)
        self.step = step


@dataclass(frozen=True)
class TextDocument:
    doc_id: str
    text: str
    source: str
    """The file (as given, or inside a given folder) or corpus the document came from."""


@dataclass(frozen=True)
class CleaningOptions:
    """What `build_dataset` keeps. Ratios are in [0, 1]; a ratio of 1 turns its filter off."""

    text_field: str | None = None
    """JSONL key / CSV column holding the text; None: the first of text/content/body present."""
    min_chars: int = 100
    max_chars: int = 1_000_000
    min_words: int = 20
    max_words: int = 200_000
    max_symbol_ratio: float = 0.5
    max_repeated_line_ratio: float = 0.4
    dedup: bool = True
    near_dedup: bool = True
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 5
    scrub_pii: bool = False

    def __post_init__(self) -> None:
        for name in ("min_chars", "max_chars", "min_words", "max_words"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{_flag(name)} must be 0 or more (got {getattr(self, name)!r})", param=name)
        for low, high in (("min_chars", "max_chars"), ("min_words", "max_words")):
            if getattr(self, high) < getattr(self, low):
                raise InvalidRequestError(
                    f"{_flag(high)} ({getattr(self, high)}) is below {_flag(low)} ({getattr(self, low)}): no document could pass",
                    param=high,
                )
        for name in ("max_symbol_ratio", "max_repeated_line_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidRequestError(
                    f"{_flag(name)} must be between 0 and 1 (got {getattr(self, name)!r}); 1 turns the filter off", param=name
                )
        if not 0 < self.near_dup_threshold <= 1:
            raise InvalidRequestError(f"near_dup_threshold must be in (0, 1] (got {self.near_dup_threshold!r})", param="near_dup_threshold")
        if self.num_perm < 16:
            raise InvalidRequestError(f"num_perm must be at least 16 (got {self.num_perm!r})", param="num_perm")
        if self.shingle_words < 1:
            raise InvalidRequestError(f"shingle_words must be at least 1 (got {self.shingle_words!r})", param="shingle_words")


# The `lamina data ingest` flag of each option. Messages quote the flag next to (or instead of) the field
# name, so that a user of the command reads what to type; this table is the one place that knows them.
_CLI_FLAGS = {
    "text_field": "--text-field",
    "min_chars": "--min-chars",
    "max_chars": "--max-chars",
    "min_words": "--min-words",
    "max_words": "--max-words",
    "max_symbol_ratio": "--max-symbol-ratio",
    "max_repeated_line_ratio": "--max-repeated-lines",
}


def _flag(name: str) -> str:
    """An option as both callers know it: the field name and the `lamina data ingest` flag."""
    return f"{name} ({_CLI_FLAGS[name]})"


@dataclass(frozen=True)
class StepReport:
    step: str
    removed: int
    kept: int
    chars_before: int
    chars_after: int
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, int] = field(default_factory=dict)
    """Counts particular to the step: replacements by kind for scrub_pii."""
    examples: tuple[str, ...] = ()
    """The first few removed documents' ids ("id ~ kept_id" for duplicates)."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples": list(self.examples)}


@dataclass
class CleaningReport:
    steps: list[StepReport] = field(default_factory=list)

    @property
    def input_documents(self) -> int:
        return self.steps[0].kept if self.steps else 0

    @property
    def output_documents(self) -> int:
        return self.steps[-1].kept if self.steps else 0

    def step(self, name: str) -> StepReport:
        for s in self.steps:
            if s.step == name:
                return s
        raise KeyError(f"no step {name!r} in this report; steps: {[s.step for s in self.steps]}")

    def to_manifest(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.steps]


# --- loading --------------------------------------------------------------------------------------------


def load_sources(sources: Sequence[str | Path], *, text_field: str | None = None,
                 progress: ProgressFn | None = None) -> list[TextDocument]:
    """Every document of every source, in order (folders sorted); each file read once even if named twice."""
    if not sources:
        raise InvalidRequestError("no sources given: pass files, folders, or 'pydoc'", param="sources")
    items: list[tuple[Path, str] | str] = []  # (file, its path as shown) or a corpus name
    for src in sources:
        if str(src) in CORPORA:
            items.append(str(src))
            continue
        path = Path(src).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            items += [(f, f.as_posix()) for f in found]
        elif path.is_file():
            if path.suffix.lower() not in DATA_SUFFIXES:
                raise InvalidRequestError(
                    f"{str(src)!r}: unsupported file type {path.suffix or '(no suffix)'!r}; supported: "
                    f"{', '.join(DATA_SUFFIXES)}, folders of them, and the corpus {', '.join(map(repr, CORPORA))}",
                    param="sources",
                )
            items.append((path, path.as_posix()))
        else:
            raise InvalidRequestError(
                f"no such file or folder: {str(src)!r} (sources are files, folders, or the corpus name 'pydoc')", param="sources"
            )

    docs: list[TextDocument] = []
    seen: set[Path | str] = set()
    for done, item in enumerate(items, start=1):
        key = item if isinstance(item, str) else item[0].resolve()
        if key not in seen:
            seen.add(key)
            if isinstance(item, str):
                docs += [TextDocument(f"pydoc:{topic}", text, "pydoc") for topic, text in pydoc_topics().items()]
            else:
                docs += _read_file(item[0], item[1], text_field)
        if progress is not None:
            progress("load", done, len(items))
    return docs


def _read_file(path: Path, shown: str, text_field: str | None) -> list[TextDocument]:
    text = decode_text(read_bytes(path, shown, param="sources"), shown, param="sources", advice=", or leave it out")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(text, shown, text_field)
    if suffix == ".csv":
        return _csv_documents(text, shown, text_field)
    return [TextDocument(shown, text, shown)]


def _jsonl_documents(text: str, shown: str, text_field: str | None) -> list[TextDocument]:
    docs = []
    keys = (text_field,) if text_field else TEXT_KEYS
    for number, record in jsonl_values(text, shown, param="sources"):
        if isinstance(record, str) and text_field is None:
            docs.append(TextDocument(f"{shown}:{number}", record, shown))
            continue
        value = next((record[k] for k in keys if isinstance(record, dict) and isinstance(record.get(k), str)), None)
        if value is None:
            found = sorted(record)[:10] if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            expected = repr(text_field) if text_field else f"one of {list(TEXT_KEYS)}"
            raise DocumentError(
                f"{shown!r} line {number} has no text: expected a string under {expected}, found {found}; "
                f"pass {_CLI_FLAGS['text_field']} KEY",
                param="text_field",
            )
        docs.append(TextDocument(f"{shown}:{number}", value, shown))
    return docs


def _csv_documents(text: str, shown: str, text_field: str | None) -> list[TextDocument]:
    # Documents are long; the csv module's default cap on a field (128 KiB) would reject them.
    table = CsvTable(text, shown, param="sources", large_fields=True)
    if text_field is not None and text_field in table.columns:
        column: str | None = text_field
    else:
        column = table.column((text_field,) if text_field else CSV_TEXT_COLUMNS)
    if column is None:
        raise DocumentError(
            f"{shown!r} has no text column {repr(text_field) if text_field else 'text/content/body'}; its columns: "
            f"{table.columns}; pass {_CLI_FLAGS['text_field']} COLUMN",
            param="text_field",
        )
    return [TextDocument(f"{shown}:{row}", values[column], shown) for row, values in table.rows()]


# --- quality signals ------------------------------------------------------------------------------------

# Neither a letter/digit nor whitespace. `\w` also matches "_", which is a symbol here.
_SYMBOL = re.compile(r"[^\w\s]|_")
_WORD = re.compile(r"\w+")


def symbol_ratio(text: str) -> float:
    """The share of characters that are neither alphanumeric nor whitespace (0 for empty text)."""
    return len(_SYMBOL.findall(text)) / len(text) if text else 0.0


def repeated_line_ratio(text: str) -> float:
    """The share of non-blank lines (compared stripped) that repeat an earlier line."""
    lines = [stripped for line in text.split("\n") if (stripped := line.strip())]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


# --- PII ------------------------------------------------------------------------------------------------

_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_GITHUB_TOKEN = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b")
_OPENAI_KEY = re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}")
# A name that says "secret", an = or :, and a value; the value is checked by `_looks_secret`.
_ASSIGNED_SECRET = re.compile(
    r"""(?i)(?P<name>\b[\w.-]*(?:key|secret|token|passw(?:or)?d|pwd|credentials?)[\w-]*['"]?\s*[:=]\s*)"""
    r"""(?P<quote>['"]?)(?P<value>[A-Za-z0-9+/_.=-]{16,})(?P=quote)"""
)
_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
# International: "+", a country code (never starting with 0), then 8-15 digits in all (E.164), either in
# one run or in groups that separators split ("+3.140000", a signed decimal, has only one group).
_PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:\d{5,12}|(?:[ .-]\(?\d{1,6}\)?){2,6})(?![\w])")
# North American: (415) 555-2671, 415-555-2671, 415.555.2671, 1-800-555-0199.
_PHONE_US = re.compile(r"(?<![\w.+-])(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w.-]?\d)")


def _looks_secret(value: str) -> bool:
    """Long hex, or a long mix of letters and digits: a key, not a word or a file name."""
    if _HEX.fullmatch(value):
        return True
    return len(value) >= 20 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace emails, phone numbers and secrets with <EMAIL>, <PHONE>, <SECRET>; counts by kind."""
    counts: Counter[str] = Counter()

    def replace(kind: str, placeholder: str, check: Callable[[re.Match[str]], bool] | None = None) -> Callable[[re.Match[str]], str]:
        def sub(match: re.Match[str]) -> str:
            if check is not None and not check(match):
                return match.group(0)
            counts[kind] += 1
            return placeholder
        return sub

    # Secrets first: a key can contain digit runs that would otherwise read as a phone number.
    text = _AWS_KEY.sub(replace("secret", "<SECRET>"), text)
    text = _GITHUB_TOKEN.sub(replace("secret", "<SECRET>"), text)
    text = _OPENAI_KEY.sub(replace("secret", "<SECRET>", lambda m: _looks_secret(m.group(0)[3:])), text)

    def assigned(match: re.Match[str]) -> str:
        if not _looks_secret(match.group("value")):
            return match.group(0)
        counts["secret"] += 1
        return f"{match.group('name')}{match.group('quote')}<SECRET>{match.group('quote')}"

    text = _ASSIGNED_SECRET.sub(assigned, text)
    text = _EMAIL.sub(replace("email", "<EMAIL>"), text)
    text = _PHONE_INTL.sub(replace("phone", "<PHONE>", lambda m: 8 <= sum(c.isdigit() for c in m.group(0)) <= 15), text)
    text = _PHONE_US.sub(replace("phone", "<PHONE>"), text)
    return text, counts


# --- the pipeline ---------------------------------------------------------------------------------------

# For the empty-dataset error: what to change when a step removed the last documents.
_HINTS = {
    "normalize": "the documents hold no text after normalisation (only whitespace or control characters); "
                 f"check the sources and {_CLI_FLAGS['text_field']}",
    "min_chars": f"lower {_CLI_FLAGS['min_chars']}",
    "max_chars": f"raise {_CLI_FLAGS['max_chars']}",
    "min_words": f"lower {_CLI_FLAGS['min_words']}",
    "max_words": f"raise {_CLI_FLAGS['max_words']}",
    "symbol_ratio": f"raise {_CLI_FLAGS['max_symbol_ratio']} (1 turns the filter off)",
    "repeated_lines": f"raise {_CLI_FLAGS['max_repeated_line_ratio']} (1 turns the filter off)",
}
_EXAMPLES = 5


def _chars(docs: Sequence[TextDocument]) -> int:
    return sum(len(d.text) for d in docs)


def _filter(report: CleaningReport, step: str, docs: list[TextDocument], keep: Callable[[TextDocument], bool],
            params: dict[str, Any]) -> list[TextDocument]:
    kept, removed = [], []
    for d in docs:
        (kept if keep(d) else removed).append(d)
    report.steps.append(StepReport(step, len(removed), len(kept), _chars(docs), _chars(kept), params,
                                   examples=tuple(d.doc_id for d in removed[:_EXAMPLES])))
    return kept


def clean_documents(docs: Sequence[TextDocument], options: CleaningOptions = CleaningOptions(), *,
                    progress: ProgressFn | None = None) -> tuple[list[TextDocument], CleaningReport]:
    """Run the cleaning steps in order; the documents kept, in input order, and what each step did."""
    report = CleaningReport()
    report.steps.append(StepReport("load", 0, len(docs), _chars(docs), _chars(docs)))
    o = options

    normalized = [TextDocument(d.doc_id, clean_text(d.text), d.source) for d in docs]
    kept = [d for d in normalized if d.text]
    removed = [d.doc_id for d in normalized if not d.text]
    report.steps.append(StepReport("normalize", len(removed), len(kept), _chars(docs), _chars(kept),
                                   {"unicode": "NFC"}, examples=tuple(removed[:_EXAMPLES])))

    kept = _filter(report, "min_chars", kept, lambda d: len(d.text) >= o.min_chars, {"min_chars": o.min_chars})
    kept = _filter(report, "max_chars", kept, lambda d: len(d.text) <= o.max_chars, {"max_chars": o.max_chars})
    kept = _filter(report, "min_words", kept, lambda d: len(d.text.split()) >= o.min_words, {"min_words": o.min_words})
    kept = _filter(report, "max_words", kept, lambda d: len(d.text.split()) <= o.max_words, {"max_words": o.max_words})
    kept = _filter(report, "symbol_ratio", kept, lambda d: symbol_ratio(d.text) <= o.max_symbol_ratio,
                   {"max_symbol_ratio": o.max_symbol_ratio})
    kept = _filter(report, "repeated_lines", kept, lambda d: repeated_line_ratio(d.text) <= o.max_repeated_line_ratio,
                   {"max_repeated_line_ratio": o.max_repeated_line_ratio})
    if o.dedup:
        kept = _exact_dedup(report, kept)
    if o.near_dedup:
        kept = _near_dedup(report, kept, o, progress)
    if o.scrub_pii:
        kept = _scrub(report, kept)
    return kept, report


def _exact_dedup(report: CleaningReport, docs: list[TextDocument]) -> list[TextDocument]:
    first: dict[bytes, str] = {}
    kept, examples, removed = [], [], 0
    for d in docs:
        digest = hashlib.sha256(d.text.encode("utf-8")).digest()
        if digest in first:
            removed += 1
            if len(examples) < _EXAMPLES:
                examples.append(f"{d.doc_id} = {first[digest]}")
            continue
        first[digest] = d.doc_id
        kept.append(d)
    report.steps.append(StepReport("exact_dedup", removed, len(kept), _chars(docs), _chars(kept), {"hash": "sha256"},
                                   examples=tuple(examples)))
    return kept


def shingles(text: str, k: int = 5) -> set[bytes]:
    """Lower-cased word k-shingles; a text of k words or fewer is one shingle (its words, or itself)."""
    words = _WORD.findall(text.lower())
    if len(words) <= k:
        return {(" ".join(words) or text).encode("utf-8")}
    return {" ".join(words[i : i + k]).encode("utf-8") for i in range(len(words) - k + 1)}


def _near_dedup(report: CleaningReport, docs: list[TextDocument], o: CleaningOptions,
                progress: ProgressFn | None) -> list[TextDocument]:
    from datasketch import MinHash, MinHashLSH  # imported here: only near-dedup needs it

    lsh = MinHashLSH(threshold=o.near_dup_threshold, num_perm=o.num_perm)
    signatures: dict[int, Any] = {}
    kept, examples, removed = [], [], 0
    batch = 256  # MinHash.bulk shares the permutations across a batch: much faster than one at a time
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        hashes = MinHash.bulk([shingles(d.text, o.shingle_words) for d in chunk], num_perm=o.num_perm)
        for offset, (d, m) in enumerate(zip(chunk, hashes, strict=True)):
            # LSH gives candidates; the estimated Jaccard decides. The earliest kept match is named.
            match = next((c for c in sorted(lsh.query(m)) if signatures[c].jaccard(m) >= o.near_dup_threshold), None)
            if match is not None:
                removed += 1
                if len(examples) < _EXAMPLES:
                    examples.append(f"{d.doc_id} ~ {docs[match].doc_id}")
                continue
            index = start + offset
            lsh.insert(index, m, check_duplication=False)
            signatures[index] = m
            kept.append(d)
        if progress is not None:
            progress("near_dedup", min(start + batch, len(docs)), len(docs))
    params = {"threshold": o.near_dup_threshold, "num_perm": o.num_perm, "shingle_words": o.shingle_words}
    report.steps.append(StepReport("near_dedup", removed, len(kept), _chars(docs), _chars(kept), params,
                                   examples=tuple(examples)))
    return kept


def _scrub(report: CleaningReport, docs: list[TextDocument]) -> list[TextDocument]:
    total: Counter[str] = Counter()
    out, changed = [], 0
    for d in docs:
        text, counts = scrub_pii(d.text)
        total.update(counts)
        changed += bool(counts)
        out.append(TextDocument(d.doc_id, text, d.source) if counts else d)
    details = {"email": total["email"], "phone": total["phone"], "secret": total["secret"], "documents_changed": changed}
    report.steps.append(StepReport("scrub_pii", 0, len(out), _chars(docs), _chars(out), {}, details=details))
    return out


# --- datasets -------------------------------------------------------------------------------------------


def build_dataset(lake: DataLake, name: str, sources: Sequence[str | Path], options: CleaningOptions = CleaningOptions(),
                  *, progress: ProgressFn | None = None) -> tuple[DatasetVersion, CleaningReport]:
    """Load, clean and commit `sources` as the next version of dataset `name`."""
    import pyarrow as pa

    lake.check_name(name)  # before the work, not after it
    docs = load_sources(sources, text_field=options.text_field, progress=progress)
    kept, report = clean_documents(docs, options, progress=progress)
    if not kept:
        step, message = _why_empty(name, report)
        raise EmptyDatasetError(message, step=step)
    table = pa.table({
        "doc_id": pa.array([d.doc_id for d in kept], pa.string()),
        "text": pa.array([d.text for d in kept], pa.string()),
        "source": pa.array([d.source for d in kept], pa.string()),
    })
    manifest = {"sources": [str(s) for s in sources], "steps": report.to_manifest(), "options": asdict(options)}
    return lake.write(name, table, manifest), report


def _why_empty(name: str, report: CleaningReport) -> tuple[str, str]:
    total = report.input_documents
    if total == 0:
        return "load", (
            f"dataset {name!r} is empty: the sources hold no documents (supported: {', '.join(DATA_SUFFIXES)} files, "
            f"folders of them, and 'pydoc'); check the paths"
        )
    step = next(s for s in report.steps if s.kept == 0)
    what = "normalisation" if step.step == "normalize" else f"the {step.step} filter"
    params = ", ".join(f"{k}={v}" for k, v in step.params.items() if step.step != "normalize")
    if step.removed == total:
        told = f"all {total} documents were removed by {what}"
    else:
        told = f"{what} removed the last {step.removed} of {total} documents"
    return step.step, f"dataset {name!r} is empty: {told}{f' ({params})' if params else ''}; {_HINTS.get(step.step, 'check the options')}"


def iter_texts(lake: DataLake, name: str, version: int | None = None, *, batch_size: int = 1024) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every document of a dataset version, in order, read a batch at a time."""
    import pyarrow.parquet as pq

    for path in lake.parquet_files(name, version):
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=batch_size, columns=["doc_id", "text"]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


__all__ = [
    "CleaningOptions",
    "CleaningReport",
    "EmptyDatasetError",
    "StepReport",
    "TextDocument",
    "build_dataset",
    "clean_documents",
    "iter_texts",
    "load_sources",
    "repeated_line_ratio",
    "scrub_pii",
    "shingles",
    "symbol_ratio",
]
