"""SmolLM2-135M-Instruct from its GGUF: Lamina's model code against transformers on the same weights."""

from __future__ import annotations

import inspect

import pytest
import torch

pytestmark = [pytest.mark.peer, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "Unicode café 東京 🙂 and numbers 1234567890 " * 8,
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_logits_match_transformers(smollm, hf_smollm, prompt: str) -> None:
    ids = torch.tensor([smollm.tokenizer.encode(prompt)])
    with torch.no_grad():
        ours = smollm.model(ids)
        ref = hf_smollm(ids).logits
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e} over {ids.shape[1]} tokens"


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding on transformers' model: one forward over the prompt, then one token a forward on
    its own KV cache (no generate() heuristics)."""
    out: list[int] = []
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # (transformers 5.x)
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        while True:
            out.append(int(step.logits[0, -1].argmax()))
            if len(out) == n:
                return out
            step = model(torch.tensor([out[-1:]]), use_cache=True, **{name: getattr(step, name)})


def test_64_greedy_tokens_identical(smollm, hf_smollm) -> None:
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = smollm.encode_chat(messages)
    ours = smollm.generate_ids(ids, _greedy(64))
    assert [e.token_id for e in ours] == _hf_greedy(hf_smollm, ids, 64)


def _greedy(n: int):  # type: ignore[no-untyped-def]
    from lamina.llm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_greedy_answer_is_paris(smollm) -> None:
    completion = smollm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], temperature=0, max_tokens=30)
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
