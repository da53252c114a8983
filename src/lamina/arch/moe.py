"""A mixture-of-experts feed-forward layer: a drop-in for a family's MLP (Switch Transformer, Mixtral).

One file, top to bottom: MoEConfig -> the two expert MLPs (SwiGLU for Llama, GELU for GPT-2) -> MoE ->
helpers the models use to sum auxiliary losses and count active parameters.

Each token goes to its `top_k` experts, chosen by a linear router; the layer's output is the weighted sum of
those experts' outputs. Routing is dropless: there is no capacity limit, every assignment is computed, so a
token's output never depends on which other tokens share its batch. The (token, expert) assignments are
sorted by expert so that each expert runs one matmul over a contiguous block of its tokens; the only Python
loop is over experts.

Training adds a load-balancing loss (Switch Transformer eq. 4, generalised to top-k), and optionally the
router z-loss (ST-MoE), through the model's `aux_loss()`; without them a router soon sends most tokens to a
few experts and the rest stop learning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import ConfigError


@dataclass
class MoEConfig:
    """A mixture-of-experts FFN, set as `moe:` in a family config (None there: dense MLPs)."""

    n_experts: int = 8
    top_k: int = 2  # experts per token
    expert_hidden_dim: int | None = None  # each expert's MLP width; None: the family's dense width
    # Weights of the chosen experts: softmax over all experts, then the top-k renormalised to sum to 1
    # (Mixtral). With top_k=1 that weight is always 1 and the router would get no gradient from the task loss,
    # so top_k=1 wants `normalize_top_k: false` (Switch Transformer: scale by the router probability).
    normalize_top_k: bool = True
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (Switch/Mixtral use 0.01-0.02)
    z_loss_coef: float = 0.0  # weight of the router z-loss, mean(logsumexp(logits)^2) (ST-MoE: 1e-3); 0: off
    every: int = 1  # MoE in blocks every-1, 2*every-1, ... (1: all; 2: every other block, as GShard/Switch)

    def __post_init__(self) -> None:
        if self.n_experts < 2:
            raise ConfigError(f"moe.n_experts must be >= 2 (got {self.n_experts}); for one expert drop `moe` (dense MLP)")
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"moe.top_k must be between 1 and n_experts={self.n_experts} (got {self.top_k})")
        if self.expert_hidden_dim is not None and self.expert_hidden_dim < 1:
            raise ConfigError(
                f"moe.expert_hidden_dim must be >= 1, or null for the dense width (got {self.expert_hidden_dim})"
            )
        if self.top_k == 1 and self.normalize_top_k:
            raise ConfigError(
                "moe.top_k=1 with normalize_top_k=true gives every token a weight of exactly 1, so the router "
                "learns nothing from the task loss; set normalize_top_k: false (Switch Transformer) or top_k >= 2"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name} must be >= 0 (got {getattr(self, name)})")
        if self.every < 1:
            raise ConfigError(f"moe.every must be >= 1 (got {self.every})")

    def in_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` gets an MoE FFN (the last block of every group of `every`)."""
        return (layer_idx + 1) % self.every == 0


class SwiGLUExpert(nn.Module):
    """One Llama-family expert: down(silu(gate(x)) * up(x)), named like `llama.MLP`."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUExpert(nn.Module):
    """One GPT-2-family expert: c_proj(gelu_tanh(c_fc(x))), named like `gpt2.MLP`."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim, bias=bias)
        self.c_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


EXPERTS: dict[str, type[nn.Module]] = {"swiglu": SwiGLUExpert, "gelu": GELUExpert}


class MoE(nn.Module):
    """Router + experts. forward (B, T, C) -> (B, T, C); the last forward's statistics stay on the module.

    After each forward:
    - `tokens_per_expert` (n_experts,) int64: assignments each expert received (sums to B*T*top_k);
    - `balance_loss`, `z_loss`: unweighted scalar float32 losses when training with autograd on, else 0.
      `balance_loss` is 1.0 at perfectly uniform routing and up to n_experts when one expert gets everything;
    - `aux_loss()`: both weighted by their coefficients, the term the training loss adds.
    """

    def __init__(
        self, dim: int, config: MoEConfig, hidden_dim: int, activation: Literal["swiglu", "gelu"], bias: bool = False
    ) -> None:
        super().__init__()
        if activation not in EXPERTS:
            raise ConfigError(f"MoE activation must be one of {sorted(EXPERTS)} (got {activation!r})")
        self.config = config
        self.n_experts, self.top_k = config.n_experts, config.top_k
        width = config.expert_hidden_dim or hidden_dim
        self.router = nn.Linear(dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(EXPERTS[activation](dim, width, bias) for _ in range(config.n_experts))
        self.tokens_per_expert: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        E, K = self.n_experts, self.top_k
        x_NC = x_BTC.reshape(B * T, C)  # N = B*T tokens, routed independently
        # Routing in float32: in bf16 near-equal router probabilities would tie and flip between runs.
        logits_NE = self.router(x_NC).float()
        probs_NE = logits_NE.softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(K, dim=-1)  # (N, K) each, best expert first
        if self.config.normalize_top_k:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)

        # Sort the A = N*K assignments by expert: each expert's tokens become one contiguous block of rows.
        experts_A = experts_NK.reshape(-1)  # assignment a = n*K + slot
        order_A = experts_A.argsort(stable=True)  # sorted position -> assignment
        counts_E = torch.bincount(experts_A, minlength=E)
        xs_AC = x_NC.index_select(0, order_A // K)  # each sorted assignment's token
        ys = []
        for expert, xs_chunk in zip(self.experts, xs_AC.split(counts_E.tolist()), strict=True):
            # An idle expert still runs (on zero rows) when training, so its weights get a zero gradient rather
            # than none: DDP expects every parameter to take part in every backward.
            if xs_chunk.shape[0] or torch.is_grad_enabled():
                ys.append(expert(xs_chunk))
        ys_AC = torch.cat(ys)
        # Back to (token, slot) order with a gather rather than a scatter-add: deterministic, and no atomics on GPU.
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        y_NKC = ys_AC.index_select(0, inverse_A).view(B * T, K, C)
        y_NC = torch.bmm(weights_NK.to(y_NKC.dtype).unsqueeze(1), y_NKC).squeeze(1)  # sum_k w_k * y_k

        self.tokens_per_expert = counts_E.detach()
        if self.training and torch.is_grad_enabled():
            self.balance_loss = load_balancing_loss(probs_NE, counts_E)
            self.z_loss = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        else:
            self.balance_loss = self.z_loss = logits_NE.new_zeros(())
        return y_NC.view(B, T, C)

    def aux_loss(self) -> torch.Tensor:
        """The last forward's balancing and z-losses, weighted by their coefficients (0 before any forward)."""
        if self.balance_loss is None or self.z_loss is None:
            return self.router.weight.new_zeros((), dtype=torch.float32)
        return self.config.aux_loss_coef * self.balance_loss + self.config.z_loss_coef * self.z_loss

    def num_inactive_params(self) -> int:
        """Expert parameters a token does not use: those of the n_experts - top_k experts it is not sent to."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.n_experts - self.top_k) * per_expert


def load_balancing_loss(probs_NE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """n_experts * sum_e f_e * P_e: 1.0 when routing is uniform, n_experts when one expert takes everything.

    f_e is the share of the N*K assignments that went to expert e (not differentiable) and P_e the mean router
    probability of e (differentiable): Switch Transformer eq. 4, with f counted over all top-k choices.
    The gradient lowers the probability of experts that are over-used.
    """
    E = probs_NE.shape[-1]
    f_E = counts_E.to(probs_NE.dtype) / counts_E.sum()
    P_E = probs_NE.mean(dim=0)
    return E * (f_E * P_E).sum()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def total_aux_loss(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Sum of the MoE layers' weighted auxiliary losses from the last forward; a zero scalar for dense models."""
    total = torch.zeros((), device=device)
    for layer in moe_layers(model):
        total = total + layer.aux_loss()
    return total


def num_active_params(model: nn.Module) -> int:
    """Parameters used per token: all unique parameters less the experts each token skips."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique) - sum(m.num_inactive_params() for m in moe_layers(model))
