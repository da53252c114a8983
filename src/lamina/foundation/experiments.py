"""The digits experiment: with 10 % of the labels, do a conditional GAN's samples help a classifier?

On scikit-learn's handwritten digits (the fixed split of `lamina.foundation.gan`), for every seed:
- a stratified `label_fraction` of the training images keeps its labels, the rest is treated as unlabelled;
- supervised: a `DigitClassifier` trained on the labelled part only;
- GAN augmentation: the same, with part of every batch drawn from labelled samples of a conditional GAN
  that was trained on the labelled part only, so it has seen no label the classifier has not;
- self-training (Lee 2013, "Pseudo-Label"): the supervised classifier labels the unlabelled part, the
  confident labels are kept, a fresh classifier trains on both, for a few rounds;
- fully supervised on every training label: the ceiling, and the real-data judge of the GAN, scored by the
  judge's accuracy on the GAN's samples and by the Fréchet distance between the judge's penultimate-layer
  features of samples and of held-out real images (the FID recipe, with the judge in place of Inception).

Every accuracy is on the same held-out test images, which nothing trains on. Seeds change the labelled
subset, the initial weights and the batches; the report gives the mean and spread over seeds, because one
360-image test set moves by a percentage point or more between seeds. Reports: `results.md`, `results.json`,
`results.png` (the accuracies) and each seed's GAN run folder (`gan-seed<k>/`, with `samples.png`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lamina.arch.digits import DigitClassifier, DigitClassifierConfig
from lamina.arch.gan import GANConfig, Generator
from lamina.errors import ConfigError
from lamina.foundation.gan import (
    GanTrainArgs,
    GanTrainer,
    frechet_distance,
    load_digits_split,
    sample_per_class,
    to_tensor,
)
from lamina.infra.fs import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)


# --- classifiers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSet:
    """Images (N, 8, 8) in 0..16 with their labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ClassifierArgs:
    steps: int = 600  # the same whatever the training set's size, so that the rows differ in data only
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4  # AdamW's; with dropout, what keeps 144 images from being memorised outright

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"classifier {name} must be >= 1 (got {getattr(self, name)})", param=name)
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"classifier lr must be > 0 and weight_decay >= 0 (got {self.lr}, "
                              f"{self.weight_decay})")


def train_digit_classifier(data: LabelledSet, args: ClassifierArgs, seed: int, extra: LabelledSet | None = None,
                           extra_share: float | None = None,
                           config: DigitClassifierConfig | None = None) -> DigitClassifier:
    """A `DigitClassifier` trained from scratch with AdamW on `data`, in eval mode.

    Not `lamina.llm.tuning.classify.train_classifier`, which fine-tunes a pretrained model on texts:
    this one is a plain loop over 8x8 images for the digits experiment.

    `extra` adds more labelled images: pooled with `data` when `extra_share` is None, otherwise a fixed
    `extra_share` of every batch comes from `extra` (so a large synthetic set cannot drown the real one).
    """
    if len(data) == 0:
        raise ConfigError("the classifier needs at least one labelled image")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initial weights and dropout
    model = DigitClassifier(config or DigitClassifierConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if extra is not None and extra_share is None:
        data, extra = LabelledSet(np.concatenate([data.images, extra.images]),
                                  np.concatenate([data.labels, extra.labels])), None
    x, y = to_tensor(data.images), torch.as_tensor(data.labels, dtype=torch.long)
    n_extra = 0
    if extra is not None and len(extra) > 0 and extra_share:
        ex, ey = to_tensor(extra.images), torch.as_tensor(extra.labels, dtype=torch.long)
        n_extra = round(args.batch_size * extra_share)
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(len(x), (args.batch_size - n_extra,), generator=generator)
        images, labels = x[idx], y[idx]
        if n_extra:
            jdx = torch.randint(len(ex), (n_extra,), generator=generator)
            images, labels = torch.cat([images, ex[jdx]]), torch.cat([labels, ey[jdx]])
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: DigitClassifier, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, n_classes) for images (N, 8, 8) in 0..16."""
    model.eval()
    return torch.softmax(model(to_tensor(images)), dim=1).numpy()


def accuracy(model: DigitClassifier, data: LabelledSet) -> float:
    return float((predict_proba(model, data.images).argmax(1) == data.labels).mean())


@torch.no_grad()
def classifier_features(model: DigitClassifier, images: np.ndarray) -> np.ndarray:
    """The penultimate layer (N, feature_dim): what the Fréchet distance compares."""
    model.eval()
    return model.features(to_tensor(images)).numpy()


@dataclass
class PseudoLabelRound:
    round: int
    kept: int  # unlabelled images whose pseudo-label was confident enough to train on
    correct: float  # the share of kept pseudo-labels that match the hidden true label


def self_train(labelled: LabelledSet, unlabelled: LabelledSet, args: ClassifierArgs, seed: int, rounds: int,
               confidence: float) -> tuple[DigitClassifier, list[PseudoLabelRound]]:
    """Pseudo-label self-training. `unlabelled.labels` are used only to report how right the pseudo-labels
    were, never to train. Each round starts a fresh classifier on labelled + confident pseudo-labelled."""
    model = train_digit_classifier(labelled, args, seed)
    history = []
    for r in range(1, rounds + 1):
        probs = predict_proba(model, unlabelled.images)
        keep = probs.max(1) >= confidence
        pseudo = LabelledSet(unlabelled.images[keep], probs.argmax(1)[keep])
        correct = float((pseudo.labels == unlabelled.labels[keep]).mean()) if keep.any() else float("nan")
        history.append(PseudoLabelRound(r, int(keep.sum()), correct))
        model = train_digit_classifier(labelled, args, seed + r, extra=pseudo)
    return model, history


# --- the experiment ---------------------------------------------------------------------------------------


@dataclass
class DigitsExperimentArgs:
    label_fraction: float = 0.1  # of the training images whose labels are kept
    seeds: int = 3
    gan: GanTrainArgs = field(default_factory=GanTrainArgs)  # its seed is replaced by each run's seed
    gan_config: GANConfig = field(default_factory=GANConfig)
    classifier: ClassifierArgs = field(default_factory=ClassifierArgs)
    synthetic_per_class: int = 200  # GAN samples per digit for the augmented classifier
    synthetic_share: float = 0.5  # of every augmented training batch
    self_training_rounds: int = 3
    confidence: float = 0.95  # the least class probability for a pseudo-label to be kept
    quality_per_class: int = 100  # GAN samples per digit that the judge scores
    test_fraction: float = 0.2  # the held-out split of `load_digits_split`

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction < 1.0:
            raise ConfigError(f"label_fraction must be in (0, 1), e.g. 0.1 (got {self.label_fraction})",
                              param="label_fraction")
        for name in ("seeds", "synthetic_per_class", "self_training_rounds", "quality_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})", param=name)
        if not 0.0 < self.synthetic_share < 1.0:
            raise ConfigError(f"synthetic_share must be in (0, 1) (got {self.synthetic_share})",
                              param="synthetic_share")
        if not 0.0 < self.confidence <= 1.0:
            raise ConfigError(f"confidence must be in (0, 1] (got {self.confidence})", param="confidence")


PHASES_PER_SEED = 5  # the GAN, supervised, augmented, self-training, fully supervised with the GAN's scores

# The rows of the results table, in order: (key, name, what it is).
METHODS = [
    ("supervised", "supervised, {pct} labels", "the classifier on the labelled images only"),
    ("augmented", "+ GAN samples", "the same labelled images; {share} of every batch is GAN samples "
                                   "(the GAN trained on those labelled images only)"),
    ("self_training", "self-training", "{rounds} rounds of confident (p >= {confidence}) pseudo-labels "
                                       "on the other {rest}"),
    ("full", "supervised, 100 % labels", "every training label: the ceiling"),
]


@dataclass
class GeneratorQuality:
    judge_accuracy: float  # how often the fully supervised classifier calls a sample its conditioning label
    frechet: float  # Fréchet distance, judge features, samples vs held-out real images
    frechet_real: float  # the same for real training images vs held-out: what a perfect generator reaches


@dataclass
class SeedResult:
    seed: int
    labelled: int
    accuracy: dict[str, float]  # method key -> held-out accuracy
    quality: GeneratorQuality
    pseudo_labels: list[PseudoLabelRound]
    gan_seconds: float
    seconds: float


@dataclass
class DigitsExperimentResult:
    args: DigitsExperimentArgs
    seeds: list[SeedResult]
    train_images: int
    test_images: int
    seconds: float
    out_dir: Path | None
    files: list[Path] = field(default_factory=list)

    def mean_std(self, key: str) -> tuple[float, float]:
        values = [s.accuracy[key] for s in self.seeds]
        return float(np.mean(values)), float(np.std(values))

    def quality_mean(self, name: str) -> float:
        return float(np.mean([getattr(s.quality, name) for s in self.seeds]))


def run_digits_experiment(args: DigitsExperimentArgs, out_dir: Path | None = None,
                          on_phase: Callable[[int, int, str], None] | None = None) -> DigitsExperimentResult:
    """Runs every seed and, with `out_dir`, writes the reports there. `on_phase(done, total, text)` is called
    before each phase, for progress bars."""
    from sklearn.model_selection import train_test_split

    began = time.perf_counter()
    digits = load_digits_split(args.test_fraction)
    test = LabelledSet(digits.test_images, digits.test_labels)
    train = LabelledSet(digits.train_images, digits.train_labels)
    n_classes = args.gan_config.n_classes
    if round(args.label_fraction * len(train)) < n_classes:
        raise ConfigError(f"label_fraction {args.label_fraction} keeps fewer than one label per digit of "
                          f"{len(train)} training images; use at least {n_classes / len(train):.3f}",
                          param="label_fraction")
    total, done = args.seeds * PHASES_PER_SEED, 0

    def phase(text: str) -> None:
        nonlocal done
        logger.info("%s", text)
        if on_phase is not None:
            on_phase(done, total, text)
        done += 1

    seeds = []
    for seed in range(args.seeds):
        seed_began = time.perf_counter()
        kept, rest = train_test_split(np.arange(len(train)), train_size=args.label_fraction,
                                      stratify=train.labels, random_state=seed)
        labelled = LabelledSet(train.images[kept], train.labels[kept])
        unlabelled = LabelledSet(train.images[rest], train.labels[rest])

        phase(f"seed {seed}: GAN, {args.gan.steps} steps on {len(labelled)} labelled images")
        gan_dir = out_dir / f"gan-seed{seed}" if out_dir is not None else None
        if gan_dir is not None:  # a fresh run: an older one's checkpoints must not be taken for this one's
            shutil.rmtree(gan_dir / "checkpoints", ignore_errors=True)
        gan_args = dataclasses.replace(args.gan, seed=seed)
        trainer = GanTrainer(args.gan_config, gan_args, labelled.images, labelled.labels, gan_dir)
        gan = trainer.run()
        generator = trainer.generator.eval()

        accuracies: dict[str, float] = {}
        phase(f"seed {seed}: supervised on {len(labelled)} labels")
        accuracies["supervised"] = accuracy(train_digit_classifier(labelled, args.classifier, seed), test)

        phase(f"seed {seed}: supervised + {args.synthetic_per_class * n_classes} GAN samples")
        synthetic = LabelledSet(*sample_per_class(generator, args.synthetic_per_class, seed=seed))
        augmented = train_digit_classifier(labelled, args.classifier, seed, extra=synthetic,
                                     extra_share=args.synthetic_share)
        accuracies["augmented"] = accuracy(augmented, test)

        phase(f"seed {seed}: self-training, {args.self_training_rounds} rounds, {len(unlabelled)} unlabelled")
        model, pseudo = self_train(labelled, unlabelled, args.classifier, seed, args.self_training_rounds,
                                   args.confidence)
        accuracies["self_training"] = accuracy(model, test)

        phase(f"seed {seed}: supervised on all {len(train)} labels, and the GAN's scores")
        judge = train_digit_classifier(train, args.classifier, seed)
        accuracies["full"] = accuracy(judge, test)
        quality = generator_quality(judge, generator, train, test, args.quality_per_class, seed)
        seeds.append(SeedResult(seed, len(labelled), accuracies, quality, pseudo, gan.seconds,
                                time.perf_counter() - seed_began))
        logger.info("seed %d: %s", seed, {k: round(v, 4) for k, v in accuracies.items()})

    result = DigitsExperimentResult(args, seeds, len(train), len(test), time.perf_counter() - began, out_dir)
    if out_dir is not None:
        result.files = write_reports(result, out_dir)
    if on_phase is not None:
        on_phase(total, total, "done")
    return result


def generator_quality(judge: DigitClassifier, generator: Generator, train: LabelledSet, test: LabelledSet,
                      per_class: int, seed: int = 0) -> GeneratorQuality:
    """The judge's accuracy on `per_class` samples of every digit, and the Fréchet distances of its features.
    The samples are drawn with another seed than the augmented classifier's training samples."""
    samples = LabelledSet(*sample_per_class(generator, per_class, seed=seed + 10_000))
    test_features = classifier_features(judge, test.images)
    return GeneratorQuality(
        judge_accuracy=accuracy(judge, samples),
        frechet=frechet_distance(classifier_features(judge, samples.images), test_features),
        frechet_real=frechet_distance(classifier_features(judge, train.images), test_features),
    )


# --- reports ----------------------------------------------------------------------------------------------


def _method_texts(args: DigitsExperimentArgs) -> list[tuple[str, str, str]]:
    values = {"pct": _percent(args.label_fraction), "share": _percent(args.synthetic_share),
              "rounds": args.self_training_rounds, "confidence": args.confidence,
              "rest": _percent(1 - args.label_fraction)}
    return [(key, name.format(**values), text.format(**values)) for key, name, text in METHODS]


def _percent(share: float) -> str:
    return f"{share * 100:.3g} %"


def augmentation_verdict(gains: list[float], margin: float = 0.005) -> str:
    """What the accuracy gains of augmentation over the baseline, one per seed, say. A mean gain within
    `margin` (half a point: under two test images of 360), or gains of both signs, are no effect: the
    seeds' spread is about a point."""
    mean = float(np.mean(gains))
    if mean > margin and min(gains) > 0:
        return "helped"
    if mean < -margin and max(gains) < 0:
        return "hurt"
    return "did not help" if mean <= margin else "did not help consistently"


def results_markdown(result: DigitsExperimentResult) -> str:
    """The results table and the generator-quality table, as markdown."""
    a = result.args
    seeds = ", ".join(str(s.seed) for s in result.seeds)
    lines = [
        f"Held-out accuracy on {result.test_images} real test digits, mean ± std over seeds {seeds} "
        f"({result.train_images} training images; {result.seeds[0].labelled} keep their labels).",
        "",
        "| method | labels | held-out accuracy | per seed | what it is |",
        "|---|---:|---:|---|---|",
    ]
    for key, name, text in _method_texts(a):
        mean, std = result.mean_std(key)
        labels = result.train_images if key == "full" else result.seeds[0].labelled
        per_seed = ", ".join(f"{s.accuracy[key]:.1%}" for s in result.seeds)
        lines.append(f"| {name} | {labels} | {mean:.1%} ± {std:.1%} | {per_seed} | {text} |")
    gains = [s.accuracy["augmented"] - s.accuracy["supervised"] for s in result.seeds]  # paired by seed
    verdict = augmentation_verdict(gains)
    def per_seed(name: str, spec: str) -> str:
        return ", ".join(format(getattr(s.quality, name), spec) for s in result.seeds)

    kept = np.mean([s.pseudo_labels[-1].kept for s in result.seeds])
    right = np.nanmean([s.pseudo_labels[-1].correct for s in result.seeds])
    lines += [
        "",
        f"GAN augmentation {verdict}: {np.mean(gains) * 100:+.1f} points over the supervised baseline "
        f"(per seed {', '.join(f'{g * 100:+.1f}' for g in gains)}). "
        f"Self-training's last round kept {kept:.0f} pseudo-labels, {right:.1%} of them right.",
        "",
        "Generator quality (the GAN trained on the labelled images, judged by the fully supervised "
        f"classifier, {a.quality_per_class} samples per digit):",
        "",
        "| images | judge accuracy | per seed | Fréchet distance to held-out (judge features) | per seed |",
        "|---|---:|---|---:|---|",
        f"| GAN samples | {result.quality_mean('judge_accuracy'):.1%} | {per_seed('judge_accuracy', '.1%')} | "
        f"{result.quality_mean('frechet'):.1f} | {per_seed('frechet', '.1f')} |",
        f"| real training images (reference) | {result.mean_std('full')[0]:.1%} on held-out | | "
        f"{result.quality_mean('frechet_real'):.1f} | {per_seed('frechet_real', '.1f')} |",
        "",
        f"GAN: {a.gan.steps} steps, batch {a.gan.batch_size}, {a.gan.loss} loss; classifiers: "
        f"{a.classifier.steps} steps, batch {a.classifier.batch_size}. Took {result.seconds:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def results_png(result: DigitsExperimentResult) -> bytes:
    """The accuracies as a bar chart (mean, spread over seeds, each seed a dot), PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = _method_texts(result.args)
    fig = Figure(figsize=(7.0, 0.55 * len(methods) + 1.3), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (key, _, _) in enumerate(methods):
        mean, std = result.mean_std(key)
        ax.barh(i, mean, xerr=std, color="#4c72b0" if key != "augmented" else "#dd8452", capsize=3)
        ax.plot([s.accuracy[key] for s in result.seeds], [i] * len(result.seeds), "k.", markersize=4)
        ax.text(min(mean + std, 1.0) + 0.005, i, f"{mean:.1%}", va="center", fontsize=9)
    ax.set_yticks(range(len(methods)), [name for _, name, _ in methods])
    ax.invert_yaxis()
    low = min(min(s.accuracy.values()) for s in result.seeds)
    ax.set_xlim(max(0.0, low - 0.1), 1.06)
    ax.set_xlabel(f"held-out accuracy ({result.test_images} real digits), mean ± std over "
                  f"{len(result.seeds)} seeds")
    ax.set_title(f"digits with {_percent(result.args.label_fraction)} of the labels", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def write_reports(result: DigitsExperimentResult, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    record = {
        "args": dataclasses.asdict(result.args),
        "train_images": result.train_images,
        "test_images": result.test_images,
        "seconds": round(result.seconds, 1),
        "summary": {key: dict(zip(("mean", "std"), result.mean_std(key), strict=True))
                    for key, _, _ in METHODS},
        "seeds": [dataclasses.asdict(s) for s in result.seeds],
    }
    files = [out_dir / "results.md", out_dir / "results.json", out_dir / "results.png"]
    atomic_write_text(files[0], results_markdown(result))
    atomic_write_text(files[1], json.dumps(record, indent=2, default=str) + "\n")
    atomic_write_bytes(files[2], results_png(result))
    return files
