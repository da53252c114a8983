"""Training a byte-level BPE tokenizer (GPT-2 style) on a dataset, with the `tokenizers` library.

The result is saved as tokenizer.json + tokenizer_config.json, which `transformers.AutoTokenizer` and
Lamina's `Tokenizer.from_file` both load. Byte-level means every byte has a token, so nothing is ever
unknown; the vocabulary therefore needs at least 256 entries plus the special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lamina.errors import InvalidRequestError
from lamina.foundation.tokenizer import Tokenizer
from lamina.infra.fs import atomic_write_text

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT,)
BYTE_ALPHABET = 256


def train_bpe(texts: Iterable[str], vocab_size: int, *, special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
              min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (bytes, specials and merges) learned from `texts`."""
    floor = BYTE_ALPHABET + len(special_tokens)
    if vocab_size < floor:
        raise InvalidRequestError(
            f"vocab_size {vocab_size} is smaller than the byte alphabet plus special tokens ({floor}); "
            f"use --vocab-size {floor} or more (a few thousand suits a small corpus)", param="vocab_size")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token=None, eos_token=special_tokens[0], pad_token=special_tokens[0], unk_token=None)


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """tokenizer.json and a tokenizer_config.json that transformers' PreTrainedTokenizerFast understands."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "tokenizer.json", tokenizer.backend.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000,
              **tokenizer.special_tokens_map(), "clean_up_tokenization_spaces": False}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
