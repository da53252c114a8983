"""Layer 2, architecture: model families as plain PyTorch modules (no I/O, no knowledge of file formats)."""

from __future__ import annotations

from lamina.arch.bert import Bert, BertConfig
from lamina.arch.build import FAMILIES, ModelConfig, build_model, config_from_dict
from lamina.arch.gpt2 import GPT2, GPT2Config
from lamina.arch.kv_cache import KVCache
from lamina.arch.llama import Llama, LlamaConfig
from lamina.arch.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    disable_adapters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    set_active_adapter,
    unmerge_lora,
    using_adapter,
)
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
    "LoRAConfig",
    "LoRALinear",
    "MoE",
    "MoEConfig",
    "ModelConfig",
    "apply_lora",
    "build_model",
    "config_from_dict",
    "disable_adapters",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "set_active_adapter",
    "unmerge_lora",
    "using_adapter",
]
