"""Tiny random-weight models made in the tests: Hugging Face folders and GGUF files, no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Lamina runs on plain PyTorch.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Unicode: café, naïve, 東京, emoji 🙂🚀, numbers 12345 and 3.14159.",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int = 400):  # type: ignore[no-untyped-def]
    """A small byte-level BPE (GPT-2 style), with ChatML special tokens at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_hf_tokenizer(folder: Path, tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


LLAMA_BASE = dict(
    vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def hf_llama_folder(folder: Path, kind: str = "llama", seed: int = 0, **overrides: Any):  # type: ignore[no-untyped-def]
    """Save a random transformers model of `kind` (llama|qwen2|mistral) with a tokenizer; return the model."""
    import transformers

    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    config = config_cls(**{**LLAMA_BASE, **overrides})
    model = model_cls(config).eval()
    _perturb_norms(model)
    model.save_pretrained(folder)
    save_hf_tokenizer(folder, train_tokenizer(LLAMA_BASE["vocab_size"]))
    return model


def hf_gpt2_folder(folder: Path, seed: int = 0, **overrides: Any):  # type: ignore[no-untyped-def]
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **{"vocab_size": 400, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    _perturb_norms(model)
    model.save_pretrained(folder)
    save_hf_tokenizer(folder, train_tokenizer(400))
    return model


def _perturb_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0; randomise them so a mis-mapped norm cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model: Any, tokenizer: Any, qtype: str = "F32") -> Path:
    """Write a transformers Llama as llama.cpp's converter does: names, permuted Q/K, tokenizer metadata.

    2-D weights are stored in `qtype` (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K, ...); norms stay F32.
    """
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(0)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json_merges(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    qt = gguf.GGMLQuantizationType[qtype]
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name in names:
            gname = names[name]
        else:
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{i}.{block[module]}.{kind}"
        if "q_proj" in name:
            array = permute_qk(array, cfg.num_attention_heads)
        elif "k_proj" in name:
            array = permute_qk(array, cfg.num_key_value_heads)
        if array.ndim == 2 and qtype in K_QUANT_SCALES:
            w.add_tensor(gname, random_kquant(array.shape, qtype, seed=len(gname) + int(array.size)), raw_dtype=qt)
        elif array.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, quantize(array, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# The `gguf` package dequantises K-quants but cannot quantise them, so K-quant tensors are random blocks:
# any bytes are valid codes once the fp16 scale fields (offsets below, per block) hold small finite values.
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_kquant(shape: tuple[int, int], qtype: str, seed: int) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        scale = rng.uniform(1e-3, 1e-2, size=(rows, cols // block)).astype(np.float16)
        data[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def json_merges(tokenizer: Any) -> list[str]:
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def write_gpt2_gguf(path: Path, model: Any, tokenizer: Any) -> Path:
    """A transformers GPT-2 as llama.cpp's converter writes it: Conv1D weights transposed, output = token_embd."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(0)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(json_merges(tokenizer))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    block = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        array = tensor.detach().float().numpy()
        if name in names:
            gname = names[name]
        else:
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{block['.'.join(rest[:-1])]}.{rest[-1]}"
            if rest[-1] == "weight" and array.ndim == 2:
                array = array.T.copy()  # Conv1D (in, out) -> (out, in)
        w.add_tensor(gname, array.astype(np.float32))
        if gname == "token_embd.weight":
            w.add_tensor("output.weight", array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
