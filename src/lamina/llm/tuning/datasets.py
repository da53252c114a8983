"""Fine-tuning datasets read from JSONL, in TRL's formats.

Every record is checked as it is read, and a bad one is reported with its file, line number and the field
at fault, because a fine-tuning run that dies at step 3,000 on a malformed line 17,204 is the failure users
of TRL and Axolotl meet most. The formats:

- conversational: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
- prompt-completion: ``{"prompt": "...", "completion": "..."}`` (both strings, or both message lists)
- language modelling: ``{"text": "..."}``
- preference: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (strings or message lists)
- classification: ``{"text": "...", "label": "..."}`` (the label a string or an integer)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lamina.errors import InvalidRequestError

FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
}
ROLES = ("system", "user", "assistant", "tool")


class DatasetError(InvalidRequestError):
    """A training file that cannot be read as the format it claims."""

    code = "invalid_dataset"


def read_jsonl(path: str | Path, formats: Sequence[str] = ("messages", "prompt_completion", "text")) -> tuple[str, list[dict[str, Any]]]:
    """Read and check a JSONL file; returns (format, records). The format is taken from the first record
    and every other record must have the same one."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such dataset file: {path}", param="data")
    records: list[dict[str, Any]] = []
    fmt: str | None = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})", param="data") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: each line must be a JSON object, got {type(record).__name__}", param="data")
            fmt = fmt or _detect(record, formats, where)
            _check(record, fmt, where)
            records.append(record)
    if not records:
        raise DatasetError(f"{path} holds no records", param="data")
    assert fmt is not None
    return fmt, records


def split(records: list[dict[str, Any]], eval_fraction: float, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded hold-out split: (train, eval). `eval_fraction` 0 gives no eval records."""
    if not 0 <= eval_fraction < 1:
        raise DatasetError(f"eval fraction must be in [0, 1), got {eval_fraction}", param="eval_split")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(records) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= len(records):
        raise DatasetError(f"an eval split of {eval_fraction} leaves no training records out of {len(records)}",
                           param="eval_split")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:n_eval]]


def batch_indices(n: int, step: int, micro: int, batch_size: int, grad_accum: int = 1, seed: int = 0) -> list[int]:
    """Record indices of micro-batch `micro` of optimizer step `step`: a pure function of its arguments.

    Records are taken in a fresh seeded order each epoch, so every record is seen once per epoch, and a
    resumed run draws exactly the batches the interrupted one would have.
    """
    first = (step * grad_accum + micro) * batch_size
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(first, first + batch_size):
        epoch, position = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(f"{seed}-{epoch}").shuffle(orders[epoch])
        out.append(orders[epoch][position])
    return out


def _detect(record: dict[str, Any], formats: Sequence[str], where: str) -> str:
    for fmt in formats:
        if all(k in record for k in FORMATS[fmt]):
            return fmt
    # name the field the closest format lacks
    best = max(formats, key=lambda f: sum(k in record for k in FORMATS[f]))
    missing = [k for k in FORMATS[best] if k not in record]
    wanted = " or ".join("/".join(FORMATS[f]) for f in formats)
    raise DatasetError(f"{where}: missing field {missing[0]!r} (records need {wanted}; this one has "
                       f"{', '.join(sorted(record)) or 'no fields'})", param="data")


def _check(record: dict[str, Any], fmt: str, where: str) -> None:
    for key in FORMATS[fmt]:
        if key not in record:
            raise DatasetError(f"{where}: missing field {key!r} (the file is in the {fmt} format, from its first record)",
                               param="data")
        value = record[key]
        if fmt == "classification":
            _check_classification(key, value, where)
        elif key == "messages" or isinstance(value, list):
            _check_messages(value, f"{where}: field {key!r}")
        elif not isinstance(value, str):
            raise DatasetError(f"{where}: field {key!r} must be a string or a list of messages, "
                               f"got {type(value).__name__}", param="data")
    if fmt == "messages" and not any(m["role"] == "assistant" for m in record["messages"]):
        raise DatasetError(f"{where}: field 'messages' has no assistant message, so there is nothing to learn",
                           param="data")


def _check_classification(key: str, value: Any, where: str) -> None:
    if key == "text" and (not isinstance(value, str) or not value.strip()):
        raise DatasetError(f"{where}: field 'text' must be a non-empty string, got {value!r:.40}", param="data")
    if key == "label" and (isinstance(value, bool) or not isinstance(value, str | int)):
        raise DatasetError(f"{where}: field 'label' must be a string or an integer, got {type(value).__name__}",
                           param="data")


def _check_messages(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where} must be a non-empty list of messages", param="data")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}[{i}] must be an object with 'role' and 'content'", param="data")
        for k in ("role", "content"):
            if k not in m:
                raise DatasetError(f"{where}[{i}]: missing field {k!r}", param="data")
        if m["role"] not in ROLES:
            raise DatasetError(f"{where}[{i}]: unknown role {m['role']!r} (use one of {', '.join(ROLES)})", param="data")
        if not isinstance(m["content"], str):
            raise DatasetError(f"{where}[{i}]: field 'content' must be a string", param="data")
