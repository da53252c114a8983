"""The GAN's data, training loop (it learns, it resumes exactly), sampling, PNG grids, Fréchet distance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lamina.arch.gan import GANConfig, Generator
from lamina.errors import ConfigError, InvalidRequestError
from lamina.foundation.gan import (
    GanTrainArgs,
    GanTrainer,
    frechet_distance,
    from_tensor,
    load_digits_split,
    load_generator,
    sample,
    sample_per_class,
    save_grid_png,
    to_tensor,
)

TINY = GANConfig(latent_dim=8, n_classes=2, g_channels=8, d_channels=8, embed_dim=4)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def two_tone(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 is blank paper, class 1 is solid ink: a conditional generator must tell them apart."""
    labels = np.arange(n) % 2
    images = np.where(labels[:, None, None] == 1, 16.0, 0.0) * np.ones((n, 8, 8))
    return images.astype(np.float32), labels.astype(np.int64)


def test_the_digits_split_is_fixed_stratified_and_disjoint() -> None:
    d = load_digits_split()
    assert d.train_images.shape == (1437, 8, 8) and d.test_images.shape == (360, 8, 8)
    assert d.train_images.min() >= 0 and d.train_images.max() <= 16
    assert np.bincount(d.test_labels).min() >= 35  # every digit held out about equally (36 each)
    again = load_digits_split()
    np.testing.assert_array_equal(d.test_labels, again.test_labels)
    np.testing.assert_array_equal(d.train_images, again.train_images)
    with pytest.raises(InvalidRequestError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_pixels_map_to_minus_one_one_and_back() -> None:
    images = np.array([[[0.0, 8.0], [16.0, 4.0]]], dtype=np.float32)
    x = to_tensor(images)
    assert x.shape == (1, 1, 2, 2)
    torch.testing.assert_close(x, torch.tensor([[[[-1.0, 0.0], [1.0, -0.5]]]]))
    np.testing.assert_allclose(from_tensor(x), images)


def test_the_gan_learns_what_each_label_looks_like() -> None:
    images, labels = two_tone()
    args = GanTrainArgs(steps=250, batch_size=32, lr=1e-3, log_interval=50)
    trainer = GanTrainer(TINY, args, images, labels)
    before = [sample(trainer.generator, c, 32).mean() for c in (0, 1)]
    result = trainer.run()
    blank, ink = (sample(trainer.generator, c, 32).mean() for c in (0, 1))
    assert abs(before[1] - before[0]) < 2.0  # untrained: both labels give the same grey
    assert blank < 4.0 and ink > 12.0, (blank, ink)
    assert [r["step"] for r in result.history] == [50, 100, 150, 200, 250]
    assert result.run_dir is None


def test_training_writes_a_run_folder_and_resumes_exactly(tmp_path: Path) -> None:
    images, labels = two_tone()
    args = GanTrainArgs(steps=12, batch_size=16, save_interval=6, log_interval=3)
    straight = GanTrainer(TINY, args, images, labels, tmp_path / "straight")
    straight.run()

    half = GanTrainArgs(steps=6, batch_size=16, save_interval=6, log_interval=3)
    GanTrainer(TINY, half, images, labels, tmp_path / "resumed").run()  # "interrupted" after 6 steps
    resumed = GanTrainer(TINY, args, images, labels, tmp_path / "resumed")
    resumed.run(resume=True)

    expected = straight.generator.state_dict().values()
    for a, b in zip(expected, resumed.generator.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    run = tmp_path / "resumed"
    assert (run / "samples.png").read_bytes().startswith(PNG_MAGIC)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
    generator = load_generator(run)
    assert not generator.training
    for a, b in zip(generator.state_dict().values(), straight.generator.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)

    other = GANConfig(latent_dim=4, n_classes=2, g_channels=8, d_channels=8, embed_dim=4)
    with pytest.raises(ConfigError, match="another GAN config"):
        GanTrainer(other, args, images, labels, run).run(resume=True)


def test_bad_training_input_is_refused() -> None:
    images, labels = two_tone(8)
    with pytest.raises(InvalidRequestError, match=r"labels must be in 0\.\.1"):
        GanTrainer(TINY, GanTrainArgs(steps=1), images, labels + 1)
    with pytest.raises(InvalidRequestError, match="as many labels"):
        GanTrainer(TINY, GanTrainArgs(steps=1), images, labels[:3])
    with pytest.raises(ConfigError, match="steps"):
        GanTrainArgs(steps=0)
    with pytest.raises(ConfigError, match="loss"):
        GanTrainArgs(loss="wasserstein")  # type: ignore[arg-type]


def test_a_folder_without_a_generator_says_to_train_one(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="lamina gan train"):
        load_generator(tmp_path)


def test_sampling_is_seeded_in_range_and_checks_the_digit() -> None:
    torch.manual_seed(0)
    generator = Generator(GANConfig())
    a, b = sample(generator, 7, 5, seed=1), sample(generator, 7, 5, seed=1)
    assert a.shape == (5, 8, 8) and a.min() >= 0 and a.max() <= 16
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sample(generator, 7, 1, seed=1)[0], a[0])  # eval mode: batch-independent
    assert generator.training  # the caller's mode is restored
    images, labels = sample_per_class(generator, 3)
    assert images.shape == (30, 8, 8)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))
    with pytest.raises(InvalidRequestError, match=r"digit must be in 0\.\.9 \(got 12\)"):
        sample(generator, 12, 4)
    with pytest.raises(InvalidRequestError, match="n must be"):
        sample(generator, 3, 0)


def test_grids_are_png_files(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(0, 16, (12, 8, 8))
    path = save_grid_png(tmp_path / "sub" / "grid.png", images, ncols=4, row_labels=["a", "b", "c"],
                         title="t")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_frechet_distance_matches_the_formula() -> None:
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(np.real(linalg.sqrtm(cov_a @ cov_b))))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0)  # a shift only: |shift|^2
    dead = np.hstack([a, np.zeros((400, 3))])  # always-zero features (dead ReLUs): singular covariances
    assert np.isfinite(frechet_distance(dead, np.hstack([b, np.zeros((300, 3))])))
    with pytest.raises(InvalidRequestError, match="same d"):
        frechet_distance(a, b[:, :5])
