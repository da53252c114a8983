"""Reading Hugging Face model folders: config.json, safetensors weights (sharded too), tokenizer files.

Families: Llama-style (`llama`, `mistral`, `qwen2`) and `gpt2`. Parameter names lose their `model.` /
`transformer.` prefix; GPT-2's Conv1D weights, stored (in, out), are transposed to nn.Linear's (out, in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lamina.arch import config_from_dict as lamina_config_from_dict
from lamina.arch.gpt2 import GPT2Config
from lamina.arch.llama import LlamaConfig, RopeScaling
from lamina.errors import ModelFormatError
from lamina.foundation.tokenizer import Tokenizer, read_tokenizer_config
from lamina.infra.checkpoint import iter_safetensors, read_json

LLAMA_TYPES = {"llama", "mistral", "qwen2"}


def model_config(folder: Path) -> LlamaConfig | GPT2Config:
    hf = read_json(folder / "config.json")
    model_type = hf.get("model_type")
    if model_type == "lamina":  # a model Lamina trained: its own family config, its own parameter names
        if not isinstance(hf.get("lamina"), dict):
            raise ModelFormatError(f"{folder}/config.json: model_type 'lamina' needs a 'lamina' family config")
        return lamina_config_from_dict(hf["lamina"])
    try:
        if model_type in LLAMA_TYPES:
            return _llama_config(hf, folder)
        if model_type == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ModelFormatError(f"{folder}: GPT-2 activation {hf['activation_function']!r} is not supported")
            return GPT2Config(
                vocab_size=hf["vocab_size"],
                max_seq_len=hf.get("n_positions", 1024),
                dim=hf["n_embd"],
                n_layers=hf["n_layer"],
                n_heads=hf["n_head"],
                hidden_dim=hf.get("n_inner"),
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            )
    except KeyError as e:
        raise ModelFormatError(f"{folder}/config.json: missing key {e.args[0]!r} for model_type {model_type!r}") from None
    raise ModelFormatError(
        f"{folder}/config.json: model_type {model_type!r} is not a generative family Lamina runs "
        f"(supported: {sorted(LLAMA_TYPES | {'gpt2'})})"
    )


def _llama_config(hf: dict[str, Any], folder: Path) -> LlamaConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{folder}: activation {hf['hidden_act']!r} is not supported (Llama family uses silu)")
    if hf.get("mlp_bias") or (hf.get("model_type") == "llama" and hf.get("attention_bias")):
        raise ModelFormatError(f"{folder}: biases on the MLP or attention output are not supported")
    # transformers 5 writes rope settings under rope_parameters; older files use rope_theta/rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling_src = hf.get("rope_scaling") or rope
    rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) if scaling_src else "default"
    scaling = None
    if rope_type == "linear":
        scaling = RopeScaling(type="linear", factor=float(scaling_src["factor"]))
    elif rope_type == "llama3":
        scaling = RopeScaling(
            type="llama3",
            factor=float(scaling_src["factor"]),
            low_freq_factor=float(scaling_src["low_freq_factor"]),
            high_freq_factor=float(scaling_src["high_freq_factor"]),
            original_max_seq_len=int(scaling_src["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise ModelFormatError(f"{folder}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    sliding = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        sliding = None
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=scaling,
        sliding_window=sliding,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def state_dict(
    folder: Path, config: LlamaConfig | GPT2Config, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, renamed to Lamina's names and cast to `dtype`."""
    out: dict[str, torch.Tensor] = {}
    native = read_json(folder / "config.json").get("model_type") == "lamina"
    gpt2 = isinstance(config, GPT2Config) and not native
    for key, tensor in iter_safetensors(folder):
        if native:
            out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        new = _rename_gpt2(key) if gpt2 else _rename_llama(key)
        if new is None:
            continue
        if gpt2 and new.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and tensor.dim() == 2:
            tensor = tensor.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
        out[new] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def _rename_llama(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq"):
        return None
    return key.removeprefix("model.")


def _rename_gpt2(key: str) -> str | None:
    if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers in old checkpoints
        return None
    return key.removeprefix("transformer.")


def tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer; the reading is foundation's, shared with the embedding models' folders."""
    return Tokenizer.from_folder(folder)


def chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = read_tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def eos_ids(folder: Path, tok: Tokenizer) -> list[int]:
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.exists():
        value = read_json(gen).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if tok.eos_id is not None:
        ids.append(tok.eos_id)
    return list(dict.fromkeys(int(i) for i in ids))
