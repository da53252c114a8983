"""The mixture-of-experts FFN: equals a per-token reference, drops no token, balances, and works in both families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lamina.arch import GPT2Config, LlamaConfig, MoE, MoEConfig, build_model, config_from_dict, gpt2, llama
from lamina.arch.moe import load_balancing_loss
from lamina.errors import ConfigError

C = 32  # model width of the layer-level tests


def _moe(n_experts: int, top_k: int, activation: str = "swiglu", seed: int = 0, **kwargs) -> MoE:
    torch.manual_seed(seed)
    kwargs.setdefault("normalize_top_k", top_k > 1)
    config = MoEConfig(n_experts=n_experts, top_k=top_k, **kwargs)
    moe = MoE(C, config, hidden_dim=48, activation=activation, bias=activation == "gelu")  # type: ignore[arg-type]
    for p in moe.parameters():  # larger than a model's init, so routing and outputs vary visibly
        torch.nn.init.normal_(p, std=0.3)
    return moe


def _reference(moe: MoE, x_BTC: torch.Tensor) -> torch.Tensor:
    """One token at a time: softmax over experts, top-k, (renormalised) weighted sum of the chosen experts."""
    out = torch.empty_like(x_BTC)
    for b in range(x_BTC.shape[0]):
        for t in range(x_BTC.shape[1]):
            x_C = x_BTC[b, t]
            probs_E = F.softmax(x_C @ moe.router.weight.T, dim=-1)
            weights_K, chosen_K = probs_E.topk(moe.top_k)
            if moe.config.normalize_top_k:
                weights_K = weights_K / weights_K.sum()
            out[b, t] = sum(w * moe.experts[int(e)](x_C[None])[0] for w, e in zip(weights_K, chosen_K, strict=True))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("n_experts", "top_k", "normalize", "activation"),
    [
        (4, 1, False, "swiglu"), (4, 2, True, "swiglu"), (8, 2, True, "gelu"),
        (8, 2, False, "swiglu"), (8, 1, False, "gelu"),
    ],
)
def test_every_token_equals_a_per_token_reference(seed, n_experts, top_k, normalize, activation) -> None:
    moe = _moe(n_experts, top_k, activation, seed, normalize_top_k=normalize)
    x = torch.randn(3, 17, C, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        y = moe(x)
        ref = _reference(moe, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # Dropless: every assignment was computed, however unevenly the experts were loaded.
    assert moe.tokens_per_expert is not None and int(moe.tokens_per_expert.sum()) == 3 * 17 * top_k


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_copies_of_a_dense_mlp_equal_that_mlp(family: str) -> None:
    torch.manual_seed(0)
    if family == "llama":
        dense: torch.nn.Module = llama.MLP(LlamaConfig(vocab_size=8, dim=C, n_layers=1, n_heads=4, hidden_dim=48))
        moe = MoE(C, MoEConfig(n_experts=2, top_k=2), 48, "swiglu")
    else:
        dense = gpt2.MLP(GPT2Config(vocab_size=8, dim=C, n_layers=1, n_heads=4, hidden_dim=48))
        moe = MoE(C, MoEConfig(n_experts=2, top_k=2), 48, "gelu", bias=True)
    for expert in moe.experts:  # the expert parameters are named like the family's MLP
        expert.load_state_dict(dense.state_dict())
    torch.nn.init.normal_(moe.router.weight)  # any router: the two renormalised weights sum to 1
    x = torch.randn(2, 9, C)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-6)


def test_top1_routes_each_token_to_the_expert_the_router_picks() -> None:
    moe = _moe(4, 1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[2, 0] = 100.0, -100.0  # feature 0 > 0: expert 0; < 0: expert 2
    x = torch.randn(2, 10, C)
    x[..., 0] = torch.where(torch.arange(10) % 3 == 0, 1.0, -1.0)
    with torch.no_grad():
        y = moe(x)
        to_0 = x[..., 0] > 0
        torch.testing.assert_close(y[to_0], moe.experts[0](x[to_0]), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(y[~to_0], moe.experts[2](x[~to_0]), atol=1e-6, rtol=1e-6)
    assert moe.tokens_per_expert.tolist() == [int(to_0.sum()), 0, int((~to_0).sum()), 0]


def test_gradients_reach_the_router_and_only_the_experts_that_got_tokens() -> None:
    moe = _moe(4, 2).train()
    with torch.no_grad():
        moe.router.weight.mul_(0.01)
        moe.router.weight[:, 0] = torch.tensor([5.0, 5.0, 5.0, -50.0])  # expert 3 never makes a token's top 2
    x = torch.randn(4, 16, C)
    x[..., 0] = 1.0
    moe(x).pow(2).mean().backward()  # the task loss alone: renormalised top-2 weights still carry a gradient
    assert moe.tokens_per_expert.tolist()[3] == 0 and all(n > 0 for n in moe.tokens_per_expert.tolist()[:3])
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    for e in range(3):
        for name, p in moe.experts[e].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"expert {e} {name}"
    for p in moe.experts[3].parameters():  # zero rather than None, so DDP sees every parameter used
        assert p.grad is not None and not p.grad.any()


def _uniform_router_inputs(n_experts: int) -> tuple[MoE, torch.Tensor]:
    """A top-1 MoE and tokens on which both the assignments and the mean router probabilities are uniform.

    Expert 2i scores +a on feature i and expert 2i+1 scores -a; the tokens are +-e_i, equally many of each,
    so every expert wins the same number of tokens and, by symmetry, has the same mean probability.
    """
    moe = _moe(n_experts, 1).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        for i in range(n_experts // 2):
            moe.router.weight[2 * i, i], moe.router.weight[2 * i + 1, i] = 3.0, -3.0
    tokens = []
    for i in range(n_experts // 2):
        for sign in (1.0, -1.0):
            tokens.append(sign * F.one_hot(torch.tensor(i), C).float())
    return moe, torch.stack(tokens).repeat(5, 1).view(5, n_experts, C)


@pytest.mark.parametrize("n_experts", [4, 8])
def test_balance_loss_is_one_when_routing_is_uniform(n_experts: int) -> None:
    moe, x = _uniform_router_inputs(n_experts)
    moe(x)
    assert moe.tokens_per_expert.tolist() == [5] * n_experts
    assert moe.balance_loss is not None
    assert moe.balance_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert moe.aux_loss().item() == pytest.approx(0.01, abs=1e-8)  # the default coefficient
    # top-k counts every assignment: uniform probabilities and counts give 1.0 for any k.
    probs = torch.full((12, 6), 1 / 6)
    assert load_balancing_loss(probs, torch.full((6,), 4)).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_grows_when_one_expert_takes_every_token() -> None:
    moe = _moe(4, 1).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = 10.0
    x = torch.randn(2, 8, C)
    x[..., 0] = 1.0
    moe(x)
    assert moe.tokens_per_expert.tolist() == [0, 16, 0, 0]
    assert moe.balance_loss is not None and moe.balance_loss.item() > 3.9  # up to n_experts = 4
    moe.eval()
    moe(x)
    assert moe.balance_loss.item() == 0.0 and moe.aux_loss().item() == 0.0  # nothing to add outside training


def test_router_z_loss_is_added_when_asked() -> None:
    moe = _moe(4, 2, z_loss_coef=1e-3).train()
    moe(torch.randn(2, 5, C))
    assert moe.z_loss is not None and moe.z_loss.item() > 0
    expected = 0.01 * moe.balance_loss + 1e-3 * moe.z_loss  # type: ignore[operator]
    torch.testing.assert_close(moe.aux_loss(), expected)


# Models with MoE FFNs.

MOE_CONFIGS = {
    "llama-moe": LlamaConfig(
        vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden_dim=48),
    ),
    "llama-moe-every-2": LlamaConfig(
        vocab_size=97, dim=64, n_layers=4, n_heads=4, hidden_dim=96, max_seq_len=64, tie_embeddings=True,
        moe=MoEConfig(n_experts=8, top_k=1, normalize_top_k=False, every=2, z_loss_coef=1e-3),
    ),
    "gpt2-moe": GPT2Config(
        vocab_size=97, max_seq_len=64, dim=64, n_layers=2, n_heads=4, moe=MoEConfig(n_experts=4, top_k=2)
    ),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MOE_CONFIGS[name])


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_model_forward_and_aux_loss(name: str) -> None:
    model = _model(name).train()
    ids = torch.randint(0, 97, (2, 20))
    logits = model(ids)
    assert logits.shape == (2, 20, 97)
    aux = model.aux_loss()
    assert aux.shape == () and aux.item() > 0
    (F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux).backward()
    routers = [p for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert routers and all(p.grad is not None and p.grad.any() for p in routers)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert model.aux_loss().item() == 0.0


def test_dense_models_have_no_aux_loss_and_all_params_active() -> None:
    dense = (
        LlamaConfig(vocab_size=10, dim=32, n_layers=1, n_heads=4, hidden_dim=8),
        GPT2Config(vocab_size=10, dim=32, n_layers=1, n_heads=4),
    )
    for config in dense:
        model = build_model(config)
        model(torch.zeros(1, 3, dtype=torch.long))
        assert model.aux_loss().item() == 0.0
        assert model.num_active_params() == model.num_params()


def test_moe_every_and_active_params() -> None:
    model = _model("llama-moe-every-2")
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    per_expert = 3 * 64 * 96  # expert_hidden_dim None: as wide as the dense MLP
    assert model.num_params() == sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert model.num_active_params() == model.num_params() - 2 * (8 - 1) * per_expert
    gpt = _model("gpt2-moe")
    per_expert = 2 * 64 * 256 + 256 + 64  # c_fc and c_proj with biases
    assert gpt.num_active_params() == gpt.num_params() - 2 * (4 - 2) * per_expert


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_kv_cache_decoding_equals_full_forward(name: str) -> None:
    model = _model(name).eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :7], cache)]
        for t in range(7, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_configs_round_trip_and_rebuild_from_state_dict(name: str, tmp_path) -> None:
    config = MOE_CONFIGS[name]
    path = tmp_path / "model.yaml"
    path.write_text(config.to_yaml())
    loaded = type(config).from_yaml(path)
    assert loaded == config and isinstance(loaded.moe, MoEConfig)
    assert config_from_dict(config.to_dict()) == config
    model = _model(name).eval()
    rebuilt = build_model(loaded, model.state_dict()).eval()  # via the meta device
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), model(ids))


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"n_experts": 1, "top_k": 1}, "n_experts must be >= 2"),
        ({"n_experts": 4, "top_k": 0}, "top_k must be between 1 and n_experts=4"),
        ({"n_experts": 4, "top_k": 5}, r"top_k must be between 1 and n_experts=4 \(got 5\)"),
        ({"n_experts": 4, "top_k": 1}, "normalize_top_k: false"),
        ({"expert_hidden_dim": 0}, "expert_hidden_dim must be >= 1"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef must be >= 0"),
        ({"every": 0}, "every must be >= 1"),
        ({"every": 3}, r"moe.every \(3\) exceeds n_layers \(2\)"),
        ({"n_expert": 4}, r"unknown MoEConfig keys \['n_expert'\]"),
    ],
)
def test_moe_config_validation(moe: dict, message: str) -> None:
    base = {"vocab_size": 10, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 8}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict({**base, "moe": moe})
    if "every" not in moe:  # the GPT-2 message names its own n_layer
        with pytest.raises(ConfigError, match=message):
            GPT2Config.from_dict({"vocab_size": 10, "dim": 64, "n_layers": 2, "n_heads": 4, "moe": moe})


def test_tiny_moe_llama_learns() -> None:
    """60 AdamW steps on a deterministic next-token rule take the loss from chance to near zero."""
    torch.manual_seed(0)
    V = 16
    config = LlamaConfig(
        vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32,
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden_dim=32),
    )
    model = build_model(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:  # each sequence follows t -> (5t + 3) mod 16 from a random start
        seq = [torch.randint(0, V, (16,), generator=g)]
        for _ in range(23):
            seq.append((5 * seq[-1] + 3) % V)
        return torch.stack(seq, dim=1)  # (16, 24)

    losses = []
    for _ in range(60):
        ids = batch()
        logits = model(ids[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        (ce + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ce.item())
    assert losses[0] > 2.0  # about ln(16) = 2.77 at the start
    assert sum(losses[-5:]) / 5 < 0.1  # the rule is deterministic: well under 4 % of chance
    used = [int((m.tokens_per_expert > 0).sum()) for m in model.modules() if isinstance(m, MoE)]
    assert all(n >= 2 for n in used)  # the router spreads tokens rather than collapsing onto one expert
