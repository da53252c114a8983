"""The Llama family of decoder-only transformers: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2.

One file, top to bottom: LlamaConfig -> RMSNorm -> rotary embeddings -> Attention -> MLP -> Block -> Llama.
What distinguishes the members is data in the config, not code paths:
- grouped-query attention through `n_kv_heads` (= n_heads: MHA, 1: MQA, in between: GQA);
- RoPE base `rope_theta` and optional scaling (`linear`, or Llama 3's frequency-band `llama3`);
- `qkv_bias` (Qwen2), `sliding_window` (Mistral), tied or separate input/output embeddings;
- `moe`: a mixture-of-experts FFN of SwiGLU experts (`lamina.arch.moe`) in place of the dense MLP (Mixtral).

Parameter names follow the Hugging Face layout without the `model.` prefix (`layers.0.self_attn.q_proj`),
so safetensors and PEFT adapters map one to one. Attention goes through `scaled_dot_product_attention`;
the KV cache (`lamina.arch.kv_cache.KVCache`) makes decoding one token cost one pass over the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.config import ConfigIO, config_from_dict
from lamina.arch.kv_cache import KVCache
from lamina.arch.layers import embedding
from lamina.arch.moe import MoE, MoEConfig, num_active_params, total_aux_loss
from lamina.errors import ConfigError


@dataclass
class RopeScaling:
    """How rotary frequencies are stretched for contexts longer than the model was trained on."""

    type: Literal["linear", "llama3"] = "linear"
    factor: float = 1.0
    # llama3 only: frequencies below/above these bands are scaled fully/not at all, smoothly in between.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.type not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling.type must be 'linear' or 'llama3' (got {self.type!r})")
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0 (got {self.factor})")


@dataclass
class LlamaConfig(ConfigIO):
    # sizes
    vocab_size: int = 32000
    dim: int = 4096  # residual stream width (hidden_size)
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA; a divisor of n_heads: GQA
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 11008  # SwiGLU inner width (intermediate_size)
    moe: MoEConfig | None = None  # None: dense MLPs; set: mixture-of-experts FFNs (see lamina.arch.moe)
    # positions
    max_seq_len: int = 4096  # context window
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # Mistral: attend to at most this many previous positions
    # details
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 puts biases on q, k and v
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix
    init_std: float = 0.02  # for training from scratch
    family: Literal["llama"] = field(default="llama")

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings (got {self.head_dim})")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = config_from_dict(RopeScaling, self.rope_scaling)
        if isinstance(self.moe, dict):
            self.moe = config_from_dict(MoEConfig, self.moe)
        if self.moe is not None and self.moe.every > self.n_layers:
            raise ConfigError(f"moe.every ({self.moe.every}) exceeds n_layers ({self.n_layers}): no block would use MoE")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the activation dtype (as the reference does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies (head_dim/2,), with the configured scaling applied."""
    hd = config.head_dim
    assert hd is not None
    # computed on the CPU whatever device is current: on the meta device (a checkpoint being loaded) `pow` costs
    # torch about 2 s of one-time setup in a process
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.type == "linear":
        # Positions are divided by the factor; dividing the frequencies is the same thing.
        return inv_freq / s.factor
    # llama3: long wavelengths are stretched by `factor`, short ones kept, a smooth ramp in between.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin for positions start..start+length-1, each (length, head_dim), in `dtype`."""
    pos = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): the two halves of each head rotate together
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_at(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin (B, 1, T, head_dim) for per-row positions (B, T): rows of a batch at different lengths."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) of x (B, H, T, hd) by each position's angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


PromptAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "int | None"], torch.Tensor]
"""A kernel for a prompt chunk's causal attention: (q (1, nh, T, hd), k, v (1, nkv, S, hd), sliding window) ->
(1, T, nh * hd), the chunk's queries sitting at positions S - T .. S - 1."""


class Attention(nn.Module):
    prompt_attention: PromptAttention | None = None
    """Set by the inference layer (`lamina.llm.kernels.native_decode.use_native_prompt_attention`) where it has a
    faster kernel: used for float32 and bfloat16 prompt chunks (batch 1, T > 1) over a cache, without autograd."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.head_dim is not None and config.n_kv_heads is not None
        self.layer_idx = layer_idx
        self.sliding_window = config.sliding_window
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd), S = cached + T
            if (self.prompt_attention is not None and B == 1 and T > 1 and q.dtype in (torch.float32, torch.bfloat16)
                    and not getattr(cache, "ragged", False) and not torch.is_grad_enabled()):
                return self.o_proj(self.prompt_attention(q, k, v, self.sliding_window))
        y = attend(q, k, v, mask)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, nh, T, hd) over k, v (B, nkv, S, hd) -> (B, nh, T, hd).

    `mask` (T, S) says which keys each query sees; None means plain causal, which needs T == S, or
    T == 1 (one new query sees everything cached). Grouped-query heads share kv heads without copies:
    for one query the n_rep heads sharing a kv head are folded into the query axis,
    (B, nh, 1, hd) -> (B, nkv, n_rep, hd); longer queries use SDPA's own GQA path.
    """
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    if T == 1 and (mask is None or mask.dim() == 4):  # a (B, 1, 1, S) row mask broadcasts over the folded heads
        y = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hd), k, v, attn_mask=mask)
        return y.view(B, nh, 1, hd)
    gqa = nkv != nh
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def causal_mask(T: int, S: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """(T, S) boolean, True where query t (at position S-T+t) may attend to key s."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        moe = config.moe
        self.mlp: nn.Module
        if moe is not None and moe.in_layer(layer_idx):
            self.mlp = MoE(config.dim, moe, config.hidden_dim, activation="swiglu", bias=False)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config).to(torch.get_default_device()), persistent=False)
        if not self.lm_head.weight.is_meta:  # on the meta device (loading a checkpoint) there is nothing to fill
            self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (GPT-2 / nanoGPT scheme)."""
        self.apply(self._init_weights)
        # Residual projections start smaller so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
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
        """Logits (B, T, vocab) for tokens (B, T), or (B, 1, vocab) for the last position if `last_only`, or
        (n, vocab) for the n positions a (B, T) bool mask `logits_at` selects (a loss over some tokens only:
        the vocab-sized head, its logits and their gradients cost nothing at the other positions).

        With a cache, `tokens` continue the cached sequence: they sit at positions cache.length onwards.
        """
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)  # (B, T, dim)
        if getattr(cache, "ragged", False):  # a decode batch: one token per row, each row at its own position
            cos, sin = rope_at(self.inv_freq, cache.positions[:, None], x.dtype)  # type: ignore[union-attr]
            mask = cache.mask  # type: ignore[union-attr]
            window = self.config.sliding_window
            if window is not None:
                keys = torch.arange(mask.shape[-1], device=x.device)
                mask = mask & (keys > cache.positions[:, None] - window)[:, None, None, :]  # type: ignore[union-attr]
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = rope_cos_sin(self.inv_freq, start, T, x.dtype)
            mask = self._mask(T, start + T, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        elif logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.norm(x))

    def _mask(self, T: int, S: int, device: torch.device) -> torch.Tensor | None:
        """None when plain causal attention (or a single query over everything) is right."""
        window = self.config.sliding_window
        if window is not None and window < S:
            return causal_mask(T, S, device, window)
        if T == 1 or T == S:
            return None
        return causal_mask(T, S, device)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        assert c.n_kv_heads is not None and c.head_dim is not None
        ref = self.embed_tokens.weight  # (lm_head may be a quantised layer without a float weight)
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim, dtype=ref.dtype, device=ref.device)

    def num_params(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def num_active_params(self) -> int:
        """Parameters used per token: `num_params` less the experts an MoE model does not route a token to."""
        return num_active_params(self)

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' weighted auxiliary losses of the last forward (0 for a dense model, or in eval).

        A training step adds it to the task loss: `loss = cross_entropy + model.aux_loss()`.
        """
        return total_aux_loss(self, self.embed_tokens.weight.device)
