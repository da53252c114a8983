"""Layer 2, architecture: model families as plain PyTorch modules (no I/O, no knowledge of file formats)."""

from __future__ import annotations

from lamina.arch.bert import Bert, BertConfig
from lamina.arch.build import FAMILIES, ModelConfig, build_model, config_from_dict
from lamina.arch.gpt2 import GPT2, GPT2Config
from lamina.arch.kv_cache import KVCache
from lamina.arch.llama import Llama, LlamaConfig
from lamina.arch.moe import MoE, MoEConfig

__all__ = [
    "FAMILIES",
    "GPT2",
    "Bert",
    "BertConfig",
    "GPT2Config",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "MoE",
    "MoEConfig",
    "ModelConfig",
    "build_model",
    "config_from_dict",
]
