"""Sentence embeddings: texts in, one unit vector per text out, as sentence-transformers computes them.

    from lamina import Embedder
    embedder = Embedder.load("all-minilm-l6-v2")
    vectors = embedder.embed(["A cat sits on the mat.", "Un chat est assis."])  # (2, 384) float32

A sentence-transformers folder is a Hugging Face BERT checkpoint plus three small files that say how to
turn its hidden states into one vector: `sentence_bert_config.json` (the maximum sequence length, which is
often shorter than the model's position table), `1_Pooling/config.json` (mean, CLS or max over tokens) and
`modules.json` (whether a Normalize module follows). This module reads those files, runs Lamina's own
`Bert` (lamina.arch.bert) and pools exactly as sentence-transformers does, so vectors agree with it to
float precision on the same folder.

Texts longer than the model's maximum are truncated (the tail is dropped, [SEP] kept), as every BERT
embedder does; `embed_with_info` says which texts were cut and how many tokens each one used, and
`count_tokens` lets callers chunk documents so that nothing is cut at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lamina.arch import Bert, BertConfig, build_model
from lamina.errors import ConfigError, InvalidRequestError, ModelFormatError
from lamina.foundation.tokenizer import Tokenizer, read_tokenizer_config
from lamina.infra.checkpoint import iter_safetensors, read_json
from lamina.infra.device import resolve_device, resolve_dtype
from lamina.infra.registry import ModelEntry, Registry
from lamina.settings import Settings

logger = logging.getLogger(__name__)

PoolingMode = Literal["cls", "max", "mean"]
# sentence-transformers concatenates the enabled modes in this order; the flags are 1_Pooling/config.json's.
_POOLING_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
}
_UNSUPPORTED_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
# The sentence-transformers modules this reader implements; anything else (Dense, CNN, ...) changes the
# vectors, so a folder that lists one is refused rather than embedded wrongly.
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
# Heads that BertFor* checkpoints carry on top of the encoder (masked LM, next sentence): not used here.
_HEAD_PREFIXES = ("cls.",)


@dataclass(frozen=True)
class Pooling:
    """How token vectors (B, T, C) become one vector per text, and whether it is scaled to unit length."""

    modes: tuple[PoolingMode, ...] = ("mean",)
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.modes:
            raise ConfigError("pooling needs at least one mode (cls, max or mean)")
        bad = [m for m in self.modes if m not in ("cls", "max", "mean")]
        if bad:
            raise ConfigError(f"unknown pooling modes {bad}; use cls, max or mean")

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C), mask (B, T) 1 for real tokens -> (B, len(modes) * C) in float32."""
        hidden = hidden.float()  # pool and normalise in fp32 whatever the model ran in
        keep = mask.to(hidden.dtype)  # (B, T)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                # sentence-transformers' constant, so an all-padding row gives the same answer
                parts.append(hidden.masked_fill(keep[:, :, None] == 0, -1e9).max(dim=1).values)
            else:
                summed = torch.bmm(keep[:, None, :], hidden)[:, 0]  # (B, C): sum over real tokens
                parts.append(summed / keep.sum(dim=1, keepdim=True).clamp(min=1e-9))
        pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


@dataclass
class Embeddings:
    """Vectors and what happened to each text on the way (`Embedder.embed_with_info`)."""

    vectors: np.ndarray
    """(N, dim) float32, in the order of the texts."""
    token_counts: list[int]
    """Tokens each text was embedded from, special tokens included, after truncation."""
    truncated: list[bool]
    """True where the text was longer than `Embedder.max_tokens` and its tail was dropped."""


class Embedder:
    """A BERT-family sentence embedder: tokenizer, encoder and pooling."""

    def __init__(
        self,
        model: Bert,
        tokenizer: Tokenizer,
        *,
        name: str,
        max_tokens: int,
        pooling: Pooling | None = None,
        lowercase: bool = False,
        entry: ModelEntry | None = None,
    ) -> None:
        config = model.config
        if not 2 < max_tokens <= config.max_positions:
            raise ConfigError(f"max_tokens must be in (2, max_positions={config.max_positions}] (got {max_tokens})")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling or Pooling()
        self.lowercase = lowercase
        self.entry = entry
        self._name = name
        self._max_tokens = max_tokens
        # The tokenizer encodes whole texts (callers chunk with it, so counts must not be cut off); the
        # embedder truncates itself. tokenizer.json files often carry padding/truncation settings of their
        # own (MiniLM's pads and truncates to 128), which would silently change the vectors.
        backend = tokenizer.backend
        backend.no_padding()
        backend.no_truncation()
        self._n_special = backend.num_special_tokens_to_add(False)
        self._pad_id = config.pad_token_id

    @classmethod
    def load(
        cls,
        model: str = "all-minilm-l6-v2",
        *,
        device: str = "cpu",
        dtype: str = "float32",
        home: Path | None = None,
    ) -> Embedder:
        """Load an embedding model by id (see `lamina models`) or a sentence-transformers / BERT folder.

        device: auto|cpu|cuda|cuda:N|mps; dtype: auto|float32|bfloat16|float16. A plain BERT folder with
        no sentence-transformers files embeds by mean pooling without normalisation, up to the model's
        maximum length.

        home: Lamina's home folder, where registered models are found and the dtype probe is cached. When
        it is not given, `Settings()` is built here, so LAMINA_HOME (or ~/.lamina) is read at this call:
        the process-wide cached settings are never consulted, and callers that know the home pass it.
        """
        home = Path(home).expanduser() if home else Settings().home
        entry = Registry(home).resolve(model)
        if entry.format != "hf" or entry.task != "embed":
            raise InvalidRequestError(
                f"model {entry.id!r} is a {entry.task} model ({entry.format}), not an embedding model; "
                "use all-minilm-l6-v2 or a sentence-transformers folder",
                param="model",
            )
        folder = entry.path
        config = bert_config(read_json(folder / "config.json"), folder)
        st = _sentence_transformers_files(folder, config)  # refuse unsupported pipelines before reading weights
        tokenizer = Tokenizer.from_folder(folder)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, home / "cache")
        net = build_model(config, bert_state_dict(folder), device=dev, dtype=dt).eval()
        assert isinstance(net, Bert)
        logger.info("loaded embedder %s (%d layers, dim %d) on %s in %s", entry.id, config.n_layers, config.dim, dev, dt)
        return cls(net, tokenizer, name=entry.id, entry=entry, **st)

    # --- what it is -------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return len(self.pooling.modes) * self.model.config.dim

    @property
    def max_tokens(self) -> int:
        """The longest input, special tokens included; longer texts are truncated."""
        return self._max_tokens

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word_embeddings.weight.device

    def count_tokens(self, text: str) -> int:
        """Tokens `text` encodes to, special tokens included, before truncation (> max_tokens: it would be cut)."""
        return len(self.tokenizer.backend.encode(self._prepare(text, "text")).ids)

    # --- embedding --------------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(len(texts), dim) float32 vectors, in the order of `texts`."""
        return self.embed_with_info(texts, batch_size).vectors

    def embed_with_info(self, texts: Sequence[str], batch_size: int = 32) -> Embeddings:
        """Vectors plus, per text, the tokens used and whether it was truncated."""
        if isinstance(texts, str):
            raise InvalidRequestError("texts must be a list of strings, not one string; pass [text]", param="input")
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be >= 1 (got {batch_size})", param="batch_size")
        prepared = [self._prepare(t, f"texts[{i}]") for i, t in enumerate(texts)]
        ids, truncated = self._tokenize(prepared)
        counts = [len(x) for x in ids]
        vectors = np.empty((len(ids), self.dim), dtype=np.float32)
        # Longest first, as sentence-transformers does: batches hold texts of similar length, so little
        # compute goes into padding, and the first batch shows at once whether memory suffices.
        order = sorted(range(len(ids)), key=lambda i: -counts[i])
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                vectors[batch] = self._embed_batch([ids[i] for i in batch])
        return Embeddings(vectors=vectors, token_counts=counts, truncated=truncated)

    def _prepare(self, text: Any, where: str) -> str:
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"{where} is {type(text).__name__} ({str(text)[:40]!r}), not a string", param="input"
            )
        return text.lower() if self.lowercase else text

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text, cut to max_tokens the way transformers' truncation does it.

        The content is cut to leave room for the special tokens, which the post-processor then adds, so
        a truncated text still ends in [SEP].
        """
        backend = self.tokenizer.backend
        room = self._max_tokens - self._n_special
        ids, truncated = [], []
        for encoding in backend.encode_batch(texts, add_special_tokens=False):
            cut = len(encoding.ids) > room
            if cut:
                encoding.truncate(room)
            ids.append(backend.post_process(encoding).ids)
            truncated.append(cut)
        return ids, truncated

    def _embed_batch(self, batch: list[list[int]]) -> np.ndarray:
        longest = max(len(x) for x in batch)
        input_ids = np.full((len(batch), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        input_t = torch.from_numpy(input_ids).to(self.device)  # (B, T)
        mask_t = torch.from_numpy(mask).to(self.device)  # (B, T)
        hidden = self.model(input_t, mask_t)  # (B, T, C)
        return self.pooling(hidden, mask_t).cpu().numpy()  # (B, dim)


# --- reading a sentence-transformers folder ---------------------------------------------------------------


def bert_config(hf: dict[str, Any], folder: Path) -> BertConfig:
    """BertConfig from a Hugging Face config.json, refusing variants this model code does not implement."""
    if hf.get("model_type") != "bert":
        raise ModelFormatError(
            f"{folder}: model_type {hf.get('model_type')!r} is not supported for embeddings; "
            "Lamina's embedder runs BERT-family encoders (model_type 'bert', e.g. all-MiniLM-L6-v2)"
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelFormatError(f"{folder}: hidden_act {act!r} is not supported; Lamina's Bert uses exact GELU")
    positions = hf.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ModelFormatError(f"{folder}: position_embedding_type {positions!r} is not supported (only 'absolute')")
    try:
        return BertConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            hidden_dim=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id") or 0,
        )
    except KeyError as e:
        raise ModelFormatError(f"{folder}/config.json: missing {e.args[0]!r}") from None


def bert_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors under BertModel's names: `bert.`/`model.` prefixes stripped, task heads dropped.

    The NSP pooler and saved position ids stay in; `build_model` knows to leave them out.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in iter_safetensors(folder):
        for prefix in ("bert.", "model."):
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        if not name.startswith(_HEAD_PREFIXES):
            tensors[name] = tensor
    return tensors


def _sentence_transformers_files(folder: Path, config: BertConfig) -> dict[str, Any]:
    """max_tokens, pooling and lowercase as sentence-transformers would set them up for this folder."""
    modules_file = folder / "modules.json"
    modules = _read_json_list(modules_file) if modules_file.exists() else []
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [t for t in types if t not in _KNOWN_MODULES]
    if unknown:
        raise ModelFormatError(
            f"{modules_file}: modules {unknown} are not supported; Lamina's embedder implements {list(_KNOWN_MODULES)}"
        )
    pooling = Pooling(modes=("mean",), normalize="Normalize" in types)
    pooling_dirs = [m.get("path", "") for m, t in zip(modules, types, strict=True) if t == "Pooling"]
    if pooling_dirs:
        pooling = Pooling(modes=_pooling_modes(folder / pooling_dirs[0] / "config.json"), normalize=pooling.normalize)

    st_file = folder / "sentence_bert_config.json"
    st = read_json(st_file) if st_file.exists() else {}
    tok_max = read_tokenizer_config(folder).get("model_max_length")
    # sentence-transformers' order: its own max_seq_length, else the tokenizer's; never beyond the positions.
    max_tokens = st.get("max_seq_length") or (tok_max if isinstance(tok_max, int) else None) or config.max_positions
    return {
        "max_tokens": min(int(max_tokens), config.max_positions),
        "pooling": pooling,
        "lowercase": bool(st.get("do_lower_case", False)),
    }


def _pooling_modes(path: Path) -> tuple[PoolingMode, ...]:
    cfg = read_json(path)
    wanted = [flag for flag in _UNSUPPORTED_POOLING if cfg.get(flag)]
    if wanted:
        raise ModelFormatError(f"{path}: pooling {wanted} is not supported; Lamina pools by cls, max or mean")
    modes = tuple(mode for flag, mode in _POOLING_FLAGS.items() if cfg.get(flag))
    if not modes:
        raise ModelFormatError(f"{path}: no pooling mode enabled (expected one of {list(_POOLING_FLAGS)})")
    return modes


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    """modules.json is a JSON list of objects (read_json accepts objects only)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise ModelFormatError(f"{path}: expected a JSON list of module objects")
    return data
