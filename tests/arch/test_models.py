"""The model families on their own: KV-cache decoding equals a full forward, configs validate and round-trip."""

from __future__ import annotations

import pytest
import torch

from lamina.arch import GPT2Config, LlamaConfig, build_model, config_from_dict
from lamina.arch.llama import RopeScaling
from lamina.errors import ConfigError

CONFIGS = {
    "llama-gqa": LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64),
    "llama-mqa-bias-tied": LlamaConfig(
        vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=96, max_seq_len=64, qkv_bias=True, tie_embeddings=True
    ),
    "llama-sliding": LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64, sliding_window=5),
    "llama3-rope": LlamaConfig(
        vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64,
        rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_seq_len=16),
    ),
    "gpt2": GPT2Config(vocab_size=97, max_seq_len=64, dim=64, n_layers=2, n_heads=4),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIGS[name]).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name: str) -> None:
    model = _model(name)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(2, 32)
        prefix = 7
        steps = [model(ids[:, :prefix], cache)]
        for t in range(prefix, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache))
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_and_rewind_equal_full_forward(name: str) -> None:
    model = _model(name)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 40)
        chunks = [model(ids[:, a:b], cache) for a, b in ((0, 11), (11, 12), (12, 30))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
        cache.rewind(12)  # keep a prefix, recompute the rest
        again = model(ids[:, 12:], cache)
        torch.testing.assert_close(again, full[:, 12:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error() -> None:
    from lamina.errors import ContextLengthError

    model = _model("llama-gqa")
    cache = model.new_cache(1, 8)
    with torch.no_grad(), pytest.raises(ContextLengthError, match="holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), cache)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 65, "n_heads": 4}, "divisible by n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"n_layers": 0}, "n_layers must be >= 1"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type"),
    ],
)
def test_llama_config_validation(kwargs, message: str) -> None:
    base = {"vocab_size": 10, "dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 8}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**{**base, **kwargs})


def test_configs_round_trip_through_yaml(tmp_path) -> None:
    for config in CONFIGS.values():
        path = tmp_path / f"{config.family}.yaml"
        path.write_text(config.to_yaml())
        loaded = type(config).from_yaml(path)
        assert loaded == config
        assert config_from_dict(config.to_dict()) == config


def test_unknown_config_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown LlamaConfig keys \\['n_layer'\\]"):
        LlamaConfig.from_dict({"n_layer": 2})
    with pytest.raises(ConfigError, match="unknown model family"):
        config_from_dict({"family": "rwkv"})


def test_every_family_names_its_sizes_alike_and_gpt2_reads_its_own_names() -> None:
    """One size vocabulary (engine code reads any config alike); GPT-2 configs saved with n_embd etc. still load."""
    for config in CONFIGS.values():
        assert (config.n_layers, config.n_kv_heads, config.head_dim) == (2, config.n_kv_heads, config.dim // config.n_heads)
    legacy = GPT2Config.from_dict({"vocab_size": 97, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 96})
    assert legacy == GPT2Config(vocab_size=97, max_seq_len=64, dim=64, n_layers=2, n_heads=4, hidden_dim=96)
    assert legacy.n_kv_heads == 4 and legacy.head_dim == 16


def test_build_from_state_dict_checks_names_and_shapes() -> None:
    from lamina.errors import ModelFormatError

    model = _model("llama-gqa")
    state = model.state_dict()
    rebuilt = build_model(CONFIGS["llama-gqa"], state)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), model(ids))
    missing = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    with pytest.raises(ModelFormatError, match="missing tensors"):
        build_model(CONFIGS["llama-gqa"], missing)
    wrong = dict(state, **{"norm.weight": torch.ones(3)})
    with pytest.raises(ModelFormatError, match=r"norm\.weight"):
        build_model(CONFIGS["llama-gqa"], wrong)


def test_tied_embeddings_share_storage_and_count_once() -> None:
    model = _model("llama-mqa-bias-tied")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_slot_cache_batched_decode_equals_each_sequence_alone(name: str) -> None:
    """Rows at different lengths decode in one batched forward exactly as each would alone."""
    from lamina.arch.kv_cache import SlotCache

    model = _model(name)
    c = model.config
    n_kv = getattr(c, "n_kv_heads", None) or c.n_head
    head_dim = getattr(c, "head_dim", None) or c.n_embd // c.n_head
    slots = SlotCache(getattr(c, "n_layers", None) or c.n_layer, n_kv, head_dim, dtype=torch.float32, device="cpu")
    prompts = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 6)]
    slots.reserve(len(prompts), 8)  # too small: reserve grows it below, keeping what is stored
    with torch.no_grad():
        alone = []
        for b, p in enumerate(prompts):
            slots.reserve(len(prompts), 24)
            model(p, slots.row(b))
            cache = model.new_cache(1, 24)
            model(p, cache)
            alone.append(cache)
        nxt = torch.tensor([[5], [17], [42]])
        for _ in range(4):
            batched = model(nxt, slots.decode(3))[:, -1]  # (3, vocab)
            single = torch.cat([model(nxt[b : b + 1], alone[b])[:, -1] for b in range(3)])
            torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
            nxt = batched.argmax(-1, keepdim=True)
    assert slots.lengths[:3] == [7, 15, 10]
    slots.move(2, 0)
    assert slots.lengths[0] == 10
