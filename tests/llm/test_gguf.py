"""GGUF loading: every quantisation type against transformers' own GGUF loader, and broken files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lamina import LLM
from lamina.errors import ModelFormatError
from lamina.llm.formats.gguf import open_gguf, unpermute_qk
from tests.tiny import (
    hf_gpt2_folder,
    hf_llama_folder,
    permute_qk,
    train_tokenizer,
    write_gpt2_gguf,
    write_llama_gguf,
)

# K-quants pack 256 values per block, so their rows must be multiples of 256.
SMALL = {}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
QTYPES = {"F32": SMALL, "F16": SMALL, "Q8_0": SMALL, "Q4_0": SMALL, "Q4_1": SMALL, "Q5_0": SMALL, "Q5_1": SMALL,
          "Q2_K": WIDE, "Q3_K": WIDE, "Q4_K": WIDE, "Q5_K": WIDE, "Q6_K": WIDE}


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
    assert not np.array_equal(permute_qk(w, 2), w)


@pytest.mark.peer
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_quantised_gguf_logits_match_transformers(tmp_path, qtype: str) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = hf_llama_folder(tmp_path / "hf", "llama", **QTYPES[qtype])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    path = write_llama_gguf(tmp_path / f"tiny-{qtype}.gguf", hf, tok, qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM.load(str(path), device="cpu", dtype="float32")
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    if qtype == "F32":  # unquantised: the weights are the HF model's exactly
        with torch.no_grad():
            torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.peer
def test_gpt2_gguf_logits_match_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = hf_gpt2_folder(tmp_path / "hf", n_positions=1024)  # transformers reads no context length from GPT-2 GGUFs
    path = write_gpt2_gguf(tmp_path / "gpt2.gguf", hf, transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM.load(str(path), device="cpu", dtype="float32")
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny")
    hf = hf_llama_folder(folder / "hf", "llama")
    path = write_llama_gguf(folder / "tiny.gguf", hf, AutoTokenizer.from_pretrained(folder / "hf"), "Q8_0")
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 3, 10, 100, 5000, 0.5, 0.999])
def test_truncated_gguf_is_one_clear_error(tmp_path, tiny_gguf: bytes, keep: float) -> None:
    n = int(len(tiny_gguf) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "broken.gguf"
    path.write_bytes(tiny_gguf[:n])
    with pytest.raises(ModelFormatError) as info:
        LLM.load(str(path), device="cpu", dtype="float32")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert any(word in message for word in ("truncated", "not a GGUF", "corrupt"))


def test_corrupt_gguf_header_is_one_clear_error(tmp_path, tiny_gguf: bytes) -> None:
    data = bytearray(tiny_gguf)
    data[16:24] = (2**40).to_bytes(8, "little")  # absurd metadata count
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="corrupt"):
        open_gguf(path)
    path.write_bytes(b"PK\x03\x04" + tiny_gguf[4:])
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_gguf(path)


def test_gguf_random_garbage_never_escapes_as_a_traceback(tmp_path, tiny_gguf: bytes) -> None:
    rng = np.random.default_rng(0)
    header_end = 2000
    for trial in range(30):
        data = bytearray(tiny_gguf)
        for pos in rng.integers(4, header_end, size=4):
            data[int(pos)] = int(rng.integers(0, 256))
        path = tmp_path / f"fuzz{trial}.gguf"
        path.write_bytes(bytes(data))
        try:
            LLM.load(str(path), device="cpu", dtype="float32")
        except ModelFormatError as e:
            assert "\n" not in str(e)
        except Exception as e:  # anything else is a bug, unless the file still reads as a model
            from lamina.errors import LaminaError

            assert isinstance(e, LaminaError), f"trial {trial}: {type(e).__name__}: {e}"


def test_cli_reports_a_truncated_gguf_in_one_line(tmp_path, tiny_gguf: bytes) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf[: len(tiny_gguf) // 2])
    result = subprocess.run(
        [sys.executable, "-m", "lamina", "generate", "--model", str(path), "hello"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cut.gguf" in lines[0] and "truncated" in lines[0]


def test_gguf_tokenizer_roundtrip(tmp_path, tiny_gguf: bytes) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes(tiny_gguf)
    from lamina.llm.formats import gguf

    tok = gguf.tokenizer(open_gguf(path))
    ref = train_tokenizer()
    text = "The quick brown fox <|im_end|> café 12345"
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
