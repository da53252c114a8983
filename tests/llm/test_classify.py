"""Classification heads: pooling, training, save/load/predict, bad data, another base refused, real transfer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lamina.arch.lora import lora_layers
from lamina.cli import cli
from lamina.llm.formats.peft import AdapterMismatchError
from lamina.llm.tuning.base import TuneArgs, TuneRun
from lamina.llm.tuning.classify import ClassifierModel, ClassifyArgs, TextClassifier, train_classifier
from lamina.llm.tuning.datasets import DatasetError, read_jsonl, split
from lamina.settings import get_settings
from tests.llm.test_dpo import tiny_folder

DOCS = Path(__file__).parents[1] / "data" / "stdlib_docs.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("tiny-classify") / "model")


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_records(n: int = 120) -> list[dict]:
    """Two labels a tiny random model can learn: which word the text is made of."""
    words = {"fruit": ["apple", "banana", "cherry"], "digit": ["one", "two", "three"]}
    return [{"text": " ".join(words[label][(i + j) % 3] for j in range(3 + i % 4)), "label": label}
            for i in range(n) for label in [("fruit", "digit")[i % 2]]]


def _tune(**kw) -> TuneArgs:  # type: ignore[no-untyped-def]
    return TuneArgs(**{"max_steps": 30, "lr": 3e-3, "micro_batch_size": 16, "dtype": "float32", "eval_interval": 30, **kw})


def _run(folder: Path) -> TuneRun:
    return TuneRun(folder, get_settings().home)


def test_pooling_takes_the_last_real_token_or_the_mean_over_real_tokens() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B, T, C)

    class Echo(torch.nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return hidden

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    last = ClassifierModel(Echo(), "decoder", 2, 2, "last")
    mean = ClassifierModel(Echo(), "encoder", 2, 2, "mean")
    for net in (last, mean):
        net.head.weight.data = torch.eye(2)
    assert last(torch.zeros(2, 3, dtype=torch.long), mask).tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert mean(torch.zeros(2, 3, dtype=torch.long), mask).tolist() == [[1.0, 2.0], [8.0, 9.0]]


def test_a_head_learns_and_the_saved_classifier_predicts_the_same(tiny: Path, tmp_path: Path) -> None:
    clf, result = train_classifier(str(tiny), _toy_records(), ClassifyArgs(train="lora"), _tune(), _run(tmp_path / "run"))
    assert result.final["accuracy"] == 1.0 and result.before["accuracy"] <= 0.75
    assert lora_layers(clf.net.backbone)  # LoRA adapters inside, the head on top
    spec = json.loads((result.output / "classifier.json").read_text())
    assert spec["labels"] == ["digit", "fruit"] and spec["pooling"] == "last" and spec["train"] == "lora"
    loaded = TextClassifier.load(result.output, home=get_settings().home)
    texts = ["banana apple cherry", "two three one two"]
    assert [p.label for p in loaded.predict(texts)] == ["fruit", "digit"]
    for a, b in zip(loaded.predict(texts), clf.predict(texts), strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    # the folder holds the head and the adapters only, not the base weights
    from safetensors import safe_open

    with safe_open(str(result.output / "classifier.safetensors"), "pt") as f:
        assert all(k.startswith("head.") or ".lora_" in k for k in f.keys())  # noqa: SIM118 (not a dict)


def test_head_only_freezes_the_backbone_and_scratch_reinitialises_it(tiny: Path) -> None:
    head = TextClassifier.create(str(tiny), ["a", "b"], ClassifyArgs(train="head"), home=get_settings().home)
    assert [n for n, p in head.net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    pretrained = TextClassifier.create(str(tiny), ["a", "b"], ClassifyArgs(train="full"), home=get_settings().home)
    scratch = TextClassifier.create(str(tiny), ["a", "b"], ClassifyArgs(train="full", scratch=True),
                                    home=get_settings().home)
    w1 = pretrained.net.backbone.layers[0].mlp.up_proj.weight
    w2 = scratch.net.backbone.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w1, w2)
    assert all(p.requires_grad for p in scratch.net.parameters())


def test_a_classifier_is_refused_on_a_base_of_another_shape(tiny: Path, tmp_path: Path) -> None:
    clf = TextClassifier.create(str(tiny), ["a", "b"], ClassifyArgs(train="head"), home=get_settings().home)
    clf.save(tmp_path / "clf")
    other = tiny_folder(tmp_path / "other", dim=48)
    with pytest.raises(AdapterMismatchError, match=r"dim 32, .*dim 48, .*: dim, head_dim, hidden_dim differ"):
        TextClassifier.load(tmp_path / "clf", base_model=str(other), home=get_settings().home)


def test_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: missing field 'label'"):
        read_jsonl(path, formats=("classification",))
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": [1]}\n')
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: field 'label' must be a string or an integer"):
        read_jsonl(path, formats=("classification",))
    path.write_text('{"text": "a", "label": "x"}\n{"text": "a", "label": "x"}\n')
    with pytest.raises(DatasetError, match="at least two labels"):
        train_classifier("unused", read_jsonl(path, formats=("classification",))[1], ClassifyArgs(), _tune(),
                         _run(tmp_path / "run"))


def test_cli_trains_saves_and_reports_hold_out_accuracy(tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _toy_records()))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "classify", "--model", str(tiny), "--data", str(data), "--head-only",
                                      "--steps", "10", "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out accuracy on 24 texts" in result.output and "chance 0.500" in result.output
    assert (out / "classifier" / "classifier.json").exists() and (out / "metrics.jsonl").exists()
    both = CliRunner().invoke(cli, ["finetune", "classify", "--model", str(tiny), "--data", str(data), "--lora",
                                    "--head-only"])
    assert both.exit_code == 2 and "exclude each other" in both.output


# --- real data: Python's docstrings by module family -----------------------------------------------------


@pytest.mark.slow
def test_minilm_transfers_to_stdlib_docstrings_better_than_scratch_and_bag_of_words(tmp_path: Path) -> None:
    """6 labels (chance 1/6): pretrained MiniLM fine-tuned beats the same network from random weights and TF-IDF."""
    records = read_jsonl(DOCS, formats=("classification",))[1]
    tune = TuneArgs(max_steps=75, lr=1e-4, micro_batch_size=16, dtype="float32", eval_interval=75, warmup_steps=5)
    _, pretrained = train_classifier("all-minilm-l6-v2", records, ClassifyArgs(max_len=32), tune,
                                   _run(tmp_path / "pretrained"))
    # the baseline gets its own, higher learning rate (measured best of 1e-4 and 5e-4)
    _, scratch = train_classifier("all-minilm-l6-v2", records, ClassifyArgs(max_len=32, scratch=True),
                                  dataclasses.replace(tune, lr=5e-4), _run(tmp_path / "scratch"))
    pytest.importorskip("sklearn")  # the lexical baseline, on the same split
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, held = split(records, 0.2, 0)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    bow = LogisticRegression(max_iter=2000, C=10).fit(vectorizer.fit_transform([r["text"] for r in train]),
                                                      [r["label"] for r in train])
    bow_accuracy = bow.score(vectorizer.transform([r["text"] for r in held]), [r["label"] for r in held])
    accuracy = pretrained.final["accuracy"]
    print(f"held-out accuracy: pretrained {accuracy:.3f}, scratch {scratch.final['accuracy']:.3f}, "
          f"tf-idf {bow_accuracy:.3f}, untrained head {pretrained.before['accuracy']:.3f}")
    assert pretrained.eval_records == 180
    assert accuracy > 0.75  # chance is 0.167
    assert accuracy > scratch.final["accuracy"] + 0.1
    assert accuracy > bow_accuracy
