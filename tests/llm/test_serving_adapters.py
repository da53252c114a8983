"""Serving LoRA adapters: requests for different adapters and the base share one batch, each gets its own model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from lamina import LLM
from lamina.api.app import ServeArgs, create_app
from lamina.arch.lora import LoRAConfig, apply_lora, lora_layers
from lamina.errors import InvalidRequestError
from lamina.llm import SamplingParams
from lamina.llm.engine.core import Engine
from lamina.llm.formats.peft import save_adapter
from lamina.settings import Settings
from tests.tiny import hf_llama_folder

pytest.importorskip("transformers")

PROMPTS = ["hello there", "the cat sat on", "one two three", "a b c d"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny random Llama folder and two adapters for it with large random B matrices (outputs differ)."""
    root = tmp_path_factory.mktemp("adapters")
    base = root / "base"
    hf_llama_folder(base)
    folders = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        llm = LLM.load(str(base), device="cpu", dtype="float32")
        apply_lora(llm.model, LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(llm.model).values():
                b = layer.adapters["default"].lora_B
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        folders[name] = save_adapter(llm.model, root / name, base_model_id=llm.name)
    return base, folders


def _serving(base: Path, folders: dict[str, Path], quantize: str = "none") -> LLM:
    llm = LLM.load(str(base), device="cpu", dtype="float32", quantize=quantize)
    for name, folder in folders.items():
        llm.load_adapter(name, folder)
    return llm


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_a_mixed_batch_gives_each_request_its_own_adapter(tiny, quantize: str) -> None:
    """On float weights and on int4 blocks (adapters trained on the float model, served beside the blocks)."""
    base, folders = tiny
    llm = _serving(base, folders, quantize)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    plan = [(p, a) for p in PROMPTS for a in (None, "alpha", "beta")]
    alone = [llm.generate(p, params, adapter=a).token_ids for p, a in plan]
    plain = LLM.load(str(base), device="cpu", dtype="float32", quantize=quantize)
    assert llm.engine.native_step == plain.engine.native_step  # adapters run on the step the base model runs on
    for p in PROMPTS:  # the adapters change the model (else this test would prove nothing)
        outs = {tuple(alone[i]) for i, (q, _) in enumerate(plan) if q == p}
        assert len(outs) > 1, p

    llm.engine.reset()

    def one_batch(engine: Engine) -> dict[str, list[int]]:  # on the engine's thread: every request in one batch
        got: dict[str, list[int]] = {}
        for i, (p, a) in enumerate(plan):
            engine.add_request(f"r{i}", llm.encode_prompt(p), params, adapter=a)
            got[f"r{i}"] = []
        while engine.has_unfinished():
            for event in engine.step():
                got[event.request_id].append(event.token_id)
        return got

    got = llm.engine.call(one_batch)
    assert [got[f"r{i}"] for i in range(len(plan))] == alone


def test_adapters_do_not_share_cached_prefixes_with_the_base(tiny) -> None:
    base, folders = tiny
    llm = _serving(base, folders)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompt = " ".join(["the cat sat on the mat"] * 5)
    first = llm.generate(prompt, params)
    again = llm.generate(prompt, params)
    adapted = llm.generate(prompt, params, adapter="alpha")
    assert again.cached_tokens > 0
    assert adapted.cached_tokens == 0
    assert llm.generate(prompt, params, adapter="alpha").token_ids == adapted.token_ids
    assert first.token_ids == again.token_ids


def test_bad_adapters_are_refused(tiny, tmp_path) -> None:
    base, folders = tiny
    llm = _serving(base, {"alpha": folders["alpha"]})
    with pytest.raises(InvalidRequestError, match="already taken"):
        llm.load_adapter("alpha", folders["beta"])
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'gamma'"):
        llm.generate("hi", SamplingParams(max_tokens=2), adapter="gamma")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        llm.load_adapter("gamma", tmp_path / "nowhere")


def test_the_api_serves_adapters_beside_the_base(tiny, tmp_path) -> None:
    base, folders = tiny
    args = ServeArgs(Settings(model=str(base), home=tmp_path, device="cpu", dtype="float32"), embedding_model=None,
                     lora=tuple((name, str(folder)) for name, folder in folders.items()))
    reference = _serving(base, folders)
    with TestClient(create_app(args)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["alpha"]["parent"] == base.name and cards["beta"]["parent"] == base.name
        assert cards[base.name]["parent"] is None
        for model, adapter in ((base.name, None), ("alpha", "alpha"), ("beta", "beta")):
            body = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[1], "max_tokens": 8,
                                                        "temperature": 0}).json()
            assert body["model"] == model
            expected = reference.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0), adapter=adapter)
            assert body["choices"][0]["text"] == expected.text
        missing = client.post("/v1/completions", json={"model": "gamma", "prompt": "x"})
        assert missing.status_code == 404 and "alpha" in missing.json()["error"]["message"]
