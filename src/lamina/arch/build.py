"""Building a model of any family from its config, with random or given weights.

`FAMILIES` maps the config's `family` string to its (config, model) classes, so configs stay plain data
that YAML and checkpoints can carry. `build_model` with a state dict builds on the meta device first and
then adopts the given tensors, so loading a checkpoint never spends time on a random initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamina.arch.bert import UNUSED_CHECKPOINT_KEYS as BERT_UNUSED_KEYS
from lamina.arch.bert import Bert, BertConfig
from lamina.arch.gpt2 import GPT2, GPT2Config
from lamina.arch.llama import Llama, LlamaConfig, rope_inv_freq
from lamina.errors import ConfigError, ModelFormatError

ModelConfig = LlamaConfig | GPT2Config | BertConfig
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "llama": (LlamaConfig, Llama),
    "gpt2": (GPT2Config, GPT2),
    "bert": (BertConfig, Bert),
}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A family config from a dict with a `family` key (as saved next to every checkpoint)."""
    family = data.get("family", "llama")
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(data)


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A model of `config`'s family on `device` in `dtype`: randomly initialised, or holding `state_dict`."""
    model_cls = FAMILIES[config.family][1]
    if state_dict is None:
        with torch.device(device):
            return model_cls(config).to(dtype)
    with torch.device("meta"):
        model = model_cls(config)
    # Tied models get lm_head from the input embedding; an encoder has no lm_head at all.
    tied = config.tie_embeddings if isinstance(config, LlamaConfig) else isinstance(config, GPT2Config)
    tensors = {
        name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for name, t in state_dict.items()
        if not (tied and name == "lm_head.weight") and not _unused(config, name)
    }
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise ModelFormatError(f"checkpoint does not fit the {config.family} config: {detail[:500]}") from None
    if tied:
        model.lm_head.weight = _input_embedding(model).weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelFormatError(
            f"checkpoint does not fit the {config.family} config: missing tensors {_some(missing)}, "
            f"unexpected tensors {_some(unexpected)}"
        )
    if isinstance(model, Llama):  # non-persistent buffers are not in checkpoints: compute them on the device
        model.inv_freq = rope_inv_freq(config).to(device)
    return model


def _unused(config: ModelConfig, name: str) -> bool:
    """Checkpoint tensors the family knowingly leaves out (BERT's NSP pooler and saved position ids)."""
    return isinstance(config, BertConfig) and name.startswith(BERT_UNUSED_KEYS)


def _some(names: list[str]) -> str:
    return str(names[:6])[:-1] + (f", ... {len(names) - 6} more]" if len(names) > 6 else "]")


def _input_embedding(model: nn.Module) -> nn.Embedding:
    return model.embed_tokens if isinstance(model, Llama) else model.wte
