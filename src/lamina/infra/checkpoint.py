"""Reading checkpoint files that every layer needs: JSON configs and (sharded) safetensors folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lamina.errors import ModelFormatError


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by model.safetensors.index.json, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not names:
            raise ModelFormatError(f"{index}: no weight_map")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors weights (Lamina does not load pickled .bin files)")
    return files


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the folder's safetensors files, one file at a time."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for path in safetensors_files(folder):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{path}: cannot read safetensors ({e})") from None
        yield from tensors.items()
