"""A small convolutional classifier for scikit-learn's 8x8 handwritten digits.

It is the measuring stick of the digits experiment (`lamina.foundation.experiments`): trained on few or many
labels it gives the accuracies the experiment compares, and trained on all real training images it judges
a GAN's samples, by its accuracy on them and by the Fréchet distance between its penultimate-layer features
of real and generated images (the FID recipe, with this network in place of Inception).

Two 3x3 convolutions and one 2x2 max-pool (8x8 -> 4x4), then a fully connected feature layer and the class
logits: small enough to train in a second on two CPU cores, and over 97 % accurate with all labels.
Images are (B, channels, S, S) tensors in [-1, 1], as the GAN produces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.config import ConfigIO
from lamina.errors import ConfigError


@dataclass
class DigitClassifierConfig(ConfigIO):
    n_classes: int = 10
    image_size: int = 8  # an even side: one 2x2 max-pool halves it
    channels: int = 1
    width: int = 32  # channels of the first convolution; the second has twice as many
    feature_dim: int = 64  # the penultimate layer, whose activations the Fréchet distance compares
    dropout: float = 0.25
    family: Literal["digit-classifier"] = field(default="digit-classifier")

    def __post_init__(self) -> None:
        for name in ("n_classes", "image_size", "channels", "width", "feature_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.image_size % 2:
            raise ConfigError(f"image_size must be even, e.g. 8 (got {self.image_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.family != "digit-classifier":
            raise ConfigError(f"family must be 'digit-classifier' for a DigitClassifierConfig "
                              f"(got {self.family!r})")


class DigitClassifier(nn.Module):
    """images (B, channels, S, S) -> logits (B, n_classes); `features` gives the penultimate layer."""

    def __init__(self, config: DigitClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(config.channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w * (config.image_size // 2) ** 2, config.feature_dim)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(images))  # (B, w, S, S)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 2w, S/2, S/2)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(images)))  # (B, n_classes)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
