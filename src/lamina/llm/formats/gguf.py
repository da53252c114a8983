"""Reading GGUF files (llama.cpp's format): metadata, tokenizer, chat template and weights.

Weights are dequantised to float by the `gguf` package (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
K-quants and the other block formats it knows), then renamed to Lamina's parameter names. llama.cpp's
converter permutes the rows of the Q and K projections of Llama-family models so that rotary pairs sit
side by side (GPT-J style); `unpermute_qk` undoes that, so the checkpoint matches the Hugging Face layout
that `lamina.arch.llama` uses (rotating the two halves of each head).

A truncated or corrupt file is reported in one line naming the file and what is wrong, never as a numpy
traceback.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamina.arch.gpt2 import GPT2Config
from lamina.arch.llama import LlamaConfig, RopeScaling
from lamina.errors import ModelFormatError
from lamina.foundation.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_LLAMA_ARCHS = {"llama", "mistral", "qwen2", "smollm"}

# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Plain element types for tensors that are not block-quantised.
_PLAIN_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    """ggml order: shape[0] is the innermost (contiguous) dimension."""
    offset: int
    """Absolute byte offset of the data in the file."""
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFFile:
    """A parsed GGUF header: metadata values and the tensor index (data stays memory-mapped)."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    buffer: Any = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def num_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's stored data, shaped as `gguf.quants.dequantize` expects (rows, row bytes or elements)."""
        from gguf.quants import quant_shape_to_byte_shape

        np_shape = tuple(reversed(t.shape))
        plain = _PLAIN_DTYPES.get(t.type.name)
        if plain is not None:
            return np.frombuffer(self.buffer, dtype=plain, count=t.n_elements, offset=t.offset).reshape(np_shape)
        data = np.frombuffer(self.buffer, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        return data.reshape(quant_shape_to_byte_shape(np_shape, t.type))


class _Header:
    """A cursor over the header bytes; every read checks it stays inside the file."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFormatError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf):,})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ModelFormatError(f"{self.path}: truncated GGUF header (a string of {n:,} bytes runs past the end)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if count > len(self.buf):
                raise ModelFormatError(f"{self.path}: corrupt GGUF header (an array claims {count:,} items)")
            if item_type in _SCALARS and item_type != 7:
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt) * count
                if self.pos + size > len(self.buf):
                    raise ModelFormatError(f"{self.path}: truncated GGUF header (an array runs past the end)")
                values = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += size
                return values
            return [self.value(item_type) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: corrupt GGUF header (unknown value type {vtype} at byte {self.pos:,})")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header and tensor index of a GGUF file, checking that every tensor lies inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelFormatError(f"{path}: not a GGUF file (only {size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read the file ({e.strerror})") from None
    if buf[:4] != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})")
    h = _Header(buf, path)
    h.pos = 4
    version = h.unpack("<I")
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: unsupported GGUF version {version} (Lamina reads versions 2 and 3)")
    n_tensors, n_kv = h.unpack("<Q"), h.unpack("<Q")
    if n_tensors > size or n_kv > size:
        raise ModelFormatError(f"{path}: corrupt GGUF header ({n_tensors:,} tensors, {n_kv:,} metadata keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.unpack("<I")
        if n_dims > 4:
            raise ModelFormatError(f"{path}: corrupt tensor index ({name!r} has {n_dims} dimensions)")
        shape = tuple(h.unpack("<Q") for _ in range(n_dims))
        raw_type, offset = h.unpack("<I"), h.unpack("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFormatError(f"{path}: tensor {name!r} has unknown type id {raw_type}") from None
        infos.append((name, qtype, shape, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-h.pos // alignment) * alignment
    tensors = []
    for name, qtype, shape, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(shape, dtype=np.int64))
        start = data_start + offset
        t = TensorInfo(name, qtype, shape, start, n_elements // block * type_size)
        if start + t.n_bytes > size:
            raise ModelFormatError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {start + t.n_bytes:,} but the file has {size:,}"
            )
        tensors.append(t)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors, buffer=buf)


# --- config ---------------------------------------------------------------------------------------------


def model_config(g: GGUFFile) -> LlamaConfig | GPT2Config:
    arch = g.architecture
    try:
        if arch in _LLAMA_ARCHS:
            return _llama_config(g)
        if arch == "gpt2":
            return GPT2Config(
                vocab_size=_vocab_size(g),
                max_seq_len=int(g.arch_key("context_length")),
                dim=int(g.arch_key("embedding_length")),
                n_layers=int(g.arch_key("block_count")),
                n_heads=int(g.arch_key("attention.head_count")),
                hidden_dim=int(g.arch_key("feed_forward_length")),
                layer_norm_eps=float(g.arch_key("attention.layer_norm_epsilon", 1e-5)),
            )
    except TypeError:
        raise ModelFormatError(f"{g.path}: GGUF metadata for architecture {arch!r} is incomplete") from None
    raise ModelFormatError(
        f"{g.path}: unsupported GGUF architecture {arch!r}; Lamina runs {sorted(_LLAMA_ARCHS | {'gpt2'})}"
    )


def _vocab_size(g: GGUFFile) -> int:
    size = g.arch_key("vocab_size")
    if size is None:
        size = len(g.get("tokenizer.ggml.tokens", ()))
    return int(size)


def _llama_config(g: GGUFFile) -> LlamaConfig:
    n_heads = int(g.arch_key("attention.head_count"))
    dim = int(g.arch_key("embedding_length"))
    head_dim = g.arch_key("attention.key_length") or g.arch_key("rope.dimension_count") or dim // n_heads
    scaling = None
    scaling_type = g.arch_key("rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling(type="linear", factor=float(g.arch_key("rope.scaling.factor")))
    elif scaling_type not in (None, "none"):
        raise ModelFormatError(f"{g.path}: unsupported rope scaling {scaling_type!r} (Lamina has linear and llama3)")
    tensor_names = {t.name for t in g.tensors}
    return LlamaConfig(
        vocab_size=_vocab_size(g),
        dim=dim,
        n_layers=int(g.arch_key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g.arch_key("attention.head_count_kv", n_heads)),
        head_dim=int(head_dim),
        hidden_dim=int(g.arch_key("feed_forward_length")),
        max_seq_len=int(g.arch_key("context_length", 2048)),
        rope_theta=float(g.arch_key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        sliding_window=g.arch_key("attention.sliding_window"),
        norm_eps=float(g.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        tie_embeddings="output.weight" not in tensor_names,
    )


# --- tokenizer ------------------------------------------------------------------------------------------


def tokenizer(g: GGUFFile) -> Tokenizer:
    kind = g.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFormatError(
            f"{g.path}: tokenizer kind {kind!r} is not supported yet (Lamina builds byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face folder with its tokenizer.json instead"
        )
    return Tokenizer.byte_level_bpe(
        g.get("tokenizer.ggml.tokens"),
        g.get("tokenizer.ggml.merges", []),
        token_types=g.get("tokenizer.ggml.token_type"),
        pre=g.get("tokenizer.ggml.pre", "default"),
        bos_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_id=g.get("tokenizer.ggml.eos_token_id"),
        pad_id=g.get("tokenizer.ggml.padding_token_id"),
        unk_id=g.get("tokenizer.ggml.unknown_token_id"),
        # llama.cpp's default for BPE vocabularies is no BOS unless the file says so.
        add_bos=bool(g.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(g.get("tokenizer.ggml.add_eos_token", False)),
    )


def chat_template(g: GGUFFile) -> str | None:
    return g.get("tokenizer.chat_template")


def eos_ids(g: GGUFFile) -> list[int]:
    ids = [g.get("tokenizer.ggml.eos_token_id"), g.get("tokenizer.ggml.eot_token_id")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# --- weights --------------------------------------------------------------------------------------------

_LLAMA_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd.weight": "wte.weight",
    "position_embd.weight": "wpe.weight",
    "output_norm.weight": "ln_f.weight",
    "output_norm.bias": "ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_BLOCK_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows: per head, interleaved pairs back to two halves.

    The converter maps rows (head, half, i) -> (head, i, half); this maps them back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def state_dict(
    g: GGUFFile, config: LlamaConfig | GPT2Config, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """All weights, dequantised (in float32, then cast one tensor at a time to `dtype`) and renamed."""
    from gguf.quants import dequantize

    is_llama = isinstance(config, LlamaConfig)
    names, block_names = (_LLAMA_NAMES, _LLAMA_BLOCK_NAMES) if is_llama else (_GPT2_NAMES, _GPT2_BLOCK_NAMES)
    out: dict[str, torch.Tensor] = {}
    for tensor in g.tensors:
        name = _rename(tensor.name, names, block_names, "layers" if is_llama else "h")
        if name is None:
            if tensor.name.startswith("rope_freqs"):
                continue  # llama3 rope factors, recomputed from the config
            raise ModelFormatError(f"{g.path}: unexpected tensor {tensor.name!r} for architecture {g.architecture!r}")
        try:
            array = dequantize(g.raw(tensor), tensor.type)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise ModelFormatError(
                f"{g.path}: cannot dequantise tensor {tensor.name!r} of type {tensor.type.name} ({e})"
            ) from None
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if is_llama and name.endswith("q_proj.weight"):
            array = unpermute_qk(array, config.n_heads)
        elif is_llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_qk(array, config.n_kv_heads)
        elif is_llama and name.endswith("q_proj.bias"):
            array = unpermute_qk(array, config.n_heads)
        if not array.flags.writeable or not array.flags.c_contiguous:  # a view into the memory map
            array = np.array(array, order="C")
        out[name] = torch.from_numpy(array).to(dtype)
    return out


NATIVE_BLOCK_TYPES = {"Q4_1": 4, "Q8_0": 8}
"""GGUF block types whose bytes are Lamina's native block layouts as they are (`lamina.llm.kernels.native`):
Q4_1 {fp16 d, fp16 m, 16 bytes of nibbles} is its int4 format, Q8_0 {fp16 d, 32 int8} its int8 one."""


def native_block_type(g: GGUFFile) -> str | None:
    """The block type ("Q4_1" or "Q8_0") every 2-D weight of the transformer blocks is stored in, or None when
    they are not all one of Lamina's native block types (other quantisations, floats, a mix)."""
    types = {t.type.name for t in g.tensors if len(t.shape) == 2 and t.name.startswith("blk.")}
    return types.pop() if len(types) == 1 and next(iter(types)) in NATIVE_BLOCK_TYPES else None


def native_blocks(g: GGUFFile, config: LlamaConfig | GPT2Config) -> dict[str, tuple[int, torch.Tensor]]:
    """The 2-D weights stored as Q4_1 or Q8_0: name -> (native format, (rows, row bytes) uint8 blocks).

    Serving `--quantize int4` (or int8) on such a file uses these bytes directly: no expansion to floats and
    re-packing, so the served weights are exactly the file's. Q/K rows get the same un-permutation as the
    float path (it moves whole rows, and a row's blocks stay together).
    """
    if not isinstance(config, LlamaConfig):
        return {}
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for tensor in g.tensors:
        fmt = NATIVE_BLOCK_TYPES.get(tensor.type.name)
        name = _rename(tensor.name, _LLAMA_NAMES, _LLAMA_BLOCK_NAMES, "layers")
        if fmt is None or name is None or len(tensor.shape) != 2:
            continue
        raw = g.raw(tensor)  # (rows, row bytes)
        if name.endswith("q_proj.weight"):
            raw = unpermute_qk(raw, config.n_heads)
        elif name.endswith("k_proj.weight"):
            raw = unpermute_qk(raw, config.n_kv_heads)
        out[name] = (fmt, torch.from_numpy(np.array(raw, dtype=np.uint8, order="C")))
    return out


def _rename(name: str, names: dict[str, str], block_names: dict[str, str], blocks: str) -> str | None:
    if name in names:
        return names[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in block_names:
        return f"{blocks}.{parts[1]}.{block_names[parts[2]]}.{parts[3]}"
    return None
