"""Tokenizers: one class over the `tokenizers` library, built from a tokenizer.json or from a vocabulary.

GGUF files carry no tokenizer.json, only the vocabulary, the merges and a `tokenizer.ggml.pre` name for
how text is split before BPE. `byte_level_bpe` rebuilds the tokenizer from those, with the split rules
llama.cpp uses for each name (llama.cpp's `llama-vocab.cpp` is the reference: a GGUF's tokenizer means
what llama.cpp does with it). Special (control) tokens are matched whole in text, and the BOS rule is a
post-processor, so `encode(text)` adds BOS exactly when the model wants it.

A Hugging Face folder (an LLM's or an embedding model's) keeps its tokenizer in `tokenizer.json`, with the
special tokens named in `special_tokens_map.json` / `tokenizer_config.json`: `Tokenizer.from_folder` reads
the three, and `read_tokenizer_config` the last two, for every loader that meets such a folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lamina.errors import ModelFormatError

# GPT-2's split, which `pre_tokenizers.ByteLevel(use_regex=True)` applies by itself.
_GPT2 = None
# Llama 3 / tiktoken-style split: case-insensitive contractions, numbers in groups of up to three.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Every number code point on its own first, then GPT-2's split (llama.cpp applies regexes in sequence).
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)

# tokenizer.ggml.pre -> the regexes applied in order before byte-level BPE (None: GPT-2's).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str | None, ...]] = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "gpt-2": (_GPT2,),
    "phi-2": (_GPT2,),
    "jina-v2-es": (_GPT2,),
    "jina-v2-de": (_GPT2,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise ModelFormatError(
            f"unsupported tokenizer.ggml.pre {pre!r}: Lamina does not know how this vocabulary splits text; "
            f"known: {sorted(PRE_TOKENIZER_SPLITS)}"
        )
    steps: list[pre_tokenizers.PreTokenizer] = []
    for regex in splits:
        if regex is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    if splits[-1] is not None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_UNICODE_TO_BYTES: dict[str, int] = {}


def _unicode_to_bytes() -> dict[str, int]:
    if not _UNICODE_TO_BYTES:
        _UNICODE_TO_BYTES.update({c: b for b, c in _bytes_to_unicode().items()})
    return _UNICODE_TO_BYTES


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """special_tokens_map.json updated by tokenizer_config.json, as transformers merges them; {} if neither."""
    # Imported here: lamina.infra.checkpoint loads torch, and this module stays light without it.
    from lamina.infra.checkpoint import read_json

    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).exists():
            config.update(read_json(folder / name))
    return config


class Tokenizer:
    """Text <-> token ids, with the model's special tokens."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, config: dict[str, Any] | None = None) -> Tokenizer:
        """From a tokenizer.json, with special tokens named in a tokenizer_config.json dict."""
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelFormatError(f"cannot read tokenizer {str(path)!r}: {e}") from None
        config = config or {}

        def token(name: str) -> str | None:
            value = config.get(name)
            if isinstance(value, dict):  # older files store AddedToken dicts
                value = value.get("content")
            return value

        tokenizer = cls(
            backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            unk_token=token("unk_token"),
        )
        # tokenizer_config.json can ask for BOS/EOS that tokenizer.json's post-processor does not add
        # (Llama-2-style configs); transformers honours the flags, and so do we.
        if config.get("add_bos_token") or config.get("add_eos_token"):
            tokenizer._set_template(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        return tokenizer

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """From a Hugging Face folder: its tokenizer.json, special tokens from its tokenizer config files."""
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelFormatError(
                f"{folder}: no tokenizer.json (Lamina needs the fast-tokenizer file; save it with "
                "tokenizer.save_pretrained from transformers)"
            )
        return cls.from_file(path, read_tokenizer_config(folder))

    @classmethod
    def byte_level_bpe(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        *,
        token_types: Sequence[int] | None = None,
        pre: str = "default",
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> Tokenizer:
        """A GPT-2-style byte-level BPE tokenizer from a vocabulary in id order and its merges.

        token_types follow llama.cpp: 3 = control (special, matched whole, skipped by
        `decode(skip_special_tokens=True)`), 4 = user-defined (matched whole, kept in decoding).
        """
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        types = list(token_types or [])
        specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
        user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
        if specials:
            backend.add_special_tokens(specials)
        if user:
            backend.add_tokens(user)

        def name(i: int | None) -> str | None:
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        tokenizer = cls(backend, bos_token=name(bos_id), eos_token=name(eos_id), pad_token=name(pad_id), unk_token=name(unk_id))
        tokenizer._set_template(add_bos, add_eos)
        return tokenizer

    def _set_template(self, add_bos: bool, add_eos: bool) -> None:
        """Make `encode(..., add_special_tokens=True)` wrap text in BOS/EOS as the model expects."""
        bos = self.bos_token if add_bos and self.bos_token is not None else None
        eos = self.eos_token if add_eos and self.eos_token is not None else None
        if bos is None and eos is None:
            self.backend.post_processor = None
            return
        single = " ".join(t for t in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if t)
        pair = " ".join(t for t in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0", bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if t)
        special = [(t, self.backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # --- use ----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special-token strings in `text` (like `<|im_start|>`) become their single ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (what OpenAI's logprobs `bytes` report).

        Byte-level BPE spells bytes as printable characters (GPT-2's table); special and added tokens are
        their UTF-8 text.
        """
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        added = self.backend.get_added_tokens_decoder().get(token_id)
        if added is not None or not self._byte_level:
            return self.decode([token_id]).encode("utf-8") if added is None else piece.encode("utf-8")
        table = _unicode_to_bytes()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")

    @property
    def _byte_level(self) -> bool:
        return isinstance(self.backend.decoder, decoders.ByteLevel)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def special_tokens_map(self) -> dict[str, str]:
        """bos_token/eos_token/... as chat templates expect to find them."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token}
        return {k: v for k, v in names.items() if v is not None}

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json naming the special tokens."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self.special_tokens_map(), indent=2))
