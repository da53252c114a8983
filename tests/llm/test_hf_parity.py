"""Random-weight tiny models built with transformers, saved as HF folders, loaded by Lamina: same logits."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM
from tests.tiny import hf_gpt2_folder, hf_llama_folder

pytestmark = pytest.mark.peer
pytest.importorskip("transformers")

LLAMA_VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama3-rope": (
        "llama",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}, "rope_theta": 500000.0},
    ),
    "qwen2-qkv-bias": ("qwen2", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}),
}


def _ids(n: int = 40, vocab: int = 400, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_family_logits_match_transformers(tmp_path, variant: str) -> None:
    kind, overrides = LLAMA_VARIANTS[variant]
    hf = hf_llama_folder(tmp_path, kind, **overrides)
    llm = LLM.load(str(tmp_path), device="cpu", dtype="float32")
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = llm.model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gpt2_logits_match_transformers(tmp_path) -> None:
    hf = hf_gpt2_folder(tmp_path)
    llm = LLM.load(str(tmp_path), device="cpu", dtype="float32")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_sharded_safetensors_folder_loads(tmp_path) -> None:
    hf = hf_llama_folder(tmp_path / "one", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tmp_path / "one" / name).exists():
            (tmp_path / "sharded" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    llm = LLM.load(str(tmp_path / "sharded"), device="cpu", dtype="float32")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_hf_folder_tokenizer_and_template_match_transformers(tmp_path) -> None:
    from transformers import AutoTokenizer

    hf_llama_folder(tmp_path, "llama")
    llm = LLM.load(str(tmp_path), device="cpu", dtype="float32")
    ref = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello there! def add(a, b): return a + b  # café 東京 🙂 12345"
    assert llm.tokenizer.encode(text) == ref.encode(text)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}]
    assert llm.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
