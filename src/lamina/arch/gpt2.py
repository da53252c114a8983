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
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.config import config_from_dict, config_to_dict, dump_yaml, load_yaml
from lamina.arch.kv_cache import KVCache
from lamina.arch.moe import MoE, MoEConfig, num_active_params, total_aux_loss
from lamina.errors import ConfigError


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # context window (learned positions)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    moe: MoEConfig | None = None  # None: dense MLPs; set: mixture-of-experts FFNs (see lamina.arch.moe)
    layer_norm_eps: float = 1e-5
    bias: bool = True  # biases in linear layers and LayerNorms (nanoGPT can turn them off)
    dropout: float = 0.0
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"  # GPT-2 uses the tanh approximation; nanoGPT the exact GELU
    init_std: float = 0.02
    family: Literal["gpt2"] = field(default="gpt2")

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"activation must be 'gelu_tanh' or 'gelu' (got {self.activation!r})")
        if isinstance(self.moe, dict):
            self.moe = config_from_dict(MoEConfig, self.moe)
        if self.moe is not None and self.moe.every > self.n_layer:
            raise ConfigError(f"moe.every ({self.moe.every}) exceeds n_layer ({self.n_layer}): no block would use MoE")

    @property
    def max_seq_len(self) -> int:
        return self.n_positions

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        return config_from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> GPT2Config:
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
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
        assert config.n_inner is not None
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        moe = config.moe
        self.mlp: nn.Module
        if moe is not None and moe.in_layer(layer_idx):
            assert config.n_inner is not None
            self.mlp = MoE(config.n_embd, moe, config.n_inner, activation="gelu", bias=config.bias)
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
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = _dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        if not self.lm_head.weight.is_meta:  # on the meta device (loading a checkpoint) there is nothing to fill
            self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (GPT-2 / nanoGPT scheme)."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections, scaled by depth (GPT-2 paper)
                nn.init.normal_(p, mean=0.0, std=self.config.init_std / math.sqrt(2 * self.config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T), or (B, 1, vocab) if `last_only`; see `Llama.forward`."""
        T = tokens.shape[1]
        if getattr(cache, "ragged", False):  # a decode batch: one token per row, each row at its own position
            x = self.drop(self.wte(tokens) + self.wpe(cache.positions[:, None]))  # type: ignore[union-attr]
            for block in self.h:
                x = block(x, cache.mask, cache)  # type: ignore[union-attr]
            cache.advance(1)  # type: ignore[union-attr]
            return self.lm_head(self.ln_f(x if not last_only else x[:, -1:, :]))
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds n_positions {self.config.n_positions}")
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
        return self.lm_head(self.ln_f(x))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        ref = self.wte.weight  # (lm_head may be a quantised layer without a float weight)
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, dtype=ref.dtype, device=ref.device)

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
