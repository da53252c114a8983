"""Training checkpoints (for resuming) and exported models (for serving).

A checkpoint is a folder `checkpoints/step-000500/` with the weights (safetensors), the optimizer state,
and `state.json` (step, RNG states, best validation loss, tokens seen). It is written into a temporary
folder and renamed into place, then `checkpoints/latest` is replaced to name it, so a process killed at
any moment leaves either the previous checkpoint or the new one. Leftover temporary folders are removed.

An exported model is a folder `LAMINA_HOME/models/<name>/` with `config.json` (`"model_type": "lamina"`
and the family config), `model.safetensors`, the tokenizer files and `generation_config.json`; the registry
lists it and `lamina generate/serve --model <name>` load it like any Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lamina.arch import ModelConfig
from lamina.foundation.tokenizer import Tokenizer
from lamina.foundation.tokenizer_train import save_tokenizer
from lamina.infra.fs import atomic_write_text


@dataclass
class Checkpoint:
    folder: Path
    step: int
    state: dict[str, Any]

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / "model.safetensors"))

    def optimizer(self) -> dict[str, Any]:
        return torch.load(self.folder / "optimizer.pt", map_location="cpu", weights_only=False)


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict[str, Any], state: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_unshared(weights), str(tmp / "model.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "saved_at": time.time()}))
    for f in tmp.iterdir():  # durable before it becomes visible
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    _prune(root, keep={final.name})
    return final


def latest_checkpoint(root: Path) -> Checkpoint | None:
    try:
        name = (root / "latest").read_text().strip()
        folder = root / name
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return Checkpoint(folder, int(state["step"]), state)


def with_tied(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add back the names of tied parameters that the checkpoint stored once (lm_head = embedding)."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    out = dict(weights)
    for names in names_of.values():
        present = [n for n in names if n in out]
        for name in names:
            if name not in out and present:
                out[name] = out[present[0]]
    return out


def _prune(root: Path, keep: set[str], keep_last: int = 2) -> None:
    """Remove leftover temporary folders and all but the last `keep_last` checkpoints."""
    for tmp in root.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name of each."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        out[name] = tensor.contiguous()
    return out


def export_model(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                 summary: dict[str, Any]) -> Path:
    """Write a servable model folder (atomically: built beside it, then renamed into place)."""
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_text(tmp / "config.json", json.dumps({"model_type": "lamina", "lamina": config.to_dict()}, indent=2))
    save_file(_unshared(weights), str(tmp / "model.safetensors"))
    save_tokenizer(tokenizer, tmp)
    atomic_write_text(tmp / "generation_config.json", json.dumps({"eos_token_id": tokenizer.eos_id}))
    atomic_write_text(tmp / "training.json", json.dumps(summary, indent=2))
    backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, backup)
    os.replace(tmp, folder)
    shutil.rmtree(backup, ignore_errors=True)
    return folder
