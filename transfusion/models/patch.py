"""Latent patch encoders and decoders: image latents <-> transformer vectors (paper section 3.2).

* Linear: each k x k latent patch -> one D-vector by a linear layer, plus a timestep embedding added
  to every patch; decoded back by a linear layer.
* U-Net: down blocks (ResNet blocks conditioned on the timestep, stride-2 downsampling log2(k) times)
  map the latent to one D-vector per patch; up blocks mirror them, with skip connections from the
  down blocks of the same image, back to the latent resolution. As in the paper, plain normalisation
  replaces AdaLayerNorm; the timestep enters as an added embedding.

Encoders return ``(patches, context)``; decoders take ``(hidden, t, context)``, where ``context`` is
whatever the encoder must pass across the transformer (skip activations, the latent size).

Legend: N images, C latent channels, h x w latent size, k patch size, n = (h/k)(w/k) patches, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def patchify(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, n, C*k*k), patches in raster order."""
    N, C, h, w = x.shape
    x = x.view(N, C, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)  # (N, h/k, w/k, C, k, k)
    return x.reshape(N, (h // k) * (w // k), C * k * k)


def unpatchify(p: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    """(N, n, C*k*k) -> (N, C, h, w); inverse of ``patchify``."""
    N, n, _ = p.shape
    C = p.shape[-1] // (k * k)
    x = p.view(N, h // k, w // k, C, k, k).permute(0, 3, 1, 4, 2, 5)  # (N, C, h/k, k, w/k, k)
    return x.reshape(N, C, h, w)


class TimestepEmbedding(nn.Module):
    """Integer timesteps (N,) -> (N, D): sinusoidal features then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class LinearPatchEncoder(nn.Module):
    def __init__(self, latent_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.k = patch_size
        self.proj = nn.Linear(latent_channels * patch_size**2, dim)
        self.t_embed = TimestepEmbedding(dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor):
        patches = self.proj(patchify(x_t, self.k)) + self.t_embed(t)[:, None]  # (N, n, D)
        return patches, x_t.shape[-2:]


class LinearPatchDecoder(nn.Module):
    zero_init = ("proj",)  # layers that start at zero (``Transfusion.init_weights`` keeps them so)

    def __init__(self, latent_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.k = patch_size
        self.proj = nn.Linear(dim, latent_channels * patch_size**2)
        nn.init.zeros_(self.proj.weight)  # start by predicting zero noise
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
        h, w = context
        return unpatchify(self.proj(hidden), self.k, h, w)  # (N, C, h, w)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added after the second norm."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h) + self.t_proj(t_emb)[:, :, None, None]  # after the norm, which would remove it
        return self.skip(x) + self.conv2(F.silu(h))


def _levels(patch_size: int) -> int:
    levels = int(math.log2(patch_size))
    if 2**levels != patch_size:
        raise ValueError(f"patch_size must be a power of two for the U-Net patch encoder, got {patch_size}")
    return levels


class UNetPatchEncoder(nn.Module):
    """Down blocks: (N, C, h, w) -> (N, n, D) plus the skip activations for the up blocks."""

    def __init__(self, latent_channels: int, patch_size: int, dim: int, channels: int = 64):
        super().__init__()
        self.t_embed = TimestepEmbedding(channels * 4)
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(channels, channels, channels * 4) for _ in range(_levels(patch_size)))
        self.downsample = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in self.down)
        self.mid = ResBlock(channels, channels, channels * 4)
        self.proj = nn.Linear(channels, dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor):
        t_emb = self.t_embed(t)
        h = self.conv_in(x_t)
        skips = [h]
        for block, down in zip(self.down, self.downsample):
            h = down(block(h, t_emb))
            skips.append(h)
        h = self.mid(h, t_emb)  # (N, ch, h/k, w/k)
        return self.proj(h.flatten(2).transpose(1, 2)), skips  # (N, n, D)


class UNetPatchDecoder(nn.Module):
    """Up blocks: (N, n, D) and the encoder's skips -> (N, C, h, w)."""

    zero_init = ("conv_out",)

    def __init__(self, latent_channels: int, patch_size: int, dim: int, channels: int = 64):
        super().__init__()
        self.t_embed = TimestepEmbedding(channels * 4)
        self.proj = nn.Linear(dim, channels)
        self.mid = ResBlock(2 * channels, channels, channels * 4)
        self.up = nn.ModuleList(ResBlock(2 * channels, channels, channels * 4) for _ in range(_levels(patch_size)))
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting zero noise
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, skips) -> torch.Tensor:
        t_emb = self.t_embed(t)
        N, _, gh, gw = skips[-1].shape
        h = self.proj(hidden).transpose(1, 2).reshape(N, self.proj.out_features, gh, gw)  # (N, ch, h/k, w/k)
        h = self.mid(torch.cat([h, skips[-1]], dim=1), t_emb)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skip], dim=1), t_emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C, h, w)


def build_patch_layers(kind: str, latent_channels: int, patch_size: int, dim: int, unet_channels: int = 64):
    """(encoder, decoder) for ``kind`` in {"linear", "unet"}."""
    if kind == "linear":
        return (LinearPatchEncoder(latent_channels, patch_size, dim),
                LinearPatchDecoder(latent_channels, patch_size, dim))
    if kind == "unet":
        return (UNetPatchEncoder(latent_channels, patch_size, dim, unet_channels),
                UNetPatchDecoder(latent_channels, patch_size, dim, unet_channels))
    raise ValueError(f"patch_encoder must be 'linear' or 'unet', got {kind!r}")
