"""Tokenization identical to the reference tokenizers on a varied text set."""

from __future__ import annotations

import pytest

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\tif x > 0:\n\t\treturn [i ** 2 for i in range(x)]\n    return None\n",
    "    indented    with     runs of spaces   \n\n\n\ttabs\t\tand\r\nCRLF   ",
    "Unicode: café, naïve, Zürich, São Paulo, Ελληνικά, русский, עברית, العربية, हिन्दी",
    "CJK: 東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦🏳️‍🌈 👍🏽 and ZWJ sequences",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1,000,000 2026-11-29 0xFF 1e-5",
    "  12  345   6789",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "Contractions: don't, I'm, they're, we've, you'll, it's, she'd, DON'T",
    "URLs https://example.com/a?b=c&d=e#frag and emails someone@example.org",
    "Mixed\u00a0nbsp\u2009thin\u200bzero-width and combining e\u0301",
    "",
    " ",
    "\n",
]


@pytest.mark.peer
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_gguf_tokenizer_matches_llama_cpp_split(smollm, hf_smollm_tokenizer, text: str) -> None:
    """Same ids as transformers, once transformers splits digits the way this vocabulary was trained.

    The GGUF says `tokenizer.ggml.pre = smollm`: every digit is its own pre-token, then GPT-2's split
    (llama.cpp, and SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel). transformers
    5.x does not know `smollm` and uses GPT-2's split alone, which differs only next to digits; with its
    pre-tokenizer set to SmolLM2's, it must agree with Lamina everywhere.
    """
    from tokenizers import pre_tokenizers

    ref = hf_smollm_tokenizer.backend_tokenizer
    ours = smollm.tokenizer.encode(text)
    assert smollm.tokenizer.decode(ours) == text
    if not any(ch.isdigit() for ch in text):
        assert ours == ref.encode(text, add_special_tokens=False).ids  # transformers as shipped
    original = ref.pre_tokenizer
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    try:
        assert ours == ref.encode(text, add_special_tokens=False).ids
    finally:
        ref.pre_tokenizer = original


def test_digit_runs_split_as_llama_cpp_does(smollm) -> None:
    tok = smollm.tokenizer
    # "  1": llama.cpp isolates the digit first, so the two spaces stay one token ("ĠĠ") before "1".
    assert [tok.id_to_token(i) for i in tok.encode("  1")] == ["ĠĠ", "1"]
    assert [tok.id_to_token(i) for i in tok.encode("x 2026")] == ["x", "Ġ", "2", "0", "2", "6"]


def test_special_tokens_and_bos_rules(smollm) -> None:
    tok = smollm.tokenizer
    assert tok.encode("<|im_start|>") == [1]
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.encode("hi")[0] != tok.bos_id  # SmolLM2's GGUF says add_bos_token = false
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


def test_bos_added_when_the_model_asks_for_it() -> None:
    from lamina.foundation.tokenizer import Tokenizer
    from tests.tiny import train_tokenizer

    base = train_tokenizer()
    vocab = [t for t, _ in sorted(base.get_vocab().items(), key=lambda kv: kv[1])]
    import json

    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(base.to_str())["model"]["merges"]]
    with_bos = Tokenizer.byte_level_bpe(vocab, merges, token_types=[3, 3, 3] + [1] * (len(vocab) - 3), bos_id=1, eos_id=2, add_bos=True)
    without = Tokenizer.byte_level_bpe(vocab, merges, token_types=[3, 3, 3] + [1] * (len(vocab) - 3), bos_id=1, eos_id=2)
    assert with_bos.encode("hello") == [1, *without.encode("hello")]
    assert with_bos.encode("hello", add_special_tokens=False) == without.encode("hello")


def test_unknown_pre_tokenizer_is_refused() -> None:
    from lamina.errors import ModelFormatError
    from lamina.foundation.tokenizer import Tokenizer

    with pytest.raises(ModelFormatError, match=r"tokenizer.ggml.pre 'martian'"):
        Tokenizer.byte_level_bpe(["a", "b"], [], pre="martian")
