"""LoRA as a wrapper module: low-rank adapters around a model's `nn.Linear` layers, applied in place.

One file, top to bottom: LoRAConfig -> LoRAAdapter (one A/B pair) -> LoRALinear (a frozen base layer and
its named adapters) -> functions over a whole model (apply, state dict, trainable parameters, merge,
active adapter, context managers).

LoRA (Hu et al., 2021) learns a weight update of rank r as two small matrices, W' = W + (alpha/r) * B @ A
with A (r, in) and B (out, r), and leaves W frozen. B starts at zero, so a freshly applied adapter does not
change the model. Wrapping is in place: `apply_lora` swaps each matching `nn.Linear` for a `LoRALinear`
that keeps the original as `base_layer`, so the family's model code (`Llama.forward`, ...) is untouched and
the module names stay those of the model (`layers.0.self_attn.q_proj`), which is what PEFT's file layout
needs (`lamina.llm.formats.peft`). The wrapper forwards `weight`/`bias` to its base layer, so code that reads
`model.lm_head.weight` keeps working; but `model.state_dict()` now names base weights
`...q_proj.base_layer.weight` (as PEFT does) until `unload_lora` puts the plain layers back.

The base may also be a quantised linear layer from the layers above (`lamina.llm.kernels.QuantLinear`, which
declares `linear_like = True` and has `in_features`/`out_features`): adapters then serve on int8/int4 weights
(QLoRA-style, adapters in float32), but cannot be merged into them.

Several adapters can live on one wrapper (`adapters`, a ModuleDict by name). For training and plain use,
one of them, or none, is active for the whole model (`set_active_adapter`, `using_adapter`,
`disable_adapters`). For serving, `route_adapters` gives each row of a batch its own adapter (or the base):
`LoRALinear.forward` then applies every adapter to the rows that chose it (S-LoRA / Punica style), so
requests for different adapters share one batch and no weights move.

The adapter is computed as two thin matmuls, (x @ A^T) @ B^T, never as the (out, in) product B @ A,
except when merging: `merge_lora` adds the product into the base weights so inference costs exactly the
base model's time, and `unmerge_lora` subtracts it again. Both write into the existing weight tensor, so
a weight laid out input-major (a transposed view, see `lamina.infra.device.optimize_for_inference`) keeps
its layout. Adapters hold no I/O: saving and loading PEFT folders is `lamina.llm.formats.peft`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.config import config_from_dict, config_to_dict
from lamina.errors import ConfigError, InvalidRequestError

ALL_LINEAR = "all-linear"
# The output projection is left out of "all-linear", as PEFT does: it is vocab-sized, and usually tied.
OUTPUT_LAYER = "lm_head"


@dataclass
class LoRAConfig:
    """Which linear layers get an adapter, of what rank and scale. Keys mirror PEFT's `LoraConfig`."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # on the adapter's input, training only
    # Module-name suffixes ("q_proj" matches "layers.0.self_attn.q_proj"), or every linear layer but lm_head.
    target_modules: tuple[str, ...] | Literal["all-linear"] = ("q_proj", "v_proj")
    bias: Literal["none"] = "none"  # LoRA here trains no biases
    use_rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(r)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r (the rank) must be an integer >= 1 (got {self.r!r}); 8 or 16 are usual")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0 (got {self.alpha!r}); 2 * r is usual")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1) (got {self.dropout!r})")
        if self.bias != "none":
            raise ConfigError(
                f"lora bias {self.bias!r} is not supported: Lamina's LoRA trains no biases; use bias='none'"
            )
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise ConfigError(
                    f"lora target_modules {targets!r} is neither a list of module names nor 'all-linear'; "
                    f"e.g. target_modules=['q_proj', 'v_proj']"
                )
        else:
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(
                    f"lora target_modules must be non-empty module names or 'all-linear' (got {self.target_modules!r})"
                )
            self.target_modules = targets

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        data = config_to_dict(self)
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return data


class LoRAAdapter(nn.Module):
    """One adapter of one layer: delta(x) = B(A(dropout(x))) * scaling, with A (r, in) and B (out, r)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.scaling = config.scaling
        # PEFT's initialisation: A kaiming-uniform (as nn.Linear's default), B zero, so delta starts at 0.
        a = torch.empty(config.r, in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a.to(dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), as two thin matmuls: r is small, the (out, in) product is never built."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in) float32: what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`) plus named adapters, of which `active_adapter` (or none) is used.

    forward(x) = base_layer(x) + adapters[active_adapter](x), or base_layer(x) alone when no adapter is
    active, this layer has no adapter of that name, or the adapter is merged into the base weight
    (`merged_adapter`: its update is then already inside `base_layer.weight`).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.row_adapters: list[str | None] | None = None
        """Set by `route_adapters`: the adapter of each batch row (serving several adapters in one batch)."""

    # The base layer's attributes, so code written for nn.Linear (lm_head.weight, new_cache) still works.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def add_adapter(self, name: str, config: LoRAConfig) -> LoRAAdapter:
        if name in self.adapters:
            raise InvalidRequestError(f"this layer already has a LoRA adapter named {name!r}; pick another name")
        if isinstance(self.base_layer, nn.Linear):
            device, dtype = self.base_layer.weight.device, self.base_layer.weight.dtype
        else:  # a quantised base: float32 adapters beside its blocks
            device, dtype = next(self.base_layer.buffers()).device, torch.float32
        adapter = LoRAAdapter(self.in_features, self.out_features, config, device=device, dtype=dtype)
        self.adapters[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = self.row_adapters
        if rows is not None and self.merged_adapter is None:
            # S-LoRA-style mixed batch: the base runs once for every row, each adapter only on its own rows.
            for name in {r for r in rows if r is not None and r in self.adapters}:
                index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
                adapter = self.adapters[name]
                y = y.index_add(0, index, adapter(x.index_select(0, index).to(adapter.lora_A.dtype)).to(y.dtype))
            return y
        name = self.active_adapter
        if name is None or self.merged_adapter is not None or name not in self.adapters:
            return y
        adapter = self.adapters[name]
        # The adapter may be kept in another dtype than the base (fp32 adapters on a bf16 base).
        return y + adapter(x.to(adapter.lora_A.dtype)).to(y.dtype)

    def merge(self, name: str | None = None) -> None:
        """Add adapter `name` (default: the active one) into the base weight; forward is then the base layer's."""
        name = name if name is not None else self.active_adapter
        if name is None or name not in self.adapters:
            raise InvalidRequestError(f"no LoRA adapter {name!r} to merge; this layer has {sorted(self.adapters)}")
        if self.merged_adapter is not None:
            raise InvalidRequestError(
                f"LoRA adapter {self.merged_adapter!r} is already merged into this layer; unmerge it first"
            )
        if not isinstance(self.base_layer, nn.Linear):
            raise InvalidRequestError("a LoRA adapter cannot be merged into quantised weights: merge it into the float "
                                      "model (`lamina lora merge`), then quantise the merged model")
        self._add_to_weight(self.adapters[name].delta_weight(), sign=1.0)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Subtract the merged adapter from the base weight again (exact up to rounding in the weight's dtype)."""
        if self.merged_adapter is None:
            raise InvalidRequestError("no LoRA adapter is merged into this layer")
        self._add_to_weight(self.adapters[self.merged_adapter].delta_weight(), sign=-1.0)
        self.merged_adapter = None

    def _add_to_weight(self, delta: torch.Tensor, sign: float) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            # Sum in float32 and round once; `copy_` writes through w's own strides, so an input-major
            # (transposed-view) weight keeps its layout and its values line up element by element.
            w.copy_(w.float().add(delta.to(w.device), alpha=sign))

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.adapters)}, active={self.active_adapter!r}, merged={self.merged_adapter!r}"


# --- whole models ----------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: an nn.Linear, or a module that declares itself one (a quantised linear)."""
    return isinstance(module, nn.Linear) or (getattr(type(module), "linear_like", False) and not isinstance(module, LoRALinear))


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers an adapter can target: each nn.Linear (or quantised linear), or the LoRALinear wrapping it."""
    wrapped = lora_layers(model)
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        plain = _linear(module) and name.removesuffix(".base_layer") not in wrapped
        if plain or isinstance(module, LoRALinear):
            out[name] = module
    return out


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on `model`, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters.keys()))
    return list(names)


def lora_config(model: nn.Module, adapter_name: str = "default") -> LoRAConfig:
    """The config adapter `adapter_name` was created with."""
    for layer in lora_layers(model).values():
        if adapter_name in layer.adapters:
            return layer.adapters[adapter_name].config
    raise _unknown_adapter(model, adapter_name)


def apply_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> list[str]:
    """Wrap the linear layers `config.target_modules` names in LoRALinear (in place); returns their names.

    Base parameters are frozen and the new adapter becomes the only trainable and the active one. A model
    may carry several adapters: call again with another `adapter_name`.
    """
    layers = linear_layers(model)
    if config.target_modules == ALL_LINEAR:
        names = [n for n in layers if n.rsplit(".", 1)[-1] != OUTPUT_LAYER]
    else:
        unmatched = [t for t in config.target_modules if not any(_matches(n, t) for n in layers)]
        if unmatched:
            raise ConfigError(
                f"lora target_modules {unmatched} match no linear layer of this model; its linear layers are "
                f"named {_leaf_names(layers)} (e.g. {next(iter(layers), '-')!r}), or use 'all-linear'"
            )
        names = [n for n in layers if any(_matches(n, t) for t in config.target_modules)]
    if not names:
        raise ConfigError(f"lora target_modules {config.target_modules!r} match no linear layer of this model")
    return _add_adapters(model, dict.fromkeys(names, config), adapter_name)


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], config: LoRAConfig,
                         adapter_name: str = "default") -> list[str]:
    """Add adapter `adapter_name` holding `tensors` (names as `lora_state_dict` gives them); returns layer names.

    The layers wrapped are exactly those the tensors name, whatever `config.target_modules` says.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise ConfigError(f"unexpected LoRA tensor {key!r}: expected '<layer>.lora_A.weight' or '<layer>.lora_B.weight'")
        pairs.setdefault(module, {})[kind[0]] = tensor
    layers = linear_layers(model)
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"LoRA layer {module!r} has only lora_{''.join(pair)}: both lora_A and lora_B are needed")
        if module not in layers:
            raise ConfigError(f"LoRA layer {module!r} is not a linear layer of this model (it has {_leaf_names(layers)})")
        a, b, layer = pair["A"], pair["B"], layers[module]
        want_a, want_b = (config.r, layer.in_features), (layer.out_features, config.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ConfigError(
                f"LoRA layer {module!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"{layer.out_features}x{layer.in_features} layer at rank {config.r} (want {want_a} / {want_b})"
            )
    names = _add_adapters(model, dict.fromkeys(pairs, config), adapter_name)
    layers_now = lora_layers(model)
    with torch.no_grad():
        for module, pair in pairs.items():
            adapter = layers_now[module].adapters[adapter_name]
            adapter.lora_A.copy_(pair["A"])
            adapter.lora_B.copy_(pair["B"])
    return names


def _add_adapters(model: nn.Module, configs: dict[str, LoRAConfig], adapter_name: str) -> list[str]:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise InvalidRequestError(f"adapter name {adapter_name!r} must be a non-empty string without dots")
    if adapter_name in adapter_names(model):
        raise InvalidRequestError(
            f"the model already has a LoRA adapter named {adapter_name!r}; pick another name or remove_adapter first"
        )
    _refuse_if_merged(model, "add an adapter")
    layers = linear_layers(model)
    tied = _tied_weights(model)
    for name in configs:
        if id(getattr(layers[name], "weight", None)) in tied:
            raise ConfigError(
                f"layer {name!r} shares its weight with another layer (tied embeddings): an adapter on it would "
                f"also change the embedding when merged; leave {name.rsplit('.', 1)[-1]!r} out of target_modules"
            )
    for name, config in configs.items():
        layer = layers[name]
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        layer.add_adapter(adapter_name, config)
    mark_only_lora_trainable(model, adapter_name)
    set_active_adapter(model, adapter_name)
    return list(configs)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`{"<layer>.lora_A.weight": (r, in), "<layer>.lora_B.weight": (out, r)}` for one adapter (PEFT's naming)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            out[f"{name}.lora_A.weight"] = adapter.lora_A.detach()
            out[f"{name}.lora_B.weight"] = adapter.lora_B.detach()
    if not out:
        raise _unknown_adapter(model, adapter_name)
    return out


def mark_only_lora_trainable(model: nn.Module, adapter_name: str | None = None) -> int:
    """Freeze everything but LoRA weights (of `adapter_name` only, if given); returns the trainable count."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for layer in lora_layers(model).values():
        for name, adapter in layer.adapters.items():
            if adapter_name is None or name == adapter_name:
                for p in adapter.parameters():
                    p.requires_grad_(True)
                    count += p.numel()
    return count


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter `name` in every wrapped layer from now on (None: the base model alone)."""
    if name is not None and name not in adapter_names(model):
        raise _unknown_adapter(model, name)
    merged = {layer.merged_adapter for layer in lora_layers(model).values()} - {None}
    if merged and merged != {name}:
        raise InvalidRequestError(
            f"LoRA adapter {sorted(merged)[0]!r} is merged into the weights, so no other adapter (asked: {name!r}) "
            "can be switched on; unmerge_lora first"
        )
    for layer in lora_layers(model).values():
        layer.active_adapter = name


def active_adapter(model: nn.Module) -> str | None:
    """The adapter in use (None: none, or no adapters at all)."""
    return next((layer.active_adapter for layer in lora_layers(model).values()), None)


@contextmanager
def using_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Run with adapter `name` active (None: the base model), then restore the previous one."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        set_active_adapter(model, previous)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (DPO's reference model, serving the base next to its adapters).

    Refused while an adapter is merged: its update is inside the base weights and cannot be switched off.
    """
    _refuse_if_merged(model, "disable adapters")
    with using_adapter(model, None):
        yield model


@contextmanager
def route_adapters(model: nn.Module, rows: list[str | None]) -> Iterator[nn.Module]:
    """Inside: batch row i uses adapter rows[i] (None: the base model), whatever the active adapter is."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.row_adapters = rows
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


def merge_lora(model: nn.Module) -> list[str]:
    """Add the active adapter into the base weights of every layer that has it; returns those layers."""
    name = active_adapter(model)
    if name is None:
        raise InvalidRequestError(
            f"no LoRA adapter is active to merge (adapters: {adapter_names(model) or 'none'}); set_active_adapter first"
        )
    _refuse_if_merged(model, "merge again")
    merged = []
    for layer_name, layer in lora_layers(model).items():
        if name in layer.adapters:
            layer.merge(name)
            merged.append(layer_name)
    return merged


def unmerge_lora(model: nn.Module) -> list[str]:
    """Subtract merged adapters from the base weights again; returns the layers that changed."""
    unmerged = []
    for layer_name, layer in lora_layers(model).items():
        if layer.merged:
            layer.unmerge()
            unmerged.append(layer_name)
    return unmerged


def unload_lora(model: nn.Module) -> nn.Module:
    """Put the plain base layers back (as they stand: merged updates stay in, unmerged adapters go)."""
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return model


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from every layer; layers left with no adapter become plain nn.Linear again."""
    if name not in adapter_names(model):
        raise _unknown_adapter(model, name)
    if any(layer.merged_adapter == name for layer in lora_layers(model).values()):
        raise InvalidRequestError(f"LoRA adapter {name!r} is merged into the weights; unmerge_lora before removing it")
    if active_adapter(model) == name:
        set_active_adapter(model, None)
    for layer_name, layer in lora_layers(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
        if not len(layer.adapters):
            parent, _, child = layer_name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base_layer)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: a target names a module exactly or is a dotted suffix of its name."""
    return name == target or name.endswith("." + target)


def _leaf_names(layers: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _refuse_if_merged(model: nn.Module, action: str) -> None:
    merged = sorted({layer.merged_adapter for layer in lora_layers(model).values()} - {None})
    if merged:
        raise InvalidRequestError(f"cannot {action}: LoRA adapter {merged[0]!r} is merged into the weights; unmerge_lora first")


def _unknown_adapter(model: nn.Module, name: str | None) -> InvalidRequestError:
    return InvalidRequestError(f"no LoRA adapter named {name!r}; this model has {adapter_names(model) or 'none'}")
