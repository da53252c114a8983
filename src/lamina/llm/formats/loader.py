"""One entry point for every checkpoint format: a registry entry in, config + weights + tokenizer out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.arch import ModelConfig
from lamina.errors import InvalidRequestError, ModelFormatError
from lamina.foundation.tokenizer import Tokenizer
from lamina.infra.checkpoint import read_json
from lamina.infra.registry import ModelEntry
from lamina.llm.formats import gguf, hf


@dataclass
class Checkpoint:
    """Everything read from a model's files, before it is put on a device."""

    entry: ModelEntry
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None
    eos_ids: list[int]


@dataclass(frozen=True)
class ModelSummary:
    """What `lamina models` shows, read from headers only (no weights)."""

    family: str
    params: int | None
    context: int | None


def read_checkpoint(entry: ModelEntry, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Config, weights (cast to `dtype` tensor by tensor, to keep peak memory low), tokenizer, template."""
    if entry.task != "generate":
        raise InvalidRequestError(
            f"model {entry.id!r} is an embedding model, not a text generator; pick a generative model", param="model"
        )
    if entry.format == "gguf":
        g = gguf.open_gguf(entry.path)
        config = gguf.model_config(g)
        tok = gguf.tokenizer(g)
        return Checkpoint(entry, config, gguf.state_dict(g, config, dtype), tok, gguf.chat_template(g), gguf.eos_ids(g))
    config = hf.model_config(entry.path)
    tok = hf.tokenizer(entry.path)
    return Checkpoint(entry, config, hf.state_dict(entry.path, config, dtype), tok, hf.chat_template(entry.path), hf.eos_ids(entry.path, tok))


def summarize(entry: ModelEntry) -> ModelSummary:
    """Family, parameter count and context length from the file headers (cheap)."""
    if entry.format == "gguf":
        g = gguf.open_gguf(entry.path)
        return ModelSummary(g.architecture, g.num_params(), g.arch_key("context_length"))
    config = read_json(entry.path / "config.json")
    return ModelSummary(str(config.get("model_type", "?")), _safetensors_params(entry), _context(config))


def _context(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _safetensors_params(entry: ModelEntry) -> int | None:
    """Sum of tensor sizes from the safetensors headers (no weights read)."""
    import json
    import struct

    total = 0
    files = list(entry.path.glob("*.safetensors"))
    if not files:
        return None
    for path in files:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise ModelFormatError(f"{path}: corrupt safetensors header ({e})") from None
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total
