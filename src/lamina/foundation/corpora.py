"""Corpora that ship with every Python install, so examples and evaluations need no download.

`pydoc`: the reference documentation topics of `pydoc_data.topics` (79 topics, about 0.5 MB of text),
written out as one `<topic>.txt` file per topic.
"""

from __future__ import annotations

from pathlib import Path

from lamina.infra.fs import atomic_write_text

CORPORA = ("pydoc",)


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def export_pydoc(folder: Path) -> list[Path]:
    """Write each pydoc topic to `folder/<topic>.txt` (only files whose text changed are rewritten)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for topic, text in pydoc_topics().items():
        path = folder / f"{topic}.txt"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        paths.append(path)
    return paths
