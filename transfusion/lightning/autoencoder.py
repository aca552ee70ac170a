"""LightningModule training a :class:`KLAutoencoder` with an L1 reconstruction loss plus a small KL penalty."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from transfusion.lightning.checkpoint import check_config, flatten_config
from transfusion.lightning.seeding import step_generator
from transfusion.models.autoencoder import AutoencoderConfig, KLAutoencoder


class AutoencoderModule(L.LightningModule):
    """Trains the KL-VAE and keeps a running latent std so ``encode_latents`` gives roughly unit-variance latents."""

    def __init__(
        self,
        preset: str = "embedded",
        image_size: int | None = None,
        latent_channels: int | None = None,
        kl_weight: float = 1e-6,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        noise_seed: int = 0,
    ):
        """``noise_seed``: posterior samples of a training step are drawn from a generator seeded by
        (noise_seed, step, batch, rank), so a resumed run draws what an uninterrupted one would."""
        super().__init__()
        for name, value in (("lr", lr), ("kl_weight", kl_weight), ("weight_decay", weight_decay), ("warmup_steps", warmup_steps)):
            if value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"model option {name} must be {'> 0' if name == 'lr' else '>= 0'}, got {value}")
        overrides = {k: v for k, v in dict(image_size=image_size, latent_channels=latent_channels).items() if v is not None}
        self.config = AutoencoderConfig.from_name(preset, **overrides)
        image_size = self.config.image_size  # recorded resolved: Lightning checks the data module's image_size agrees
        self.save_hyperparameters()
        self.autoencoder = KLAutoencoder(self.config)
        # Std of posterior means (EMA); checkpointed so latents are scaled the same way at generation time.
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("latent_std_initialised", torch.zeros((), dtype=torch.bool))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autoencoder_config"] = flatten_config(self.config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "autoencoder_config" in checkpoint:
            check_config(checkpoint["autoencoder_config"], self.config, "this autoencoder checkpoint")

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> scaled posterior means (N, Z, h, w)."""
        return self.autoencoder.encode(images).mode() / self.latent_std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, Z, h, w) -> images (N, 3, H, W) clamped to [-1, 1]."""
        return self.autoencoder.decode(latents * self.latent_std).clamp(-1, 1)

    @torch.no_grad()
    def _update_latent_std(self, means: torch.Tensor):
        std = means.detach().float().std()
        if not self.latent_std_initialised:
            self.latent_std.copy_(std)
            self.latent_std_initialised.fill_(True)
        else:
            self.latent_std.lerp_(std, 0.01)  # EMA with decay 0.99

    def _common_step(self, batch, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        x = batch["image"] if isinstance(batch, dict) else batch  # (N, 3, H, W)
        training = stage == "train"
        recon, posterior = self.autoencoder(x, sample_posterior=training, generator=generator)  # validation: the mode
        rec_loss = F.l1_loss(recon, x)
        kl = posterior.kl().mean()
        loss = rec_loss + self.hparams.kl_weight * kl
        if training:
            self._update_latent_std(posterior.mean)
            self.log("latent_std", self.latent_std)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/rec_loss", rec_loss)
        self.log(f"{stage}/kl", kl)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train", step_generator(self, batch_idx, self.hparams.noise_seed))

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        """Inputs and deterministic reconstructions, both (N, 3, H, W) in [-1, 1], for image-logging callbacks."""
        x = (batch["image"] if isinstance(batch, dict) else batch).to(self.device)
        recon, _ = self.autoencoder(x, sample_posterior=False)
        return {"inputs": x, "reconstructions": recon.clamp(-1, 1)}
