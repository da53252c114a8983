"""Sentence embeddings equal to sentence-transformers on the same all-MiniLM-L6-v2 folder, and the Embedder API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lamina.errors import InvalidRequestError, ModelFormatError
from lamina.foundation.embeddings import Embedder

MODEL = "all-minilm-l6-v2"
LONG = " ".join(f"Sentence number {i} of a report on river sediments, dams and fish ladders." for i in range(40))

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "hi",
    "?",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!!!",
    LONG,  # > 256 tokens: truncated by both
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product "
    "of splitting water molecules in the thylakoid membranes of chloroplasts.",
    "Unicode: café, naïve, Zürich, São Paulo, Ελληνικά, русский, עברית, العربية, हिन्दी",
    "Accents stripped? résumé vs resume, Ångström, façade, coöperate",
    "東京は日本の首都です。",
    "北京是中国的首都。上海是最大的城市。",
    "서울은 한국의 수도입니다.",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦🏳️‍🌈 👍🏽 party time 🎉",
    "def f(x):\n    return [i ** 2 for i in range(x) if i % 2]",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;",
    "<div class=\"note\">Hello &amp; welcome</div>",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1,000,000 2026-11-29 0xFF 1e-5",
    "Call +1 (555) 010-9999 or write to someone@example.org before 5pm.",
    "URLs https://example.com/a?b=c&d=e#frag should still embed",
    "",
    " ",
    "\n\t  \n",
    "Mixed\u00a0nbsp\u2009thin\u200bzero-width and combining e\u0301",
    "Control\x00characters\x07are\x1bcleaned",
    "word " * 300,  # also truncated, all one repeated token
    "I love this product, it works perfectly.",
    "I hate this product, it broke after a day.",
    "Le chat est assis sur le tapis.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
]


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return Embedder.load(MODEL, device="cpu", dtype="float32", home=tmp_path_factory.mktemp("embed-home"))


@pytest.fixture(scope="session")
def st_model(embedder: Embedder):  # type: ignore[no-untyped-def]
    """sentence-transformers on the very folder Lamina loaded (the peer)."""
    st = pytest.importorskip("sentence_transformers")
    assert embedder.entry is not None
    return st.SentenceTransformer(str(embedder.entry.path), device="cpu")


@pytest.mark.peer
def test_minilm_embeddings_equal_sentence_transformers(embedder: Embedder, st_model) -> None:  # type: ignore[no-untyped-def]
    assert len(SENTENCES) >= 30
    ours = embedder.embed(SENTENCES)
    ref = st_model.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True)  # its pipeline normalises
    assert ours.shape == ref.shape == (len(SENTENCES), 384)
    cosine = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.99999, f"cosine {cosine[worst]:.7f} for {SENTENCES[worst][:60]!r}"
    assert np.abs(ours - ref).max() < 1e-5
    assert embedder.max_tokens == st_model.max_seq_length == 256


@pytest.mark.peer
def test_token_counts_equal_sentence_transformers_tokenizer(embedder: Embedder, st_model) -> None:  # type: ignore[no-untyped-def]
    info = embedder.embed_with_info(SENTENCES)
    features = st_model.tokenize(SENTENCES)
    assert info.token_counts == features["attention_mask"].sum(dim=1).tolist()


@pytest.mark.peer
@pytest.mark.parametrize("mode", ["cls", "max"])
def test_cls_and_max_pooling_equal_sentence_transformers(tmp_path: Path, embedder: Embedder, mode: str) -> None:
    """The same weights in a folder that pools by [CLS] (or max) and does not normalise."""
    st = pytest.importorskip("sentence_transformers")
    assert embedder.entry is not None
    folder = _copy_model(embedder.entry.path, tmp_path)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling.update({"pooling_mode_mean_tokens": False, f"pooling_mode_{mode}_token{'s' if mode == 'max' else ''}": True})
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))

    lamina = Embedder.load(str(folder), home=tmp_path / "home")
    assert lamina.pooling.modes == (mode,) and not lamina.pooling.normalize
    texts = [*SENTENCES[:8], LONG]
    ours = lamina.embed(texts, batch_size=4)
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() > 0.01  # really not normalised
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


def test_order_is_kept_whatever_the_batch_size(embedder: Embedder) -> None:
    one = embedder.embed(SENTENCES, batch_size=1)
    for batch_size in (7, 64):
        np.testing.assert_allclose(embedder.embed(SENTENCES, batch_size=batch_size), one, atol=1e-5, rtol=0)
    # Each vector belongs to its own text: a text embedded alone gives the row it got in the batch.
    for i in (0, 11, 15, 25):
        np.testing.assert_allclose(embedder.embed([SENTENCES[i]])[0], one[i], atol=1e-5, rtol=0)


def test_truncation_is_reported(embedder: Embedder) -> None:
    info = embedder.embed_with_info(SENTENCES)
    long = SENTENCES.index(LONG)
    assert embedder.count_tokens(LONG) > 256
    assert info.truncated[long] and info.token_counts[long] == 256
    assert info.truncated[SENTENCES.index("word " * 300)]
    assert sum(info.truncated) == 2
    for text, count, cut in zip(SENTENCES, info.token_counts, info.truncated, strict=True):
        if not cut:
            assert count == embedder.count_tokens(text)
    assert info.token_counts[SENTENCES.index("")] == 2  # [CLS] [SEP]
    # What is cut is the tail: the kept text embeds the same as the whole.
    ids = embedder.tokenizer.encode(LONG, add_special_tokens=False)[:254]
    head = embedder.tokenizer.decode(ids)
    np.testing.assert_allclose(embedder.embed([head])[0], info.vectors[long], atol=1e-5, rtol=0)


def test_shape_dtype_and_unit_length(embedder: Embedder) -> None:
    vectors = embedder.embed(SENTENCES[:5])
    assert vectors.shape == (5, embedder.dim) == (5, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.name == MODEL and embedder.max_tokens == 256
    # Similar sentences are closer than unrelated ones (a sanity check that the weights are right).
    a, b, c = embedder.embed(["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."])
    assert a @ b > a @ c + 0.3


def test_empty_list_and_empty_strings(embedder: Embedder) -> None:
    empty = embedder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    info = embedder.embed_with_info([])
    assert info.token_counts == [] and info.truncated == []
    vectors = embedder.embed(["", "   "])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)  # whitespace is no token
    assert np.isfinite(vectors).all()


def test_bad_input_is_an_invalid_request(embedder: Embedder) -> None:
    with pytest.raises(InvalidRequestError, match=r"texts\[1\] is int"):
        embedder.embed(["fine", 42])  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match="not one string"):
        embedder.embed("a single string")
    with pytest.raises(InvalidRequestError, match="text is NoneType"):
        embedder.count_tokens(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="batch_size must be >= 1"):
        embedder.embed(["x"], batch_size=0)


def test_load_refuses_what_it_cannot_embed(tmp_path: Path, embedder: Embedder) -> None:
    with pytest.raises(InvalidRequestError, match="not an embedding model"):
        Embedder.load("smollm2-135m-instruct", home=tmp_path)
    assert embedder.entry is not None
    folder = _copy_model(embedder.entry.path, tmp_path / "dense")
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelFormatError, match=r"\['Dense'\] are not supported"):
        Embedder.load(str(folder), home=tmp_path)


def test_lazy_exports() -> None:
    import lamina
    import lamina.foundation

    assert lamina.Embedder is Embedder
    assert lamina.foundation.Embedder is Embedder


def _copy_model(source: Path, dest: Path) -> Path:
    """A writable copy of the model folder, the weights symlinked rather than copied."""
    folder = dest / "model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    return folder
