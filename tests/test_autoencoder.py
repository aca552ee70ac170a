"""Tests for the KL autoencoder, its Lightning module and the image data module."""

from types import SimpleNamespace

import pytest
import torch

from transfusion.data.modules.image import ImageDataModule
from transfusion.lightning.autoencoder import AutoencoderModule
from transfusion.models.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderConfig,
    DiagonalGaussian,
    KLAutoencoder,
)

# _common_step is called outside a Trainer here, where self.log only warns.
pytestmark = [pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"), pytest.mark.usefixtures("one_thread")]


def test_debug_encode_decode_shapes():
    config = AutoencoderConfig.from_name("debug")
    model = KLAutoencoder(config)
    x = torch.rand(2, 3, config.image_size, config.image_size) * 2 - 1
    posterior = model.encode(x)
    latent_shape = (2, config.latent_channels, config.latent_size, config.latent_size)
    assert posterior.mean.shape == posterior.logvar.shape == latent_shape
    assert posterior.sample().shape == latent_shape
    assert model.decode(posterior.sample()).shape == x.shape
    recon, _ = model(x, sample_posterior=False)
    assert recon.shape == x.shape


def test_preset_arithmetic():
    embedded = AutoencoderConfig.from_name("embedded")
    assert (embedded.image_size, embedded.downsample_factor, embedded.latent_size, embedded.latent_channels) == (
        32, 4, 8, 4)
    paper = AutoencoderConfig.from_name("paper")
    assert (paper.image_size, paper.downsample_factor, paper.latent_size, paper.latent_channels) == (256, 8, 32, 8)
    with torch.device("meta"):
        model = KLAutoencoder(paper)
        posterior = model.encode(torch.empty(1, 3, 256, 256))
    assert posterior.mean.shape == (1, 8, 32, 32)
    assert 60e6 < sum(p.numel() for p in model.parameters()) < 100e6


def test_from_name_overrides_and_unknown_name():
    config = AutoencoderConfig.from_name("embedded", image_size=64, latent_channels=8)
    assert (config.latent_size, config.latent_channels) == (16, 8)
    with pytest.raises(ValueError, match="debug"):
        AutoencoderConfig.from_name("nope")
    assert set(AUTOENCODER_PRESETS) >= {"debug", "embedded", "paper"}


def test_invalid_config_names_field():
    with pytest.raises(ValueError, match="image_size"):
        AutoencoderConfig(image_size=30, channel_mult=(1, 2, 2))  # factor 4
    with pytest.raises(ValueError, match="latent_channels"):
        AutoencoderConfig(latent_channels=0)


def test_wrong_input_size_raises():
    model = KLAutoencoder(AutoencoderConfig.from_name("debug"))
    with pytest.raises(ValueError, match="image_size"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_kl_zero_for_standard_normal_and_positive_otherwise():
    standard = DiagonalGaussian(torch.zeros(3, 8, 4, 4))  # mean 0, logvar 0
    assert torch.allclose(standard.kl(), torch.zeros(3))
    shifted = DiagonalGaussian(torch.cat([torch.full((3, 4, 4, 4), 0.5), torch.zeros(3, 4, 4, 4)], dim=1))
    assert torch.allclose(shifted.kl(), torch.full((3,), 0.5 * 0.25 * 64))
    narrow = DiagonalGaussian(torch.cat([torch.zeros(3, 4, 4, 4), torch.full((3, 4, 4, 4), -2.0)], dim=1))
    assert (narrow.kl() > 0).all()


def test_sample_uses_generator():
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mean)


def test_debug_overfits_one_batch():
    torch.manual_seed(0)
    module = AutoencoderModule(preset="debug")
    batch = next(iter(_debug_data().train_dataloader()))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, betas=(0.9, 0.99))

    def rec_loss():
        with torch.no_grad():
            recon, _ = module.model(batch["image"], sample_posterior=False)
            return torch.nn.functional.l1_loss(recon, batch["image"]).item()

    before = rec_loss()
    for _ in range(30):
        optimizer.zero_grad()
        module._common_step(batch, "train").backward()
        optimizer.step()
    assert rec_loss() < 0.25 * before


def test_latent_std_buffer_updates_and_is_saved():
    module = AutoencoderModule(preset="debug")
    batch = next(iter(_debug_data().train_dataloader()))
    module._common_step(batch, "train")
    first = module.model.latent_std.item()
    expected = module.model.encode(batch["image"]).mean.std().item()
    assert first == pytest.approx(expected, rel=1e-4) and first != 1.0
    module._common_step({"image": batch["image"] * 0.5}, "train")
    assert module.model.latent_std.item() != first  # EMA moves
    state = module.state_dict()
    assert "model.latent_std" in state and state["model.latent_std"].item() == module.model.latent_std.item()
    restored = AutoencoderModule(preset="debug")
    restored.load_state_dict(state)
    assert restored.model.latent_std.item() == module.model.latent_std.item()
    latents = restored.encode_latents(batch["image"])
    assert latents.shape == (8, 4, 4, 4)
    images = restored.decode_latents(latents)
    assert images.shape == batch["image"].shape and images.abs().max() <= 1


def test_image_datamodule_batches_and_optimizer():
    data = _debug_data()
    batch = next(iter(data.train_dataloader()))
    assert list(batch) == ["image"] and batch["image"].shape == (8, 3, 16, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert torch.equal(next(iter(data.train_dataloader()))["image"], batch["image"])  # seeded shuffle
    module = AutoencoderModule(preset="debug", warmup_steps=10)
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(module.hparams.lr / 10)
    images = module.log_images(batch)
    assert images["inputs"].shape == images["reconstructions"].shape == (8, 3, 16, 16)
    # cosine decay over a run's steps down to lr * min_lr_ratio at the last one
    module = AutoencoderModule(preset="debug", warmup_steps=0, min_lr_ratio=0.05, lr=1e-3)
    module.trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = module.configure_optimizers()
    lrs = []
    for _ in range(101):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert lrs[100] == pytest.approx(5e-5) and all(a >= b for a, b in zip(lrs, lrs[1:]))


def _debug_data() -> ImageDataModule:
    data = ImageDataModule(image_size=16, num_train=32, num_val=8, batch_size=8)
    data.setup("fit")
    return data
