"""The conditional GAN on scikit-learn's handwritten digits: the data, the training loop, sampling, scoring.

- Data: `load_digits_split` reads the 1,797 real 8x8 digits that ship with scikit-learn (no network), pixel
  values 0..16, and splits them once into a stratified train/test split with a fixed seed, so every run and
  every experiment holds out the very same images. `to_tensor`/`from_tensor` map 0..16 to the generator's
  [-1, 1] and back.
- Training: `GanTrainer` alternates one discriminator step and one generator step, Adam at 2e-4 for both
  networks with SNGAN's betas (0, 0.9) and the hinge loss (DCGAN's non-saturating loss as an option).
  Each step's real batch, noise and fake labels come from a generator seeded by (seed, step) alone, so
  `resume=True` continues an interrupted run exactly. Checkpoints are `lamina.foundation.checkpoint`'s atomic
  folders (safetensors weights of both networks, optimizer states, `state.json` with the configs and the
  loss history); the run folder also gets `metrics.jsonl` and a grid of samples, `samples.png`.
- Sampling: `sample` draws n images of one digit as an (n, 8, 8) array in the data's own 0..16 scale;
  `save_grid_png` writes any such images as a PNG grid (matplotlib's Agg canvas, written atomically).
- Scoring: `frechet_distance` is the FID formula over any feature vectors (the digits experiment uses a
  real-data classifier's penultimate layer, since Inception features mean little for 8x8 digits).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lamina.arch.gan import Discriminator, GANConfig, Generator
from lamina.errors import ConfigError, InvalidRequestError
from lamina.foundation.checkpoint import latest_checkpoint, save_checkpoint
from lamina.infra.fs import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

PIXEL_MAX = 16.0  # scikit-learn's digits are 4-bit grey levels, 0..16


# --- data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """The fixed split of scikit-learn's digits; images (N, 8, 8) float32 in 0..16, labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1,797 digits split once, stratified by class: with the defaults 1,437 to train on, 360 held out."""
    if not 0.0 < test_fraction < 1.0:
        raise InvalidRequestError(f"test_fraction must be in (0, 1) (got {test_fraction})",
                                  param="test_fraction")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise InvalidRequestError("the digits data ships with scikit-learn, which is not installed: "
                                  "pip install scikit-learn") from None
    data = load_digits()
    images, labels = data.images.astype(np.float32), data.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=test_fraction,
                                                        stratify=labels, random_state=seed)
    return Digits(train_x, train_y, test_x, test_y)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) in 0..16 -> (N, 1, 8, 8) float32 in [-1, 1]."""
    return torch.as_tensor(np.asarray(images, dtype=np.float32) / (PIXEL_MAX / 2) - 1.0).unsqueeze(1)


def from_tensor(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 8, 8) in [-1, 1] -> (N, 8, 8) float32 in 0..16."""
    return ((images.detach().float().cpu().squeeze(1).numpy() + 1.0) * (PIXEL_MAX / 2)).clip(0.0, PIXEL_MAX)


# --- training ---------------------------------------------------------------------------------------------


@dataclass
class GanTrainArgs:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4  # DCGAN's and SNGAN's, for both networks
    # SNGAN's betas for the hinge loss with spectral norm (Miyato et al. 2018). DCGAN's (0.5, 0.999) collapsed
    # each digit to a few look-alikes here: after 3,000 steps on all training digits, Fréchet distance 160
    # against 20 with (0, 0.9), and per-pixel spread within a digit 0.85 against 2.4 (real digits: 2.6).
    beta1: float = 0.0
    beta2: float = 0.9
    loss: Literal["hinge", "nonsaturating"] = "hinge"
    seed: int = 0
    save_interval: int = 500  # steps between checkpoints (the last step is always saved)
    log_interval: int = 50  # steps between progress reports and metrics records

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})", param=name)
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0 (got {self.lr})", param="lr")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1) (got {getattr(self, name)})", param=name)
        if self.loss not in ("hinge", "nonsaturating"):
            raise ConfigError(f"loss must be 'hinge' or 'nonsaturating' (got {self.loss!r})", param="loss")


@dataclass
class GanStepStats:
    step: int
    steps: int
    d_loss: float  # means over the steps since the last report
    g_loss: float
    d_real: float  # the discriminator's mean logit on real images: it rises above d_fake as D learns
    d_fake: float
    steps_per_s: float


@dataclass
class GanResult:
    steps: int
    d_loss: float
    g_loss: float
    seconds: float
    run_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # one record per log interval


def gan_losses(d_real: torch.Tensor, d_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss from its logits on real and on (detached) fake images."""
    if kind == "hinge":  # Lim and Ye 2017, as in SNGAN and BigGAN
        return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()  # -log D(x) - log(1 - D(G(z)))


def generator_loss(d_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's loss from the discriminator's logits on its images (non-saturating: -log D(G(z)))."""
    return -d_fake.mean() if kind == "hinge" else F.softplus(-d_fake).mean()


class GanTrainer:
    """Trains a conditional GAN on labelled images (N, 8, 8) in 0..16; `run_dir=None` keeps it in memory."""

    def __init__(self, config: GANConfig, args: GanTrainArgs, images: np.ndarray, labels: np.ndarray,
                 run_dir: Path | None = None, *,
                 on_step: Callable[[GanStepStats], None] | None = None) -> None:
        if len(images) != len(labels) or len(images) == 0:
            raise InvalidRequestError(f"need as many labels as images, at least one (got {len(images)} "
                                      f"images, {len(labels)} labels)")
        if labels.min() < 0 or labels.max() >= config.n_classes:
            raise InvalidRequestError(f"labels must be in 0..{config.n_classes - 1} (got "
                                      f"{labels.min()}..{labels.max()})")
        self.config, self.args, self.run_dir, self.on_step = config, args, run_dir, on_step
        self.images, self.labels = to_tensor(images), torch.as_tensor(labels, dtype=torch.long)
        torch.manual_seed(args.seed)  # the same initial weights for the same seed
        self.generator, self.discriminator = Generator(config), Discriminator(config)
        betas = (args.beta1, args.beta2)
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=args.lr, betas=betas)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=args.lr, betas=betas)

    @property
    def checkpoints(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def run(self, resume: bool = False) -> GanResult:
        a, G, D = self.args, self.generator, self.discriminator
        start, history = 0, []
        ckpt = latest_checkpoint(self.checkpoints) if resume and self.checkpoints is not None else None
        if ckpt is not None:
            saved = GANConfig.from_dict(ckpt.state["config"])
            if saved != self.config:
                raise ConfigError(f"the checkpoint in {self.run_dir} is of another GAN config ({saved}); "
                                  "train into a new --out folder instead")
            weights = ckpt.weights()
            G.load_state_dict(_part(weights, "generator."))
            D.load_state_dict(_part(weights, "discriminator."))
            optimizers = ckpt.optimizer()
            self.g_optimizer.load_state_dict(optimizers["generator"])
            self.d_optimizer.load_state_dict(optimizers["discriminator"])
            start, history = ckpt.step, [r for r in ckpt.state.get("history", []) if r["step"] <= ckpt.step]
            logger.info("resuming the GAN in %s from step %d", self.run_dir, start)
        G.train()
        D.train()
        began = time.perf_counter()
        window: list[tuple[float, float, float, float]] = []
        window_start = time.perf_counter()
        for step in range(start, a.steps):
            # Batches, noise and fake labels depend on (seed, step) only: a resumed run sees what it would
            # have seen.
            rng = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
            idx = torch.randint(len(self.images), (a.batch_size,), generator=rng)
            real, real_labels = self.images[idx], self.labels[idx]
            z = torch.randn(a.batch_size, self.config.latent_dim, generator=rng)
            fake_labels = torch.randint(self.config.n_classes, (a.batch_size,), generator=rng)
            fake = G(z, fake_labels)

            d_real, d_fake = D(real, real_labels), D(fake.detach(), fake_labels)
            d_loss = gan_losses(d_real, d_fake, a.loss)
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_optimizer.step()

            g_loss = generator_loss(D(fake, fake_labels), a.loss)
            self.g_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()  # also fills D's gradients, which its next zero_grad discards
            self.g_optimizer.step()

            window.append((d_loss.item(), g_loss.item(), d_real.mean().item(), d_fake.mean().item()))
            done = step + 1
            if done % a.log_interval == 0 or done == a.steps:
                means = np.mean(window, axis=0)
                rate = len(window) / max(time.perf_counter() - window_start, 1e-9)
                stats = GanStepStats(done, a.steps, *map(float, means), steps_per_s=rate)
                history.append({"step": done, "d_loss": round(stats.d_loss, 5),
                                "g_loss": round(stats.g_loss, 5), "d_real": round(stats.d_real, 5),
                                "d_fake": round(stats.d_fake, 5)})
                window, window_start = [], time.perf_counter()
                if self.on_step is not None:
                    self.on_step(stats)
            if self.checkpoints is not None and (done % a.save_interval == 0 or done == a.steps):
                self._save(done, history)
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            save_class_grid(self.run_dir / "samples.png", G, per_class=10, seed=a.seed)
        last = history[-1] if history else {"d_loss": float("nan"), "g_loss": float("nan")}
        return GanResult(a.steps, last["d_loss"], last["g_loss"], time.perf_counter() - began, self.run_dir,
                         history)

    def _save(self, step: int, history: list[dict[str, float]]) -> None:
        assert self.checkpoints is not None
        weights = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        weights |= {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
        optimizers = {"generator": self.g_optimizer.state_dict(),
                      "discriminator": self.d_optimizer.state_dict()}
        state = {"kind": "gan", "config": self.config.to_dict(), "args": asdict(self.args),
                 "history": history}
        save_checkpoint(self.checkpoints, step, weights, optimizers, state)


def load_generator(run_dir: Path) -> Generator:
    """The generator of the latest checkpoint in a `GanTrainer` run folder, in eval mode."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None or ckpt.state.get("kind") != "gan":
        raise InvalidRequestError(f"no trained generator in {str(run_dir)!r}: run `lamina gan train` first",
                                  param="run")
    generator = Generator(GANConfig.from_dict(ckpt.state["config"]))
    generator.load_state_dict(_part(ckpt.weights(), "generator."))
    return generator.eval()


def _part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


# --- sampling ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(generator: Generator, digit: int, n: int, seed: int = 0) -> np.ndarray:
    """n images of class `digit`, (n, 8, 8) float32 in 0..16; the same seed gives the same images.

    The generator runs in eval mode (BatchNorm's running statistics), so an image does not depend on the
    others drawn with it and n=1 works.
    """
    classes = generator.config.n_classes
    if not 0 <= digit < classes:
        raise InvalidRequestError(f"digit must be in 0..{classes - 1} (got {digit})", param="digit")
    if n < 1:
        raise InvalidRequestError(f"n must be >= 1 (got {n})", param="n")
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.config.latent_dim, generator=rng)
    was_training = generator.training
    generator.eval()
    try:
        device = next(generator.parameters()).device
        images = generator(z.to(device), torch.full((n,), digit, dtype=torch.long, device=device))
    finally:
        generator.train(was_training)
    return from_tensor(images)


def sample_per_class(generator: Generator, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of every class, grouped by class: images (C * per_class, 8, 8), labels."""
    classes = generator.config.n_classes
    images = [sample(generator, c, per_class, seed=seed * 1_000 + c) for c in range(classes)]
    return np.concatenate(images), np.repeat(np.arange(classes, dtype=np.int64), per_class)


def save_grid_png(path: Path, images: np.ndarray, *, ncols: int | None = None,
                  row_labels: list[str] | None = None, title: str | None = None) -> Path:
    """Images (n, h, w) in 0..16 as a PNG grid, dark ink on white like the digits' own plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = np.asarray(images, dtype=np.float32)
    n, h, w = images.shape
    ncols = ncols or max(1, int(np.ceil(np.sqrt(n))))
    nrows = int(np.ceil(n / ncols))
    gap = 1
    # One mosaic with white gutters drawn by a single imshow: a subplot per image is ~100x slower.
    mosaic = np.zeros((nrows * (h + gap) - gap, ncols * (w + gap) - gap), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        mosaic[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
    fig = Figure(figsize=(max(2.0, 0.4 * ncols + 0.6), max(2.0, 0.4 * nrows + 0.4)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=PIXEL_MAX, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(len(row_labels))], row_labels)
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def save_class_grid(path: Path, generator: Generator, per_class: int = 10, seed: int = 0,
                    title: str | None = None) -> Path:
    """A row of `per_class` samples for every class, labelled with the class."""
    images, _ = sample_per_class(generator, per_class, seed)
    rows = [str(c) for c in range(generator.config.n_classes)]
    return save_grid_png(path, images, ncols=per_class, row_labels=rows, title=title)


# --- scoring ----------------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature vectors (n, d): the FID formula
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). It grows with the sets' difference and, for
    finite samples, is above zero even for two samples of one distribution, so compare it with such a floor.

    tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues: unlike a general matrix square root, that stays
    real and exact when features that are always zero (dead ReLUs) make the covariances singular.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InvalidRequestError(f"need two sets (n >= 2, d) of the same d (got {a.shape} and {b.shape})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0.0))) @ vectors.T  # S_a^(1/2)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0.0)
    diff = mu_a - mu_b
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(cross).sum()))


def config_summary(config: GANConfig, args: GanTrainArgs) -> dict[str, Any]:
    """What a run was, for reports: the two configs as plain data."""
    return {"gan": config.to_dict(), "train": asdict(args)}
