"""The conditional DCGAN and the digit classifier: shapes, conditioning, initialisation, config checks."""

from __future__ import annotations

import pytest
import torch

from lamina.arch.digits import DigitClassifier, DigitClassifierConfig
from lamina.arch.gan import Discriminator, GANConfig, Generator
from lamina.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("image_size", [4, 8, 16])
@pytest.mark.parametrize(("conditioning", "spectral"), [("projection", True), ("concat", False)])
def test_generator_and_discriminator_shapes(image_size: int, conditioning: str, spectral: bool) -> None:
    config = GANConfig(image_size=image_size, conditioning=conditioning,  # type: ignore[arg-type]
                       spectral_norm=spectral, g_channels=8, d_channels=8)
    torch.manual_seed(0)
    G, D = Generator(config), Discriminator(config)
    z, labels = torch.randn(5, config.latent_dim), torch.arange(5)
    images = G(z, labels)
    assert images.shape == (5, 1, image_size, image_size)
    assert images.abs().max() <= 1.0  # tanh: the data's [-1, 1] scale
    assert D(images, labels).shape == (5,)


def test_the_label_conditions_both_networks() -> None:
    torch.manual_seed(0)
    for conditioning in ("projection", "concat"):
        config = GANConfig(conditioning=conditioning)  # type: ignore[arg-type]
        G, D = Generator(config).eval(), Discriminator(config).eval()
        z = torch.randn(1, config.latent_dim).expand(10, -1)  # one noise vector, ten labels
        images = G(z, torch.arange(10))
        assert (images[0] - images[3]).abs().max() > 1e-4
        same_image = images[:1].expand(10, -1, -1, -1)
        logits = D(same_image, torch.arange(10))
        assert logits.std() > 1e-6, conditioning


def test_dcgan_initialisation() -> None:
    torch.manual_seed(0)
    config = GANConfig(spectral_norm=False)
    G, D = Generator(config), Discriminator(config)
    for module in (*G.up, *D.features):
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            assert module.weight.std().item() == pytest.approx(config.init_std, rel=0.1)
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.bias.abs().max() == 0
    assert G.embed.weight.std().item() == pytest.approx(1.0, rel=0.2)  # the noise's scale, PyTorch's default


def test_spectral_norm_bounds_the_discriminators_layers() -> None:
    torch.manual_seed(0)
    D = Discriminator(GANConfig())
    x, labels = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    for _ in range(5):  # each training-mode forward runs one more power iteration
        D(x, labels)
    convs = [m for m in D.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3
    for conv in convs:
        w = conv.weight.detach().flatten(1).double()
        sigma = torch.linalg.eigvalsh(w @ w.T).max().sqrt()  # the largest singular value, faster than an SVD
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"image_size": 6}, "power of two"),
        ({"image_size": 2}, "power of two"),
        ({"n_classes": 1}, "n_classes"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"conditioning": "film"}, "conditioning"),
        ({"leaky_slope": 1.0}, "leaky_slope"),
    ],
)
def test_gan_config_rejects_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        GANConfig(**kwargs)


def test_gan_config_round_trips_through_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = GANConfig(latent_dim=16, conditioning="concat", spectral_norm=False)
    path = tmp_path / "gan.yaml"
    path.write_text(config.to_yaml())
    assert GANConfig.from_yaml(path) == config
    assert config.n_resamples == 2
    with pytest.raises(ConfigError):
        GANConfig.from_dict({**config.to_dict(), "depth": 3})


def test_digit_classifier_shapes_and_features() -> None:
    config = DigitClassifierConfig(feature_dim=48)
    model = DigitClassifier(config).eval()
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    assert model(images).shape == (4, 10)
    features = model.features(images)
    assert features.shape == (4, 48)
    assert features.min() >= 0  # after the ReLU
    torch.testing.assert_close(model.head(features), model(images))  # eval: dropout is off
    with pytest.raises(ConfigError, match="even"):
        DigitClassifierConfig(image_size=7)
    with pytest.raises(ConfigError, match="dropout"):
        DigitClassifierConfig(dropout=1.0)
