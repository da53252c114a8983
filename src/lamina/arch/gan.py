"""A conditional DCGAN for small images (scikit-learn's 8x8 handwritten digits), readable top to bottom.

GANConfig -> Generator -> Discriminator -> DCGAN weight initialisation. The design is DCGAN's (Radford et
al., 2016) scaled down to 8x8: no pooling and no fully connected hidden layers, strided (transposed)
convolutions do the resampling, BatchNorm and ReLU in the generator, LeakyReLU(0.2) in the discriminator,
tanh on the generator's output, weights drawn from N(0, 0.02).

Where it departs from DCGAN, and why:
- DCGAN projects the noise to 4x4 and upsamples four times to 64x64; an 8x8 image needs a 2x2 start and
  two upsamplings (in general log2(image_size) - 1), with the widths halving as the side doubles.
- A last 3x3 convolution maps to the image channels, so the final upsampling keeps a few features per pixel
  instead of producing pixels from a 4x4 transposed kernel directly (fewer checkerboard artefacts).
- The label conditions both networks (Mirza and Osindero, 2014). The generator concatenates a learned label
  embedding with the noise. The discriminator either adds a projection term `<embed(y), h>` to its logit
  (Miyato and Koyama, 2018; the default, and the stronger one) or reads the label as one-hot image planes
  concatenated to its input.
- Spectral normalisation (Miyato et al., 2018) on every discriminator layer stabilises training on a
  dataset this small; it replaces DCGAN's BatchNorm in the discriminator. Without it the discriminator
  uses BatchNorm after every convolution but the first, as DCGAN does.

Images are (B, channels, image_size, image_size) tensors in [-1, 1]; labels are (B,) class indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lamina.arch.config import ConfigIO
from lamina.errors import ConfigError


@dataclass
class GANConfig(ConfigIO):
    latent_dim: int = 32  # noise dimensions
    n_classes: int = 10
    image_size: int = 8  # side of the square images, a power of two >= 4
    channels: int = 1  # image channels (1: grey)
    g_channels: int = 32  # generator width at full resolution; doubles each time the side halves
    d_channels: int = 32  # discriminator width at full resolution; doubles each time the side halves
    embed_dim: int = 16  # the generator's label embedding, concatenated with the noise
    conditioning: Literal["projection", "concat"] = "projection"  # how the discriminator reads the label
    spectral_norm: bool = True  # on every discriminator layer (instead of BatchNorm there)
    leaky_slope: float = 0.2
    init_std: float = 0.02
    family: Literal["gan"] = field(default="gan")

    def __post_init__(self) -> None:
        for name in ("latent_dim", "n_classes", "channels", "g_channels", "d_channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2 for a conditional GAN (got {self.n_classes})")
        if self.image_size < 4 or self.image_size & (self.image_size - 1):
            raise ConfigError(f"image_size must be a power of two >= 4, e.g. 8 or 16 (got {self.image_size})")
        if self.conditioning not in ("projection", "concat"):
            raise ConfigError(f"conditioning must be 'projection' or 'concat' (got {self.conditioning!r})")
        if not 0.0 <= self.leaky_slope < 1.0:
            raise ConfigError(f"leaky_slope must be in [0, 1) (got {self.leaky_slope})")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be > 0 (got {self.init_std})")
        if self.family != "gan":
            raise ConfigError(f"family must be 'gan' for a GANConfig (got {self.family!r})")

    @property
    def n_resamples(self) -> int:
        """Stride-2 layers between a 2x2 map and the full image: 2 for 8x8."""
        return int(math.log2(self.image_size)) - 1


class Generator(nn.Module):
    """(noise (B, latent_dim), labels (B,)) -> images (B, channels, S, S) in [-1, 1]."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        width = config.g_channels * 2 ** config.n_resamples  # at 2x2: 128 for the defaults
        self.embed = nn.Embedding(config.n_classes, config.embed_dim)
        self.project = nn.Linear(config.latent_dim + config.embed_dim, width * 2 * 2, bias=False)
        self.project_norm = nn.BatchNorm2d(width)
        ups: list[nn.Module] = []
        for _ in range(config.n_resamples):  # each doubles the side and halves the width: 2 -> 4 -> 8
            ups += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(width // 2), nn.ReLU()]
            width //= 2
        self.up = nn.Sequential(*ups)
        self.to_image = nn.Conv2d(width, config.channels, 3, padding=1)
        init_dcgan(self, config.init_std)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(labels)], dim=1))  # (B, width*4)
        h = F.relu(self.project_norm(h.view(z.shape[0], -1, 2, 2)))  # (B, width, 2, 2)
        return torch.tanh(self.to_image(self.up(h)))  # (B, channels, S, S)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Discriminator(nn.Module):
    """(images (B, channels, S, S), labels (B,)) -> logits (B,): high for real (image, label) pairs."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        extra = config.n_classes if config.conditioning == "concat" else 0  # one-hot label planes
        width = config.d_channels
        layers: list[nn.Module] = [nn.Conv2d(config.channels + extra, width, 3, padding=1),
                                   nn.LeakyReLU(config.leaky_slope)]
        for _ in range(config.n_resamples):  # each halves the side and doubles the width: 8 -> 4 -> 2
            layers.append(nn.Conv2d(width, width * 2, 4, stride=2, padding=1))
            if not config.spectral_norm:
                layers.append(nn.BatchNorm2d(width * 2))
            layers.append(nn.LeakyReLU(config.leaky_slope))
            width *= 2
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * 2 * 2
        self.out = nn.Linear(self.feature_dim, 1)
        projection = config.conditioning == "projection"
        self.embed = nn.Embedding(config.n_classes, self.feature_dim) if projection else None
        init_dcgan(self, config.init_std)
        if self.embed is not None:  # a projection, like `out`: small at the start, as DCGAN's weights are
            nn.init.normal_(self.embed.weight, 0.0, config.init_std)
        if config.spectral_norm:  # after initialisation, so the parametrisation wraps the initialised weights
            for module in list(self.modules()):
                if isinstance(module, nn.Conv2d | nn.Linear | nn.Embedding):
                    spectral_norm(module)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images
        if self.config.conditioning == "concat":
            planes = F.one_hot(labels, self.config.n_classes).to(x.dtype)[:, :, None, None]  # (B, C, 1, 1)
            x = torch.cat([x, planes.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        h = self.features(x).flatten(1)  # (B, feature_dim)
        logits = self.out(h).squeeze(1)  # (B,)
        if self.embed is not None:
            logits = logits + (self.embed(labels) * h).sum(dim=1)
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_dcgan(module: nn.Module, std: float = 0.02) -> None:
    """DCGAN's initialisation: (transposed) convolution and linear weights N(0, std), BatchNorm scales
    N(1, std), biases zero. Label embeddings keep PyTorch's N(0, 1), the scale of the noise they join."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
