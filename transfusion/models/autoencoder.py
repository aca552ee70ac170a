"""KL-regularised convolutional autoencoder (Esser et al. 2021 / LDM ``AutoencoderKL``) for image latents.

Shapes: N batch, C channels, H, W image height and width, h, w latent height and width
(H = h * downsample_factor), Z latent channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

AUTOENCODER_PRESETS: dict[str, dict] = {
    # Tiny: 16x16 -> 4x4x4 in milliseconds, for tests.
    "debug": dict(image_size=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                  attention=True),
    # The embedded shapes data: 32x32 -> 8x8x4, trains in minutes on a CPU.
    "embedded": dict(image_size=32, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                     attention=False),
    # The paper's setting: 256x256 -> 32x32x8 (LDM kl-f8 architecture with 8 latent channels).
    "paper": dict(image_size=256, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=8,
                  attention=True),
}


@dataclass
class AutoencoderConfig:
    """Architecture of a :class:`KLAutoencoder`."""

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32  # 'ch' in LDM
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level per entry; len - 1 downsamplings
    num_res_blocks: int = 1
    latent_channels: int = 4
    attention: bool = False  # one self-attention block in the middle of encoder and decoder

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # YAML gives lists
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "latent_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive integers, got {self.channel_mult}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by the downsample factor "
                f"{self.downsample_factor} (= 2 ** (len(channel_mult) - 1))"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @classmethod
    def from_name(cls, name: str, **overrides) -> AutoencoderConfig:
        """Preset ``name`` from ``AUTOENCODER_PRESETS``, with fields replaced by ``overrides``."""
        if name not in AUTOENCODER_PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; valid names: {sorted(AUTOENCODER_PRESETS)}")
        return cls(**{**AUTOENCODER_PRESETS[name], **overrides})


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from the encoder's (N, 2Z, h, w) output."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)  # (N, Z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample, (N, Z, h, w)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over latent elements, (N,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (32 groups for the paper's widths)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) layers with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (N, h*w, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h*w, C)
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour interpolation then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, attention: bool) -> nn.Sequential:
    """ResnetBlock, optional attention, ResnetBlock at the lowest resolution."""
    layers = [ResnetBlock(channels, channels)]
    if attention:
        layers.append(AttentionBlock(channels))
    layers.append(ResnetBlock(channels, channels))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image (N, C, H, W) -> posterior parameters (N, 2Z, h, w)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        layers, channels = [], config.base_channels
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResnetBlock(channels, width))
                channels = width
            if level < len(widths) - 1:
                layers.append(Downsample(channels))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(channels, config.attention)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (N, C', h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2Z, h, w)


class Decoder(nn.Module):
    """Latent (N, Z, h, w) -> image (N, C, H, W); one more ResnetBlock per level than the encoder, as in LDM."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        channels = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels, 3, padding=1)
        self.mid = _middle(channels, config.attention)
        layers = []
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResnetBlock(channels, widths[level]))
                channels = widths[level]
            if level > 0:
                layers.append(Upsample(channels))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (N, C', H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C, H, W)


def check_images(config: AutoencoderConfig, x: torch.Tensor) -> None:
    """Raise a clear error unless x is a batch of images of the configured size."""
    size = config.image_size
    if x.ndim != 4 or x.shape[1] != config.in_channels or x.shape[-2:] != (size, size):
        raise ValueError(
            f"expected images of shape (N, {config.in_channels}, {size}, {size}) "
            f"(config image_size={size}), got {tuple(x.shape)}"
        )


class KLAutoencoder(nn.Module):
    """Encoder -> diagonal Gaussian posterior -> decoder.

    ``latent_std`` (a running std of posterior means, kept by training) scales latents to about unit variance:
    ``encode_latents`` / ``decode_latents`` are what the diffusion model sees and what it hands back.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("latent_std_initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update_latent_std(self, means: torch.Tensor, decay: float = 0.99) -> None:
        """Move ``latent_std`` towards the std of a batch of posterior means (EMA; the first batch sets it)."""
        std = means.detach().float().std()
        if not self.latent_std_initialised:
            self.latent_std.copy_(std)
            self.latent_std_initialised.fill_(True)
        else:
            self.latent_std.lerp_(std, 1 - decay)

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled posterior means (N, Z, h, w), about unit variance."""
        return self.encode(x.to(self.latent_std.dtype)).mode() / self.latent_std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, Z, h, w) -> images (N, C, H, W) clamped to [-1, 1]."""
        return self.decode(latents * self.latent_std).clamp(-1, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior over latents (N, Z, h, w) for images x (N, C, H, W) in [-1, 1]."""
        check_images(self.config, x)
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) from latents (N, Z, h, w); not clamped."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (N, Z, h, w)
        return self.decode(z), posterior
