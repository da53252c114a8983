"""LoRA as a wrapper module: the forward it promises, merge/unmerge, adapters switched and disabled, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lamina.arch import GPT2Config, LlamaConfig, build_model
from lamina.arch.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_names,
    apply_lora,
    disable_adapters,
    linear_layers,
    load_lora_state_dict,
    lora_config,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    remove_adapter,
    set_active_adapter,
    unload_lora,
    unmerge_lora,
    using_adapter,
)
from lamina.errors import ConfigError, InvalidRequestError

VOCAB = 97


def _tiny(family: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                             **overrides)
    else:
        config = GPT2Config(vocab_size=VOCAB, max_seq_len=64, dim=32, n_layers=2, n_heads=4, **overrides)
    return build_model(config).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _randomise(model: nn.Module, adapter: str = "default", seed: int = 2, std: float = 0.2) -> None:
    """Give B (zero at init) and A random values, so the adapter visibly changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter in layer.adapters:
                for p in (layer.adapters[adapter].lora_A, layer.adapters[adapter].lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids)


# --- one layer ------------------------------------------------------------------------------------------


def test_a_new_adapter_leaves_the_output_unchanged() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear(base)
    adapter = layer.add_adapter("default", LoRAConfig(r=4, alpha=8))
    layer.active_adapter = "default"
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    assert adapter.lora_A.shape == (4, 16) and adapter.lora_B.shape == (24, 4)
    assert adapter.lora_A.abs().sum() > 0  # A starts random (kaiming-uniform), as PEFT's


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank_update(rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear(base)
    adapter = layer.add_adapter("default", LoRAConfig(r=4, alpha=6, use_rslora=rslora))
    layer.active_adapter = "default"
    with torch.no_grad():
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    x = torch.randn(3, 5, 16)
    scaling = 6 / math.sqrt(4) if rslora else 6 / 4
    expected = x @ base.weight.T + base.bias + (x @ adapter.lora_A.T @ adapter.lora_B.T) * scaling
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.weight is base.weight and layer.bias is base.bias  # nn.Linear's attributes still answer


def test_an_adapter_in_float32_on_a_bfloat16_base_returns_bfloat16() -> None:
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16))
    adapter = layer.add_adapter("default", LoRAConfig(r=2, alpha=2))
    adapter.float()
    layer.active_adapter = "default"
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- whole models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "targets"), [("llama", "all-linear"), ("llama", ("q_proj", "v_proj")),
                                                 ("gpt2", ("c_attn", "c_fc"))])
def test_merged_model_logits_equal_base_plus_adapter_logits(family: str, targets) -> None:
    model = _tiny(family)
    base = _logits(model)
    wrapped = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    _randomise(model)
    with_adapter = _logits(model)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter does something
    assert merge_lora(model) == wrapped
    torch.testing.assert_close(_logits(model), with_adapter, atol=1e-5, rtol=0)
    unload_lora(model)  # plain nn.Linear layers again, holding the merged weights
    assert not lora_layers(model) and all(type(m) is nn.Linear for m in linear_layers(model).values())
    torch.testing.assert_close(_logits(model), with_adapter, atol=1e-5, rtol=0)


def test_unmerge_restores_the_base_weights() -> None:
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomise(model)
    merge_lora(model)
    assert unmerge_lora(model) and not any(layer.merged for layer in lora_layers(model).values())
    unload_lora(model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=0)


def test_merge_keeps_an_input_major_weight_layout_and_its_values() -> None:
    """optimize_for_inference may lay weights out input-major (a transposed view); merge writes through it."""
    model = _tiny()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().t()
    base = _logits(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomise(model)
    with_adapter = _logits(model)
    strides = {n: layer.weight.stride() for n, layer in lora_layers(model).items()}
    assert all(s[0] == 1 for s in strides.values())  # input-major
    merge_lora(model)
    assert {n: layer.weight.stride() for n, layer in lora_layers(model).items()} == strides
    torch.testing.assert_close(_logits(model), with_adapter, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(_logits(model), with_adapter, atol=1e-5, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), base, atol=1e-5, rtol=0)


def test_disable_adapters_gives_the_base_model_and_is_refused_while_merged() -> None:
    model = _tiny()
    base = _logits(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    _randomise(model)
    with_adapter = _logits(model)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)
    torch.testing.assert_close(_logits(model), with_adapter, atol=0, rtol=0)  # back on afterwards
    merge_lora(model)
    with pytest.raises(InvalidRequestError, match="merged into the weights; unmerge_lora first"), disable_adapters(model):
        pass


def test_two_named_adapters_switch_and_each_equals_a_model_with_it_alone() -> None:
    model = _tiny()
    pristine = copy.deepcopy(model)
    base = _logits(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")), adapter_name="sql")
    _randomise(model, "sql", seed=3)
    only_sql = _logits(model)
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"), adapter_name="poet")
    _randomise(model, "poet", seed=4)
    assert adapter_names(model) == ["sql", "poet"]
    poet = _logits(model)  # the newest adapter is the active one
    alone = copy.deepcopy(pristine)
    load_lora_state_dict(alone, lora_state_dict(model, "poet"), lora_config(model, "poet"))
    torch.testing.assert_close(poet, _logits(alone), atol=1e-6, rtol=0)
    with using_adapter(model, "sql"):
        torch.testing.assert_close(_logits(model), only_sql, atol=0, rtol=0)
    torch.testing.assert_close(_logits(model), poet, atol=0, rtol=0)
    set_active_adapter(model, None)
    torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)
    with pytest.raises(InvalidRequestError, match=r"no LoRA adapter named 'nope'; this model has \['sql', 'poet'\]"):
        set_active_adapter(model, "nope")
    set_active_adapter(model, "sql")
    merge_lora(model)
    with pytest.raises(InvalidRequestError, match="'sql' is merged"):
        set_active_adapter(model, "poet")
    unmerge_lora(model)
    remove_adapter(model, "poet")
    assert adapter_names(model) == ["sql"]
    assert all(set(layer.adapters) == {"sql"} for layer in lora_layers(model).values())  # poet-only layers unwrapped
    torch.testing.assert_close(_logits(model), only_sql, atol=1e-6, rtol=0)


def test_a_wrapped_output_layer_still_serves_the_kv_cache() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("lm_head", "o_proj")))
    _randomise(model)
    ids = _ids()
    full = _logits(model, ids)
    cache = model.new_cache(2, 16)  # reads lm_head.weight for dtype and device
    with torch.no_grad():
        model(ids[:, :8], cache=cache)
        step = model(ids[:, 8:9], cache=cache)
    torch.testing.assert_close(step[:, 0], full[:, 8], atol=1e-5, rtol=0)


# --- training ---------------------------------------------------------------------------------------------


def test_only_lora_weights_train_and_a_few_steps_change_only_them() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(lora_layers(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = _ids()
    for _ in range(3):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name


def test_mark_only_lora_trainable_can_pick_one_adapter() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=2, alpha=4), adapter_name="a")
    apply_lora(model, LoRAConfig(r=2, alpha=4), adapter_name="b")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".adapters.b." in n for n in names)  # the newest adapter is the one training
    count = mark_only_lora_trainable(model)
    assert count == sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)


# --- refusals ---------------------------------------------------------------------------------------------


def test_unknown_target_module_is_refused_listing_the_linear_layers() -> None:
    model = _tiny()
    with pytest.raises(ConfigError, match=r"\['qproj'\] match no linear layer.*'q_proj', 'k_proj', 'v_proj', 'o_proj', "
                                          r"'gate_proj', 'up_proj', 'down_proj', 'lm_head'"):
        apply_lora(model, LoRAConfig(target_modules=("qproj", "v_proj")))
    assert not lora_layers(model)  # nothing half-applied


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bias": "all"}, "bias 'all' is not supported.*use bias='none'"),
        ({"bias": "lora_only"}, "bias 'lora_only' is not supported"),
        ({"r": 0}, "r .* must be an integer >= 1"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"target_modules": "q_proj"}, "neither a list of module names nor 'all-linear'"),
        ({"target_modules": ()}, "must be non-empty"),
    ],
)
def test_bad_configs_are_refused(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**kwargs)


def test_a_tied_output_layer_is_refused() -> None:
    model = _tiny(tie_embeddings=True)
    with pytest.raises(ConfigError, match=r"'lm_head' shares its weight.*leave 'lm_head' out of target_modules"):
        apply_lora(model, LoRAConfig(target_modules=("lm_head",)))


def test_a_second_adapter_of_the_same_name_is_refused() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig())
    with pytest.raises(InvalidRequestError, match="already has a LoRA adapter named 'default'"):
        apply_lora(model, LoRAConfig())


def test_lora_state_dict_uses_peft_names_and_loads_back() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    _randomise(model)
    tensors = lora_state_dict(model)
    assert set(tensors) == {f"layers.{i}.self_attn.{m}_proj.lora_{ab}.weight" for i in (0, 1) for m in "qv" for ab in "AB"}
    assert tensors["layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)  # (out, r): 2 kv heads of 8
    other = _tiny()
    with pytest.raises(ConfigError, match=r"q_proj.: lora_A \(4, 32\) / lora_B \(32, 4\) do not fit a 32x32 layer at rank 8"):
        load_lora_state_dict(other, tensors, LoRAConfig(r=8, alpha=8))
    load_lora_state_dict(other, tensors, LoRAConfig(r=4, alpha=8))
    torch.testing.assert_close(_logits(other), _logits(model), atol=0, rtol=0)


def test_config_round_trips_through_a_dict() -> None:
    config = LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj"])  # type: ignore[arg-type]
    assert config.target_modules == ("q_proj", "k_proj") and config.scaling == 2.0
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert LoRAConfig.from_dict({"target_modules": "all-linear"}).target_modules == "all-linear"
