"""The digits experiment end to end at a reduced size, and the classifier pieces it is made of."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lamina.errors import ConfigError
from lamina.foundation.experiments import (
    ClassifierArgs,
    DigitsExperimentArgs,
    DigitsExperimentResult,
    GeneratorQuality,
    LabelledSet,
    PseudoLabelRound,
    SeedResult,
    accuracy,
    augmentation_verdict,
    results_markdown,
    run_digits_experiment,
    self_train,
    train_digit_classifier,
)
from lamina.foundation.gan import GanTrainArgs, load_digits_split, load_generator

SMALL = DigitsExperimentArgs(
    seeds=1, gan=GanTrainArgs(steps=100, save_interval=100, log_interval=50),
    classifier=ClassifierArgs(steps=150), synthetic_per_class=20, self_training_rounds=1,
    quality_per_class=20,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_digits_experiment_runs_end_to_end(tmp_path: Path) -> None:
    phases: list[tuple[int, int, str]] = []
    result = run_digits_experiment(SMALL, tmp_path, on_phase=lambda *p: phases.append(p))

    (seed,) = result.seeds
    assert seed.labelled == 143 and result.train_images == 1437 and result.test_images == 360
    assert set(seed.accuracy) == {"supervised", "augmented", "self_training", "full"}
    assert seed.accuracy["supervised"] > 0.8  # 143 labels go a long way on these digits
    assert seed.accuracy["full"] > 0.9
    assert seed.accuracy["full"] >= seed.accuracy["supervised"] - 0.02  # the ceiling is a ceiling
    (pseudo,) = seed.pseudo_labels
    assert pseudo.kept > 500 and pseudo.correct > 0.9  # confident pseudo-labels on the rest: mostly right
    q = seed.quality
    assert 0.0 <= q.judge_accuracy <= 1.0
    assert q.frechet > q.frechet_real > 0  # 100 GAN steps are far from the real images' floor
    assert [p[0] for p in phases] == [0, 1, 2, 3, 4, 5] and phases[-1][2] == "done"

    assert sorted(p.name for p in result.files) == ["results.json", "results.md", "results.png"]
    table = (tmp_path / "results.md").read_text()
    for row in ("supervised, 10 % labels", "+ GAN samples", "self-training", "supervised, 100 % labels",
                "GAN samples", "real training images"):
        assert f"| {row}" in table, row
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["summary"]["full"]["mean"] == pytest.approx(seed.accuracy["full"])
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    assert load_generator(tmp_path / "gan-seed0").config == SMALL.gan_config  # its GAN can be sampled later


def test_the_table_says_when_augmentation_does_not_help() -> None:
    quality = GeneratorQuality(judge_accuracy=0.97, frechet=40.0, frechet_real=5.0)
    seeds = [SeedResult(s, 143, {"supervised": 0.95, "augmented": 0.93, "self_training": 0.96, "full": 0.98},
                        quality, [PseudoLabelRound(1, 1200, 0.98)], 1.0, 2.0) for s in (0, 1)]
    result = DigitsExperimentResult(DigitsExperimentArgs(seeds=2), seeds, 1437, 360, 4.0, None)
    table = results_markdown(result)
    assert "GAN augmentation hurt: -2.0 points over the supervised baseline (per seed -2.0, -2.0)" in table
    assert "| + GAN samples | 143 | 93.0% ± 0.0% | 93.0%, 93.0% |" in table
    assert "| GAN samples | 97.0% | 97.0%, 97.0% | 40.0 | 40.0, 40.0 |" in table
    seeds[1].accuracy["augmented"] = 0.968  # mean 94.9 %: within half a point of the baseline
    assert "GAN augmentation did not help: -0.1 points" in results_markdown(result)
    for seed in seeds:
        seed.accuracy["augmented"] = 0.97
    assert "GAN augmentation helped: +2.0 points" in results_markdown(result)


@pytest.mark.parametrize(
    ("gains", "verdict"),
    [
        ([0.02, 0.01, 0.006], "helped"),
        ([0.031, -0.011, 0.0], "did not help consistently"),  # a mean gain the seeds do not agree on
        ([0.004, -0.002], "did not help"),
        ([-0.01, 0.001], "did not help"),
        ([-0.01, -0.02], "hurt"),
    ],
)
def test_the_verdict_on_augmentation_needs_every_seed_to_agree(gains: list[float], verdict: str) -> None:
    assert augmentation_verdict(gains) == verdict


def test_self_training_uses_hidden_labels_only_to_report() -> None:
    d = load_digits_split()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.train_labels))
    labelled = LabelledSet(d.train_images[idx[:100]], d.train_labels[idx[:100]])
    unlabelled = LabelledSet(d.train_images[idx[100:400]], d.train_labels[idx[100:400]])
    scrambled = LabelledSet(unlabelled.images, rng.permutation(unlabelled.labels))
    args = ClassifierArgs(steps=80)
    model_a, rounds_a = self_train(labelled, unlabelled, args, seed=0, rounds=1, confidence=0.9)
    model_b, rounds_b = self_train(labelled, scrambled, args, seed=0, rounds=1, confidence=0.9)
    torch.testing.assert_close(list(model_a.parameters()), list(model_b.parameters()))  # same training
    assert rounds_a[0].kept == rounds_b[0].kept > 0
    assert rounds_a[0].correct > rounds_b[0].correct  # only the report sees the true labels


def test_the_synthetic_share_of_batches_is_what_trains() -> None:
    d = load_digits_split()
    real = LabelledSet(d.train_images[:200], d.train_labels[:200])
    wrong = LabelledSet(d.train_images[200:400], (d.train_labels[200:400] + 1) % 10)  # every label wrong
    test = LabelledSet(d.test_images, d.test_labels)
    args = ClassifierArgs(steps=150)
    mostly_real = accuracy(train_digit_classifier(real, args, 0, extra=wrong, extra_share=0.1), test)
    mostly_wrong = accuracy(train_digit_classifier(real, args, 0, extra=wrong, extra_share=0.9), test)
    assert mostly_real > 0.8 > 0.5 > mostly_wrong


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"label_fraction": 0.0}, "label_fraction must be in"),
        ({"label_fraction": 1.0}, "label_fraction must be in"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"synthetic_share": 1.0}, "synthetic_share"),
        ({"confidence": 0.0}, "confidence"),
    ],
)
def test_bad_experiment_arguments_are_refused(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        DigitsExperimentArgs(**kwargs)


def test_too_few_labels_for_one_per_digit_is_refused() -> None:
    with pytest.raises(ConfigError, match="fewer than one label per digit"):
        run_digits_experiment(DigitsExperimentArgs(label_fraction=0.005), None)
