"""LoRA adapters in PEFT's layout: PEFT and Lamina load each other's, a wrong base is refused, merges serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lamina import LLM
from lamina.arch.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
from lamina.errors import ConfigError, InvalidRequestError, ModelFormatError
from lamina.infra.registry import Registry
from lamina.llm.formats.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    from_peft_name,
    load_adapter,
    merge_adapter,
    save_adapter,
    to_peft_name,
)
from tests.tiny import hf_gpt2_folder, hf_llama_folder, write_llama_gguf

pytest.importorskip("transformers")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"]}


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(seed))


def _base(folder: Path, family: str = "llama", **overrides):  # type: ignore[no-untyped-def]
    return hf_llama_folder(folder, **overrides) if family == "llama" else hf_gpt2_folder(folder, **overrides)


def _load(folder: Path) -> LLM:
    return LLM.load(str(folder), device="cpu", dtype="float32")


def _logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids)


def _lamina_adapter(model: torch.nn.Module, targets=("q_proj", "v_proj", "down_proj"), seed: int = 3) -> None:  # type: ignore[no-untyped-def]
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.adapters["default"].lora_B
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


# --- PEFT interop ---------------------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_peft_saved_adapter_loads_with_equal_logits(tmp_path, family: str) -> None:
    peft = pytest.importorskip("peft")
    hf = _base(tmp_path / "base", family)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2")
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():  # lora_B starts at zero: randomise it, or the test would pass on a no-op
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=_ids()).logits
    llm = _load(tmp_path / "base")
    base = _logits(llm.model)
    loaded = load_adapter(llm.model, tmp_path / "adapter", base_model_id="base")
    assert set(loaded.target_modules) == set(TARGETS[family]) and (loaded.r, loaded.alpha) == (4, 8)
    got = _logits(llm.model)
    assert (got - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.peer
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_lamina_saved_adapter_loads_in_peft_with_equal_logits(tmp_path, family: str) -> None:
    peft = pytest.importorskip("peft")
    import transformers

    _base(tmp_path / "base", family)
    llm = _load(tmp_path / "base")
    _lamina_adapter(llm.model, ("q_proj", "v_proj", "down_proj") if family == "llama" else ("c_attn", "c_proj"))
    expected = _logits(llm.model)
    save_adapter(llm.model, tmp_path / "adapter", base_model_id=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=_ids()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- Lamina's own round trip ----------------------------------------------------------------------------


def test_save_then_load_gives_the_same_adapter_in_peft_names(tmp_path) -> None:
    _base(tmp_path / "base")
    llm = _load(tmp_path / "base")
    _lamina_adapter(llm.model)
    expected = _logits(llm.model)
    folder = save_adapter(llm.model, tmp_path / "adapter", base_model_id="tiny-llama")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "bias", "task_type", "base_model_name_or_path")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
    }
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        names, metadata = set(f.keys()), f.metadata()
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names and len(names) == 12
    assert json.loads(metadata["lamina_base"])["shape"]["dim"] == 64
    fresh = _load(tmp_path / "base")
    load_adapter(fresh.model, folder, base_model_id="tiny-llama")
    torch.testing.assert_close(_logits(fresh.model), expected, atol=0, rtol=0)
    save_adapter(llm.model, folder)  # an adapter folder may be replaced by a new save
    assert not list(tmp_path.glob(".adapter*"))  # no temporary folders left behind


@pytest.mark.parametrize(
    ("family", "lamina", "peft"),
    [
        ("llama", "layers.3.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
        ("llama", "lm_head.lora_B.weight", "base_model.model.lm_head.lora_B.weight"),
        ("gpt2", "h.0.attn.c_attn.lora_A.weight", "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"),
    ],
)
def test_names_map_both_ways(family: str, lamina: str, peft: str) -> None:
    assert to_peft_name(family, lamina) == peft
    assert from_peft_name(family, peft) == lamina


# --- refusals ---------------------------------------------------------------------------------------------


def test_an_adapter_for_a_base_of_other_shapes_is_refused(tmp_path) -> None:
    _base(tmp_path / "small")
    _base(tmp_path / "wide", intermediate_size=96)
    llm = _load(tmp_path / "wide")
    _lamina_adapter(llm.model)
    save_adapter(llm.model, tmp_path / "adapter", base_model_id="wide")
    other = _load(tmp_path / "small")
    with pytest.raises(AdapterMismatchError, match=r"adapter '.*adapter' was trained for base 'wide' \(llama: .*hidden_dim 96\), "
                                                   r"this model is base 'small' \(llama: .*hidden_dim 160\): the shapes differ"):
        load_adapter(other.model, tmp_path / "adapter", base_model_id="small", allow_other_base=True)
    assert not lora_layers(other.model)


@pytest.mark.peer
def test_a_peft_adapter_whose_layers_do_not_fit_is_refused(tmp_path) -> None:
    """No Lamina fingerprint (PEFT wrote it): the layer shapes alone catch the wrong base."""
    peft = pytest.importorskip("peft")
    hf = _base(tmp_path / "wide", intermediate_size=96)
    peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"])).save_pretrained(tmp_path / "ad")
    _base(tmp_path / "small")
    llm = _load(tmp_path / "small")
    with pytest.raises(AdapterMismatchError, match=r"trained for another base \(unrecorded\), this model is a base \(llama: vocab_size 400, dim 64, "
                                                   r".*\): lora_A of 'layers.0.mlp.down_proj' is \(2, 96\), but that layer "
                                                   r"is 64x160 here \(and 1 more\); load it on the base model it was trained for"):
        load_adapter(llm.model, tmp_path / "ad")


def test_an_adapter_for_another_base_id_is_refused_unless_allowed(tmp_path) -> None:
    _base(tmp_path / "base")
    llm = _load(tmp_path / "base")
    _lamina_adapter(llm.model)
    save_adapter(llm.model, tmp_path / "adapter", base_model_id="HuggingFaceTB/SmolLM2-135M")
    fresh = _load(tmp_path / "base")
    with pytest.raises(AdapterMismatchError, match=r"the model ids differ \('HuggingFaceTB/SmolLM2-135M' vs "
                                                   r"'smollm2-135m-instruct'\); if it is the same model under another "
                                                   r"name, pass allow_other_base=True"):
        load_adapter(fresh.model, tmp_path / "adapter", base_model_id="smollm2-135m-instruct")
    load_adapter(fresh.model, tmp_path / "adapter", base_model_id="smollm2-135m", adapter_name="same-name")  # case aside
    load_adapter(fresh.model, tmp_path / "adapter", base_model_id="other", adapter_name="b", allow_other_base=True)


def _write_adapter(folder: Path, **config) -> Path:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    folder.mkdir()
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**base, **config}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 2)},
              str(folder / ADAPTER_WEIGHTS))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bias": "all"}, r"trained biases \(bias='all'\), which Lamina does not run; merge it into the base with PEFT"),
        ({"use_dora": True}, r"DoRA \(use_dora\)"),
        ({"modules_to_save": ["lm_head"]}, r"fully trained extra modules \(modules_to_save\)"),
        ({"rank_pattern": {"q_proj": 8}}, r"per-layer ranks \(rank_pattern\)"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
    ],
)
def test_adapters_using_what_lamina_does_not_run_are_refused(tmp_path, config, message: str) -> None:
    _base(tmp_path / "base")
    llm = _load(tmp_path / "base")
    with pytest.raises(ModelFormatError, match=message):
        load_adapter(llm.model, _write_adapter(tmp_path / "ad", **config))


def test_a_missing_or_foreign_folder_is_refused(tmp_path) -> None:
    _base(tmp_path / "base")
    llm = _load(tmp_path / "base")
    with pytest.raises(InvalidRequestError, match=r"adapter folder '.*nope' does not exist"):
        load_adapter(llm.model, tmp_path / "nope")
    with pytest.raises(ModelFormatError, match=r"is not a PEFT adapter folder: it has no adapter_config\.json"):
        load_adapter(llm.model, tmp_path / "base")
    _lamina_adapter(llm.model)
    with pytest.raises(InvalidRequestError, match="already exists and is not empty; pick a new or empty folder"):
        save_adapter(llm.model, tmp_path / "base")  # a model folder is never replaced by an adapter
    assert (tmp_path / "base" / "config.json").exists()
    with pytest.raises(ConfigError, match=r"target_modules \['nope'\] match no linear layer"):
        apply_lora(llm.model, LoRAConfig(target_modules=("nope",)), adapter_name="other")


# --- merging into a servable folder -----------------------------------------------------------------------


def _lamina_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAMINA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True, timeout=300, env=env)


def test_lamina_lora_merge_writes_an_hf_folder_with_the_adapted_logits(tmp_path, lamina_home) -> None:
    import transformers

    _base(tmp_path / "base")
    llm = _load(tmp_path / "base")
    _lamina_adapter(llm.model)
    expected = _logits(llm.model)
    save_adapter(llm.model, tmp_path / "adapter", base_model_id="base")
    result = _lamina_cli("lora", "merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(tmp_path / "merged"), home=lamina_home)
    assert result.returncode == 0, result.stderr
    assert "(6 layers changed): hf folder" in result.stdout
    merged = _load(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged.model), expected, atol=1e-5, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # still an HF folder
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=_ids()).logits, expected, atol=1e-5, rtol=0)
    assert merged.apply_chat_template([{"role": "user", "content": "hi"}]) == llm.apply_chat_template([{"role": "user", "content": "hi"}])
    again = _lamina_cli("lora", "merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "merged"), home=lamina_home)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "already exists and is not empty" in again.stderr and "--overwrite" in again.stderr


def test_merging_into_a_gguf_base_writes_a_lamina_folder_that_keeps_chatting(tmp_path) -> None:
    from transformers import AutoTokenizer

    hf = _base(tmp_path / "hf")
    gguf_path = write_llama_gguf(tmp_path / "tiny.gguf", hf, AutoTokenizer.from_pretrained(tmp_path / "hf"))
    llm = _load(gguf_path)
    _lamina_adapter(llm.model, "all-linear")
    expected = _logits(llm.model)
    save_adapter(llm.model, tmp_path / "adapter", base_model_id=llm.name)
    entry = Registry(tmp_path).resolve(str(gguf_path))
    result = merge_adapter(entry, tmp_path / "adapter", tmp_path / "merged")
    assert result.layout == "lamina" and len(result.layers) == 14
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "lamina"
    merged = _load(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged.model), expected, atol=1e-5, rtol=0)
    messages = [{"role": "user", "content": "Hello there! café 東京"}]
    assert merged.encode_chat(messages) == llm.encode_chat(messages)  # same tokenizer and chat template
    assert merged.engine.eos_ids == llm.engine.eos_ids
    merge_lora(llm.model)
    assert merged.generate("Hello", max_tokens=5, temperature=0).token_ids == llm.generate("Hello", max_tokens=5, temperature=0).token_ids
