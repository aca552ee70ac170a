"""Vector-quantised autoencoder (VQ-VAE) for the Chameleon baseline: images as h*w discrete codes.

The KL-VAE's CNN encoder and decoder (``transfusion.models.autoencoder``) with, between them, a 1x1
projection of the encoder output to Z channels and a codebook of K entries of width Z (the paper: the
codebook of 16,384 entries is applied after the 8-dim projection). Each latent pixel is replaced by its
nearest entry; gradients pass the quantisation unchanged (straight-through estimator).

Loss = ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2 (codebook + commitment, beta = 0.25, weight 1).
Dead codes: an EMA of how often each entry is chosen; entries whose EMA falls below a threshold are
re-initialised to encoder outputs of the current batch (usage starts at zero, so after the first training
step every entry that batch did not choose is initialised from data). With torch.distributed, counts are summed over processes and
the re-initialised entries come from rank 0, so every replica keeps the same codebook.

Legend: N images, Z latent channels, h x w latent size, K codebook size, M = N*h*w latent vectors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from transfusion.models.autoencoder import AutoencoderConfig, Decoder, Encoder, check_images


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with straight-through gradients and dead-code re-initialisation."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, usage_decay: float = 0.99,
                 dead_code_threshold: float = 0.01):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if not 0.0 <= usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.usage_decay, self.dead_code_threshold = usage_decay, dead_code_threshold
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("usage", torch.zeros(codebook_size))  # EMA of assignments per entry and batch
        self.register_buffer("codes_reset", torch.zeros((), dtype=torch.long))  # total re-initialised so far

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (N, h, w) of the nearest entries to latents z (N, Z, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()  # (M, Z)
        e = self.codebook.weight.float()  # (K, Z)
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)  # (M, K)
        return dist2.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Entries (N, Z, h, w) for indices (N, h, w)."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return self.codebook(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Straight-through quantised z (N, Z, h, w), codes (N, h, w) and loss/usage statistics."""
        codes = self.quantize(z)
        z_q = self.lookup(codes).to(z.dtype)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()  # (K,)
        if self.training:
            if _distributed():
                dist.all_reduce(counts)
            self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        probs = counts / counts.sum().clamp_min(1)
        stats = {
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "commitment_loss": commitment_loss.detach(),
            "perplexity": torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()),  # effective codes in use
            "usage": (counts > 0).float().mean(),  # share of the codebook used by this batch
        }
        return z + (z_q - z).detach(), codes, stats

    @torch.no_grad()
    def reset_dead_codes(self, z: torch.Tensor) -> int:
        """Re-initialise entries whose usage EMA is below the threshold to random latents of z (N, Z, h, w).

        Returns the number of entries re-initialised; they get a usage of 1 (a grace period).
        """
        dead = self.usage < self.dead_code_threshold
        n = int(dead.sum())
        if n == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()  # (M, Z)
        pick = torch.randint(flat.shape[0], (n,), device=flat.device)
        new = flat[pick] + 1e-3 * flat.std() * torch.randn(n, self.dim, device=flat.device)  # duplicates differ
        if _distributed():
            dist.broadcast(new, src=0)
        self.codebook.weight[dead] = new.to(self.codebook.weight.dtype)
        self.usage[dead] = 1.0
        self.codes_reset += n
        return n


class VQAutoencoder(nn.Module):
    """Encoder -> 1x1 projection to Z -> vector quantizer -> decoder."""

    def __init__(self, config: AutoencoderConfig, codebook_size: int = 16_384, beta: float = 0.25,
                 usage_decay: float = 0.99, dead_code_threshold: float = 0.01):
        super().__init__()
        self.config = config
        Z = config.latent_channels
        self.encoder = Encoder(config)  # (N, 2Z, h, w): the KL-VAE's encoder as it is
        self.quant_proj = nn.Conv2d(2 * Z, Z, 1)
        self.quantizer = VectorQuantizer(codebook_size, Z, beta, usage_decay, dead_code_threshold)
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents z_e (N, Z, h, w) for images (N, C, H, W) in [-1, 1]."""
        check_images(self.config, x)
        return self.quant_proj(self.encoder(x))

    @property
    def patches_per_image(self) -> int:
        """Codes per image (h * w): the positions of an image in a Chameleon sequence."""
        return self.config.latent_size ** 2

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> codes (N, h * w) in raster order."""
        return self.quantizer.quantize(self.encode(x.to(self.quant_proj.weight.dtype))).flatten(1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, h * w) in raster order -> images (N, C, H, W) clamped to [-1, 1]."""
        s = self.config.latent_size
        return self.decoder(self.quantizer.lookup(codes.view(-1, s, s))).clamp(-1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction (N, C, H, W), z_e (N, Z, h, w), codes (N, h, w) and the quantizer's statistics."""
        z_e = self.encode(x)
        z_q, codes, stats = self.quantizer(z_e)
        return self.decoder(z_q), z_e, codes, stats
