"""The BERT family of bidirectional encoders: BERT, MiniLM and the sentence-transformers models built on them.

One file, top to bottom: BertConfig -> Embeddings -> self-attention -> Layer -> Bert. Where BERT differs
from the decoders next door (llama.py, gpt2.py): attention is bidirectional, so the only mask is padding;
positions are learned absolute embeddings plus a token-type (segment) embedding; blocks are post-norm
(`LayerNorm(x + sublayer(x))`, the 2018 original) with exact (erf) GELU; there is no LM head, the output
is the last hidden states, which an embedder pools into one vector per text.

Parameter names equal Hugging Face's `BertModel` state dict (`encoder.layer.0.attention.self.query`), so
its safetensors load one to one; the nesting of the small modules below exists only to spell those names.
HF's pooler (`pooler.dense`, a tanh layer over [CLS] for next-sentence prediction) is not part of the model:
sentence embedders do not use it, and `build_model` drops it from checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.config import ConfigIO
from lamina.arch.layers import embedding
from lamina.errors import ConfigError

# Checkpoint tensors a BertModel carries that this model does not use: the NSP pooler, and the
# `position_ids` buffer (0..max_positions-1) that older transformers versions saved with the weights.
UNUSED_CHECKPOINT_KEYS = ("pooler.", "embeddings.position_ids")


@dataclass
class BertConfig(ConfigIO):
    # sizes
    vocab_size: int = 30522
    dim: int = 768  # residual stream width (hidden_size)
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072  # GELU MLP inner width (intermediate_size)
    # positions and segments
    max_positions: int = 512  # learned absolute positions (max_position_embeddings)
    type_vocab_size: int = 2  # segment ids (token_type_ids): sentence A / sentence B
    # details
    norm_eps: float = 1e-12  # layer_norm_eps
    pad_token_id: int = 0
    init_std: float = 0.02  # for training from scratch
    family: Literal["bert"] = field(default="bert")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_positions", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}) (got {self.pad_token_id})")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0 (got {self.norm_eps})")
        if self.family != "bert":
            raise ConfigError(f"BertConfig.family must be 'bert' (got {self.family!r})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_seq_len(self) -> int:
        return self.max_positions


class Embeddings(nn.Module):
    """LayerNorm(word + absolute position + token type) for each token."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = embedding(config.max_positions, config.dim)
        self.token_type_embeddings = embedding(config.type_vocab_size, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, T, C)
        x = x + self.position_embeddings.weight[:T]  # (T, C), broadcast over the batch
        if token_type_ids is None:  # one segment: every token is type 0, no lookup needed
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention: every token sees every non-padding token."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.query = nn.Linear(config.dim, config.dim)
        self.key = nn.Linear(config.dim, config.dim)
        self.value = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, C)


class SelfOutput(nn.Module):
    """The attention's output projection, then the post-norm residual."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + residual)


class Attention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config)  # the name HF checkpoints use: `attention.self.query`
        self.output = SelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """The MLP's up projection with exact (erf) GELU, as BERT was trained (not GPT-2's tanh approximation)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # (B, T, hidden_dim)


class Output(nn.Module):
    """The MLP's down projection, then the post-norm residual."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_dim, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Layer(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) 1/0 token mask -> (B, 1, 1, T) boolean key mask for SDPA; None when nothing is padding.

    Only keys are masked: padding queries still attend to the real tokens and produce finite values that
    pooling ignores. A row with no real token at all would leave a query with nothing to attend to (NaN in
    SDPA), so such rows are allowed to attend everywhere, as HF's large-negative additive mask effectively does.
    """
    keep = attention_mask.bool()
    if bool(keep.all()):  # no padding: SDPA's unmasked kernel is the fastest path
        return None
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        if not self.embeddings.word_embeddings.weight.is_meta:  # meta device (loading a checkpoint): nothing to fill
            self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (BERT's scheme: normal(0, 0.02), LayerNorm = 1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, dim) for input_ids (B, T); attention_mask (B, T) is 1 for real tokens.

        token_type_ids (B, T) are segment ids (None: all 0, one segment). Rows are right- or left-padded
        alike: positions count from the first column, as in Hugging Face.
        """
        length = input_ids.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"sequence of {length} tokens exceeds max_positions {self.config.max_positions}")
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        return self.encoder(x, mask)  # (B, T, C)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
