"""Writes stdlib_docs.jsonl: Python's own docstrings, labelled by what the module they come from is for.

A real, offline text-classification set for `lamina finetune classify`. Each record is the first
paragraph of the docstring of a public function, class or method of one standard-library module, and its
label is the module's family: text, files, network, math, concurrency or data (formats and compression).
Only the docstring is kept, not the object's or the module's name, so the label must be read from what the
text says ("Return the high median of data." is math; "Fork a new subprocess to process the request." is
network, from socketserver). Docstrings repeated across modules are kept once, and each family is capped
at the same count, so chance is 1/6.

    python tests/data/make_stdlib_docs.py   # rewrites tests/data/stdlib_docs.jsonl (CPython 3.11 made it)
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

FAMILIES = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser", "shlex", "locale"],
    "files": ["os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "fileinput", "io"],
    "network": ["socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse",
                "smtplib", "ftplib", "imaplib", "poplib", "ipaddress", "email.message", "email.utils", "socketserver",
                "xmlrpc.client"],
    "math": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"],
    "concurrency": ["threading", "multiprocessing", "multiprocessing.pool", "asyncio", "concurrent.futures", "queue",
                    "sched", "subprocess", "signal", "selectors"],
    "data": ["json", "csv", "pickle", "sqlite3", "xml.etree.ElementTree", "configparser", "plistlib", "zipfile",
             "tarfile", "gzip", "bz2", "lzma", "zlib", "base64", "struct", "shelve", "dbm", "marshal"],
}
PER_FAMILY = 150


def _objects(module_name: str) -> list[tuple[str, object]]:
    """Public functions and classes defined by the module (or its C accelerator), and their public methods."""
    module = importlib.import_module(module_name)
    root = module_name.split(".")[0]
    out: list[tuple[str, object]] = []
    for name, obj in sorted(vars(module).items()):
        origin = getattr(obj, "__module__", None) or ""
        if name.startswith("_") or not (origin.lstrip("_").startswith(root) or origin == module.__name__):
            continue
        if inspect.isclass(obj):
            out.append((name, obj))
            out += [(f"{name}.{m}", f) for m, f in sorted(vars(obj).items()) if not m.startswith("_") and callable(f)]
        elif callable(obj):
            out.append((name, obj))
    return out


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def build(seed: int = 0) -> list[dict[str, str]]:
    seen: set[str] = set()
    by_family: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for family, modules in FAMILIES.items():
        for module in modules:
            for _, obj in _objects(module):
                doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
                text = _first_paragraph(doc or "")
                if len(text) < 25 or text in seen or re.fullmatch(r"\w+\(.*\)\s*(->.*)?", text):
                    continue  # too short, repeated, or only a signature
                seen.add(text)
                by_family[family].append(text)
    rng = random.Random(seed)
    records = []
    for family, texts in by_family.items():
        for text in rng.sample(texts, min(PER_FAMILY, len(texts))):
            records.append({"text": text, "label": family})
    rng.shuffle(records)
    return records


def main() -> None:
    path = Path(__file__).with_name("stdlib_docs.jsonl")
    records = build()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{path}: {len(records)} records from CPython {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
