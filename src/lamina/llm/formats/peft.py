"""LoRA adapters on disk in PEFT's layout, and merging one into a model folder that serves like any other.

An adapter folder is what `peft.PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads:
`adapter_config.json` (PEFT's `LoraConfig` keys) and `adapter_model.safetensors`, whose tensors are named
for the Hugging Face model PEFT wrapped, `base_model.model.<HF module>.lora_A.weight` (r, in) and
`...lora_B.weight` (out, r). Lamina's module names are HF's less a family prefix, so the mapping is:

    Llama family  layers.0.self_attn.q_proj  <->  base_model.model.model.layers.0.self_attn.q_proj
    GPT-2         h.0.attn.c_attn            <->  base_model.model.transformer.h.0.attn.c_attn
    both          lm_head                    <->  base_model.model.lm_head

HF GPT-2's layers are Conv1D, stored (in, out); PEFT still keeps lora_A (r, in) and lora_B (out, r) for
them and only transposes the product when merging (`fan_in_fan_out: true`), so GPT-2 adapters carry over
unchanged too. Features PEFT has and Lamina does not run (DoRA, per-layer ranks, trained extra modules,
biases) are refused by name rather than silently ignored.

An adapter only makes sense on the base it was trained on. `save_adapter` records the base's id and
shape (family, widths, layer count, vocabulary) as `lamina_base` in the safetensors metadata, where PEFT
does not look; `load_adapter` refuses an adapter whose layers are missing here or have other shapes,
whose recorded shape differs, or whose base id differs from the one given (unless told otherwise).

`merge_adapter` writes a merged checkpoint: an HF folder for an HF base (transformers loads it too), a
Lamina folder (`"model_type": "lamina"`, tokenizer, chat template, EOS ids) for a GGUF base. Every folder
is built beside its destination and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamina.arch import build_model
from lamina.arch.lora import (
    ALL_LINEAR,
    OUTPUT_LAYER,
    LoRAConfig,
    linear_layers,
    load_lora_state_dict,
    lora_config,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unload_lora,
)
from lamina.errors import InvalidRequestError, ModelFormatError
from lamina.foundation.tokenizer import Tokenizer
from lamina.foundation.tokenizer_train import save_tokenizer
from lamina.infra.checkpoint import read_json
from lamina.infra.fs import atomic_write_text
from lamina.infra.registry import ModelEntry
from lamina.llm.formats.loader import Checkpoint, read_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The HF module-name prefix Lamina drops, per family (the output layer has none in HF either).
HF_PREFIX = {"llama": "model.", "gpt2": "transformer."}
# What identifies a base's shape, per family: an adapter from a model differing in any of these is refused.
SHAPE_KEYS = {
    "llama": ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim"),
    "gpt2": ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim"),
}
# PEFT features Lamina does not run, with what they are called in words.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
# Files of a base folder that are weights (rewritten by a merge) rather than config or tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


class AdapterMismatchError(InvalidRequestError):
    """An adapter that was trained for another base model than the one it is being put on."""

    code = "adapter_base_mismatch"


# --- names -----------------------------------------------------------------------------------------------


def to_peft_name(family: str, name: str) -> str:
    """Lamina `layers.0.self_attn.q_proj.lora_A.weight` -> PEFT `base_model.model.model.layers.0...`."""
    prefix = "" if name.split(".", 1)[0] == OUTPUT_LAYER else HF_PREFIX[family]
    return PEFT_PREFIX + prefix + name


def from_peft_name(family: str, key: str) -> str:
    """The inverse of `to_peft_name`; names without the family prefix (a headless base) pass through."""
    if not key.startswith(PEFT_PREFIX):
        raise ModelFormatError(f"adapter tensor {key!r} is not named like PEFT's ('{PEFT_PREFIX}<module>.lora_A.weight')")
    return key.removeprefix(PEFT_PREFIX).removeprefix(HF_PREFIX[family])


def base_fingerprint(model: nn.Module, model_id: str | None) -> dict[str, Any]:
    """What `save_adapter` records about the base: its id, family and shape."""
    config = model.config
    family = _family(model)
    return {"model_id": model_id, "family": family, "shape": {k: getattr(config, k) for k in SHAPE_KEYS[family]}}


# --- save and load ---------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default",
                 base_model_id: str | None = None) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT adapter folder (replacing an adapter folder there)."""
    family = _family(model)
    config = lora_config(model, adapter_name)
    tensors = {to_peft_name(family, k): v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, adapter_name).items()}
    metadata = {"format": "pt", "lamina_base": json.dumps(base_fingerprint(model, base_model_id))}
    folder = Path(folder)
    with _atomic_folder(folder, replaceable=lambda f: (f / ADAPTER_CONFIG).exists()) as tmp:
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(_peft_config(config, family, base_model_id), indent=2, sort_keys=True))
        _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata)
    return folder


def _peft_config(config: LoRAConfig, family: str, base_model_id: str | None) -> dict[str, Any]:
    targets = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_id,
        "revision": None,
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if targets == ALL_LINEAR else sorted(targets),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": family == "gpt2",  # HF GPT-2's Conv1D layers store (in, out)
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }


def load_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default", *,
                 base_model_id: str | None = None, allow_other_base: bool = False) -> LoRAConfig:
    """Add the PEFT adapter in `folder` to `model` as `adapter_name` (then the active adapter); returns its config.

    `base_model_id` is the id `model` was loaded as; if the adapter names another base it is refused, unless
    `allow_other_base` (for the same weights under another name). Shapes are always checked.
    """
    folder = Path(folder)
    family = _family(model)
    peft = read_adapter_config(folder)
    tensors, metadata = _read_weights(folder)
    tensors = {from_peft_name(family, k): v for k, v in tensors.items()}
    odd = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise ModelFormatError(
            f"{folder}: tensor {odd[0]!r} is not a lora_A/lora_B weight of a linear layer; Lamina runs LoRA on linear "
            "layers only (not on embeddings or convolutions, nor DoRA magnitudes)"
        )
    config = _lora_config(peft, tensors, folder)
    _check_base(model, folder, peft, metadata, tensors, base_model_id, allow_other_base)
    load_lora_state_dict(model, tensors, config, adapter_name)
    return config


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, refused if it asks for something Lamina does not run."""
    if not folder.is_dir():
        raise InvalidRequestError(f"adapter folder {str(folder)!r} does not exist; pass a folder saved by PEFT or Lamina", param="adapter")
    if not (folder / ADAPTER_CONFIG).exists():
        raise ModelFormatError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}")
    peft = read_json(folder / ADAPTER_CONFIG)
    if peft.get("peft_type") != "LORA":
        raise ModelFormatError(f"{folder}: peft_type {peft.get('peft_type')!r} is not LORA; Lamina loads LoRA adapters only")
    used = [words for key, words in UNSUPPORTED.items() if peft.get(key)]
    if peft.get("bias", "none") != "none":
        used.append(f"trained biases (bias={peft['bias']!r})")
    if used:
        raise ModelFormatError(
            f"{folder}: the adapter uses {', '.join(used)}, which Lamina does not run; merge it into the base with "
            "PEFT (merge_and_unload + save_pretrained) and load the merged model instead"
        )
    return peft


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        pickled = " (it has a pickled adapter_model.bin, which Lamina does not load: re-save it with safe_serialization=True)"
        raise ModelFormatError(f"{folder}: no {ADAPTER_WEIGHTS}{pickled if (folder / 'adapter_model.bin').exists() else ''}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{path}: cannot read safetensors ({e})") from None


def _lora_config(peft: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> LoRAConfig:
    targets = peft.get("target_modules")
    if isinstance(targets, list) and targets:
        target_modules: tuple[str, ...] | str = tuple(targets)
    elif targets == ALL_LINEAR:
        target_modules = ALL_LINEAR
    else:  # a regular expression (or nothing): name the layers the tensors are for
        target_modules = tuple(dict.fromkeys(k.rpartition(".lora_")[0].rsplit(".", 1)[-1] for k in tensors))
    try:
        return LoRAConfig(
            r=peft["r"], alpha=peft["lora_alpha"], dropout=peft.get("lora_dropout") or 0.0,
            target_modules=target_modules, use_rslora=bool(peft.get("use_rslora")),  # type: ignore[arg-type]
        )
    except KeyError as e:
        raise ModelFormatError(f"{folder}/{ADAPTER_CONFIG}: missing key {e.args[0]!r}") from None


def _check_base(model: nn.Module, folder: Path, peft: dict[str, Any], metadata: dict[str, str],
                tensors: dict[str, torch.Tensor], base_model_id: str | None, allow_other_base: bool) -> None:
    """Refuse an adapter trained for another base, saying which base it wants and what this one is."""
    recorded: dict[str, Any] = {}
    if "lamina_base" in metadata:
        try:
            recorded = json.loads(metadata["lamina_base"])
        except ValueError:
            recorded = {}
    recorded_id = recorded.get("model_id") or peft.get("base_model_name_or_path")
    here = base_fingerprint(model, base_model_id)
    problems = []
    if recorded.get("family", here["family"]) != here["family"] or recorded.get("shape", here["shape"]) != here["shape"]:
        problems.append("the shapes differ")
    if not allow_other_base and base_model_id and recorded_id and not _same_id(recorded_id, base_model_id):
        problems.append(f"the model ids differ ({recorded_id!r} vs {base_model_id!r})")
    misfits = _misfits(model, tensors)
    if misfits and not problems:
        more = f" (and {len(misfits) - 1} more)" if len(misfits) > 1 else ""
        problems.append(misfits[0] + more)
    if not problems:
        return
    only_id = not misfits and len(problems) == 1 and problems[0].startswith("the model ids")
    fix = ("if it is the same model under another name, pass allow_other_base=True (lamina lora merge --force)"
           if only_id else "load it on the base model it was trained for")
    wanted = _describe({**recorded, "model_id": recorded_id}) if recorded or recorded_id else "another base (unrecorded)"
    raise AdapterMismatchError(
        f"adapter {str(folder)!r} was trained for {wanted}, this model is {_describe(here)}: "
        f"{'; '.join(problems)}; {fix}", param="adapter",
    )


def _misfits(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Adapter tensors for layers this model lacks, or of shapes its layers do not have."""
    layers = linear_layers(model)
    out = []
    for key, tensor in tensors.items():
        module, _, kind = key.rpartition(".lora_")
        if module not in layers:
            out.append(f"layer {module!r} does not exist here")
            continue
        layer = layers[module]
        want = layer.in_features if kind.startswith("A") else layer.out_features
        if tensor.dim() != 2 or tensor.shape[1 if kind.startswith("A") else 0] != want:
            out.append(f"lora_{kind[0]} of {module!r} is {tuple(tensor.shape)}, but that layer is "
                       f"{layer.out_features}x{layer.in_features} here")
    return out


def _same_id(a: str, b: str) -> bool:
    """Ids name the same model if their last path parts match, case aside (an HF repo id vs a registry id)."""
    def norm(x: str) -> str:
        return Path(x.rstrip("/")).name.lower().removesuffix(".gguf")

    return norm(a) == norm(b)


def _describe(fp: dict[str, Any]) -> str:
    """"base 'smollm2' (llama: vocab_size 49152, dim 576, ...)", naming what is known."""
    shape = ", ".join(f"{k} {v}" for k, v in (fp.get("shape") or {}).items())
    name = f"base {fp['model_id']!r}" if fp.get("model_id") else "a base"
    return f"{name} ({fp['family']}: {shape})" if fp.get("family") else name


def _family(model: nn.Module) -> str:
    family = getattr(getattr(model, "config", None), "family", None)
    if family not in HF_PREFIX:
        raise InvalidRequestError(f"LoRA adapters are for generative models (llama, gpt2 families); got family {family!r}")
    return family


# --- merging into a servable folder ----------------------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    folder: Path
    layout: str  # "hf": an HF folder with HF names; "lamina": config.json with model_type lamina
    layers: list[str]  # the layers whose weights the adapter changed


def merge_adapter(entry: ModelEntry, adapter: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                  allow_other_base: bool = False, overwrite: bool = False) -> MergeResult:
    """Base `entry` + adapter, merged in float32 and written to `out` in `dtype`, loadable by `LLM.load(out)`.

    An HF folder base keeps its layout (config, tokenizer files and names: transformers loads the result);
    a GGUF base becomes a Lamina folder with the tokenizer, chat template and EOS ids the GGUF carried.
    """
    out = Path(out)

    def replaceable(folder: Path) -> bool:
        return overwrite and (folder / "config.json").exists()

    hint = "pass overwrite=True (lamina lora merge --overwrite) to replace a model folder" if not overwrite else ""
    _refuse_foreign(out, replaceable, hint)  # refusals first, before the slow part
    read_adapter_config(Path(adapter))
    ckpt = read_checkpoint(entry, torch.float32)
    model = build_model(ckpt.config, ckpt.state_dict)
    ckpt.state_dict = {}  # the model holds the tensors now
    load_adapter(model, adapter, base_model_id=entry.id, allow_other_base=allow_other_base)
    layers = merge_lora(model)
    weights = {k: v.to(dtype) for k, v in unload_lora(model).state_dict().items() if not _tied(ckpt, k)}
    native = entry.format == "gguf" or read_json(entry.path / "config.json").get("model_type") == "lamina"
    with _atomic_folder(out, replaceable, hint) as tmp:
        if entry.format == "gguf":
            _write_lamina_folder(tmp, ckpt, weights)
        else:
            _copy_side_files(entry.path, tmp, dtype)
            _save_safetensors(weights if native else _hf_names(ckpt, weights), tmp / "model.safetensors", {"format": "pt"})
    return MergeResult(out, "lamina" if native else "hf", layers)


def _tied(ckpt: Checkpoint, name: str) -> bool:
    """lm_head.weight of a tied model: stored once, as the input embedding (safetensors refuses shared tensors)."""
    return name == "lm_head.weight" and (ckpt.config.family == "gpt2" or bool(getattr(ckpt.config, "tie_embeddings", False)))


def _hf_names(ckpt: Checkpoint, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lamina names -> HF names; GPT-2's Linear (out, in) back to Conv1D (in, out)."""
    family = ckpt.config.family
    out = {}
    for name, tensor in weights.items():
        hf = name if name.split(".", 1)[0] == OUTPUT_LAYER else HF_PREFIX[family] + name
        if family == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and tensor.dim() == 2:
            tensor = tensor.t()
        out[hf] = tensor
    return out


def _copy_side_files(base: Path, folder: Path, dtype: torch.dtype) -> None:
    """The base folder's config and tokenizer files (not its weights), with config.json's dtype updated."""
    for path in sorted(base.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, folder / path.name)
    config = read_json(folder / "config.json")
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))


def save_model_folder(folder: Path, model: nn.Module, tokenizer: Tokenizer, chat_template: str | None,
                      eos_ids: list[int], *, overwrite: bool = True) -> Path:
    """A fine-tuned (or merged) model as a Lamina folder that `LLM.load` serves: written atomically."""
    model = unload_lora(model) if lora_layers(model) else model
    config = model.config
    tied = config.family == "gpt2" or bool(getattr(config, "tie_embeddings", False))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    ckpt = Checkpoint(None, config, {}, tokenizer, chat_template, list(eos_ids))  # type: ignore[arg-type]

    def replaceable(path: Path) -> bool:
        return overwrite and (path / "config.json").exists()

    with _atomic_folder(Path(folder), replaceable) as tmp:
        _write_lamina_folder(tmp, ckpt, weights)
    return Path(folder)


def _write_lamina_folder(folder: Path, ckpt: Checkpoint, weights: dict[str, torch.Tensor]) -> None:
    """A Lamina model folder: family config, Lamina names, tokenizer, chat template and EOS ids."""
    atomic_write_text(folder / "config.json", json.dumps({"model_type": "lamina", "lamina": ckpt.config.to_dict()}, indent=2))
    _save_safetensors(weights, folder / "model.safetensors", {"format": "pt"})
    save_tokenizer(ckpt.tokenizer, folder)
    if ckpt.chat_template:
        atomic_write_text(folder / "chat_template.jinja", ckpt.chat_template)  # read first by lamina.llm.hf.chat_template
    generation = {"eos_token_id": ckpt.eos_ids, "bos_token_id": ckpt.tokenizer.bos_id}
    atomic_write_text(folder / "generation_config.json", json.dumps({k: v for k, v in generation.items() if v is not None}))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _refuse_foreign(folder: Path, replaceable: Callable[[Path], bool], hint: str = "") -> None:
    """An existing non-empty `folder` may only be replaced if `replaceable` says it is ours to replace."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not replaceable(folder):
        raise InvalidRequestError(
            f"{folder} already exists and is not empty; pick a new or empty folder{'; or ' + hint if hint else ''}"
        )


@contextmanager
def _atomic_folder(folder: Path, replaceable: Callable[[Path], bool], hint: str = "") -> Iterator[Path]:
    """Yield a temporary folder beside `folder`; on success it replaces `folder` in one rename.

    Only a folder `replaceable` accepts is replaced, so a mistyped path never deletes someone's files.
    """
    _refuse_foreign(folder, replaceable, hint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, backup)
        os.replace(tmp, folder)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
