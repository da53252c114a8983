"""The GPT-2 family of decoder-only transformers (GPT-2, nanoGPT-style models).

One file, top to bottom: GPT2Config -> Attention -> MLP -> Block -> GPT2. What sets it apart from the
Llama family: learned absolute position embeddings, LayerNorm with biases, GELU (tanh approximation), a
fused qkv projection, biases on every linear layer, and a tied input/output embedding. Setting `moe` swaps
the MLPs for mixture-of-experts FFNs of GELU experts (`lamina.arch.moe`).

Parameter names follow Hugging Face's `GPT2LMHeadModel` without the `transformer.` prefix (`h.0.attn.c_attn`),
as nanoGPT does; weights are plain `nn.Linear` (out, in), so HF's Conv1D (in, out) weights are transposed
on load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.config import ConfigIO, config_from_dict
from lamina.arch.kv_cache import KVCache
from lamina.arch.layers import embedding
from lamina.arch.moe import MoE, MoEConfig, num_active_params, total_aux_loss
from lamina.errors import ConfigError

LEGACY_NAMES = {"n_positions": "max_seq_len", "n_embd": "dim", "n_layer": "n_layers", "n_head": "n_heads",
                "n_inner": "hidden_dim"}
"""GPT-2's (and Hugging Face's) names for the sizes, read as Lamina's."""


@dataclass
class GPT2Config(ConfigIO):
    # sizes: the same names as every other family (LlamaConfig), so engine code reads any config alike
    vocab_size: int = 50257
    max_seq_len: int = 1024  # context window (learned positions; HF: n_positions)
    dim: int = 768  # residual stream width (HF: n_embd)
    n_layers: int = 12  # (HF: n_layer)
    n_heads: int = 12  # (HF: n_head)
    hidden_dim: int | None = None  # MLP width (HF: n_inner); None: 4 * dim
    moe: MoEConfig | None = None  # None: dense MLPs; set: mixture-of-experts FFNs (see lamina.arch.moe)
    layer_norm_eps: float = 1e-5
    bias: bool = True  # biases in linear layers and LayerNorms (nanoGPT can turn them off)
    dropout: float = 0.0
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"  # GPT-2 uses the tanh approximation; nanoGPT the exact GELU
    init_std: float = 0.02
    family: Literal["gpt2"] = field(default="gpt2")

    def __post_init__(self) -> None:
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.dim
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"activation must be 'gelu_tanh' or 'gelu' (got {self.activation!r})")
        if isinstance(self.moe, dict):
            self.moe = config_from_dict(MoEConfig, self.moe)
        if self.moe is not None and self.moe.every > self.n_layers:
            raise ConfigError(f"moe.every ({self.moe.every}) exceeds n_layers ({self.n_layers}): no block would use MoE")

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads  # GPT-2 attention is multi-head: one key/value head per query head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        """Also reads GPT-2's own size names (n_embd, n_layer, ...), as configs saved by earlier Lamina versions have them."""
        return config_from_dict(cls, {LEGACY_NAMES.get(k, k): v for k, v in data.items()})


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_heads, config.dim // config.n_heads
        self.c_attn = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.dim, config.dim, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hd)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # plain causal (T == S), or one query that sees everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        assert config.hidden_dim is not None
        self.c_fc = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps, bias=config.bias)
        moe = config.moe
        self.mlp: nn.Module
        if moe is not None and moe.in_layer(layer_idx):
            assert config.hidden_dim is not None
            self.mlp = MoE(config.dim, moe, config.hidden_dim, activation="gelu", bias=config.bias)
        else:
            self.mlp = MLP(config)
        self.drop = _dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = embedding(config.vocab_size, config.dim)
        self.wpe = embedding(config.max_seq_len, config.dim)
        self.drop = _dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        if not self.lm_head.weight.is_meta:  # on the meta device (loading a checkpoint) there is nothing to fill
            self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (GPT-2 / nanoGPT scheme)."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections, scaled by depth (GPT-2 paper)
                nn.init.normal_(p, mean=0.0, std=self.config.init_std / math.sqrt(2 * self.config.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T), (B, 1, vocab) if `last_only`, or (n, vocab) at the positions
        of the bool mask `logits_at`; see `Llama.forward`."""
        T = tokens.shape[1]
        if getattr(cache, "ragged", False):  # a decode batch: one token per row, each row at its own position
            x = self.drop(self.wte(tokens) + self.wpe(cache.positions[:, None]))  # type: ignore[union-attr]
            for block in self.h:
                x = block(x, cache.mask, cache)  # type: ignore[union-attr]
            cache.advance(1)  # type: ignore[union-attr]
            return self.lm_head(self.ln_f(x if not last_only else x[:, -1:, :]))
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        pos = torch.arange(start, start + T, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(pos))  # (B, T, C)
        mask = None
        if 1 < T < start + T:  # several new queries after a cached prefix: causal, offset by the prefix
            q_pos = pos[:, None]
            mask = torch.arange(start + T, device=tokens.device)[None, :] <= q_pos
        for block in self.h:
            x = block(x, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        elif logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.ln_f(x))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        ref = self.wte.weight  # (lm_head may be a quantised layer without a float weight)
        return KVCache(c.n_layers, batch_size, c.n_heads, max_len, c.head_dim, dtype=ref.dtype, device=ref.device)

    def num_params(self) -> int:
        """Unique parameters (the tied embedding counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def num_active_params(self) -> int:
        """Parameters used per token: `num_params` less the experts an MoE model does not route a token to."""
        return num_active_params(self)

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' weighted auxiliary losses of the last forward (0 for a dense model), as `Llama.aux_loss`."""
        return total_aux_loss(self, self.wte.weight.device)


def _dropout(p: float) -> nn.Module:
    """Dropout, or nothing at all when p is 0 (a no-op module still costs a call per block per step)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()
