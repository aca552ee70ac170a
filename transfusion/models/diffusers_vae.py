"""Pretrained ``diffusers`` autoencoders as the frozen autoencoders: an ``AutoencoderKL`` (SD 1/2, SDXL, SD3, FLUX
VAEs) for Transfusion, a ``VQModel`` for Chameleon.

A folder is in the diffusers layout: ``config.json`` (``_class_name``) and ``diffusion_pytorch_model.safetensors``.
KL latents are the posterior means (deterministic, as our KL-VAE encodes), normalised as diffusers pipelines do:
``(z - shift_factor) * scaling_factor`` on encoding (SD3, FLUX), or ``(z - latents_mean) * scaling_factor /
latents_std`` per channel where the config gives them (SDXL variants), inverted on decoding. VQ codes are the
indices ``VQModel.quantize`` picks, in raster order; decoding looks them up in its codebook and runs its decoder.
``diffusers`` is imported only when such a folder is loaded.

Shapes: N batch, H, W image height and width, Z latent channels, h, w latent height and width, n = h * w codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transfusion._torchvision_compat import ensure_torchvision_importable

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"


@dataclass
class DiffusersVAEConfig:
    """What the Transfusion and Chameleon models read of a diffusers autoencoder (as of an ``AutoencoderConfig``)."""

    image_size: int = 256
    in_channels: int = 3
    latent_channels: int = 4
    downsample_factor: int = 8  # 2 ** (len(block_out_channels) - 1)
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        if self.image_size <= 0 or self.image_size % self.downsample_factor:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of the diffusers VAE's "
                             f"downsampling factor {self.downsample_factor} (2 ** (len(block_out_channels) - 1))")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor


def is_diffusers_option(option) -> bool:
    """True for an ``autoencoder`` option naming a folder (``PATH`` or ``{path: PATH, ...}``), not a checkpoint."""
    return isinstance(option, dict) and "path" in option or isinstance(option, (str, Path)) and Path(option).is_dir()


def read_config(folder: str | Path, class_name: str) -> dict:
    """The folder's ``config.json``, checked to describe an RGB ``class_name``; errors name the file and field."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: a diffusers {class_name} folder holds {CONFIG} and "
                                f"{WEIGHTS} (as written by {class_name}.save_pretrained; for a pipeline, its vae/; "
                                f"a sharded checkpoint folder: `transfusion consolidate` it)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not JSON: {error}") from error
    name = config.get("_class_name")
    if name != class_name:
        use = {"AutoencoderKL": "Transfusion", "VQModel": "Chameleon"}.get(name)
        hint = f" (a {name} is {use}'s autoencoder)" if use else ""
        raise ValueError(f"{str(path)!r}: _class_name is {name!r}, expected {class_name!r}{hint}")
    for field in ("in_channels", "out_channels"):
        if config.get(field, 3) != 3:
            raise ValueError(f"{str(path)!r}: {field} is {config[field]}, the images are RGB (3)")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{str(folder / WEIGHTS)!r} does not exist (the weights of {str(path)!r})")
    if config.get("shift_factor") and config.get("latents_mean") is not None:
        raise ValueError(f"{str(path)!r}: both shift_factor and latents_mean are set; diffusers pipelines use one")
    return config


def _load(cls_name: str, folder: Path, config: dict) -> nn.Module:
    """The diffusers model of ``folder`` in float32 (whatever the stored dtype), frozen, in eval mode."""
    ensure_torchvision_importable()  # diffusers' model classes import torchvision
    import diffusers  # lazily: only users of such a folder need diffusers

    try:
        model = getattr(diffusers, cls_name).from_pretrained(folder, torch_dtype=torch.float32,
                                                             low_cpu_mem_usage=False)
    except (RuntimeError, ValueError, OSError) as error:  # e.g. latent_channels that the weights do not have
        raise ValueError(f"the weights {str(folder / WEIGHTS)!r} do not fit {str(folder / CONFIG)!r} "
                         f"(latent_channels {config.get('latent_channels')}, block_out_channels "
                         f"{config.get('block_out_channels')}): {error}") from error
    return model.requires_grad_(False).eval()


def _image_size(config: dict, path: Path, image_size: int | None) -> int:
    """``image_size``, or the config's square ``sample_size``."""
    size = image_size or config.get("sample_size", 256)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{str(path)!r}: sample_size {size} is not square; give the image size: "
                             "autoencoder: {path: ..., image_size: N}")
        size = size[0]
    return int(size)


class _DiffusersFolder(nn.Module):
    """What both adapters share: ``config``, ``model`` (the network the generators call: the adapter itself), the
    option that rebuilds it (``hparams``), the image check, and writing the folder back (``save_folder``)."""

    class_name: str

    def __init__(self, vae: nn.Module, config: DiffusersVAEConfig, path: str | None = None):
        super().__init__()
        self.vae, self.config, self.path = vae, config, path

    @classmethod
    def from_folder(cls, folder: str | Path, image_size: int | None = None):
        """Load ``folder``; ``image_size``: the images the model sees (default: the config's ``sample_size``; any
        multiple of the downsampling factor works, the encoders being convolutional)."""
        folder = Path(folder)
        config = read_config(folder, cls.class_name)
        vae = _load(cls.class_name, folder, config)
        settings = DiffusersVAEConfig(
            image_size=_image_size(config, folder / CONFIG, image_size), latent_channels=vae.config.latent_channels,
            downsample_factor=2 ** (len(vae.config.block_out_channels) - 1),
            scaling_factor=float(vae.config.scaling_factor), shift_factor=float(vae.config.get("shift_factor") or 0.0))
        return cls(vae, settings, str(folder)).requires_grad_(False).eval()

    @property
    def model(self) -> _DiffusersFolder:
        """The network (``AutoencoderModule.model``): this module."""
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def hparams(self) -> dict:
        """The ``autoencoder`` option that rebuilds this module."""
        return {"path": self.path, "image_size": self.config.image_size}

    def save_folder(self, folder: str | Path) -> None:
        """Write the model to ``folder`` in the diffusers layout (what ``from_folder`` reads)."""
        self.vae.save_pretrained(folder, safe_serialization=True)

    def _check(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
            raise ValueError(f"expected images of shape (N, 3, {s}, {s}) (the diffusers {self.class_name}'s "
                             f"image_size), got {tuple(x.shape)}")


class DiffusersAutoencoder(_DiffusersFolder):
    """A frozen ``AutoencoderKL`` behind the interface of ``AutoencoderModule``: ``encode_latents`` /
    ``decode_latents``. The normalisation is kept in buffers, so the latent-cache fingerprint (a hash of the state
    dict) covers it."""

    class_name = "AutoencoderKL"

    def __init__(self, vae: nn.Module, config: DiffusersVAEConfig, path: str | None = None):
        super().__init__(vae, config, path)
        z = config.latent_channels
        for field in ("latents_mean", "latents_std"):
            if vae.config.get(field) is not None and len(vae.config[field]) != z:
                raise ValueError(f"{str(Path(path or '.') / CONFIG)!r}: {field} has {len(vae.config[field])} "
                                 f"entries, latent_channels is {z}")
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        mean = torch.tensor(mean, dtype=torch.float32) if mean is not None else torch.full((z,), config.shift_factor)
        std = torch.tensor(std, dtype=torch.float32) if std is not None else torch.ones(z)
        self.register_buffer("scaling_factor", torch.tensor(config.scaling_factor, dtype=torch.float32))
        self.register_buffer("latents_mean", mean.reshape(1, z, 1, 1))
        self.register_buffer("latents_std", std.reshape(1, z, 1, 1))

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> normalised posterior means (N, Z, h, w), float32."""
        self._check(x)
        z = self.vae.encode(x.to(self.dtype)).latent_dist.mean.float()  # (N, Z, h, w)
        return ((z - self.latents_mean) * self.scaling_factor / self.latents_std).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, Z, h, w) -> images (N, 3, H, W) clamped to [-1, 1], float32."""
        z = latents.float() * self.latents_std / self.scaling_factor + self.latents_mean
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)


class DiffusersVQTokenizer(_DiffusersFolder):
    """A frozen ``VQModel`` behind the interface of ``VQAutoencoderModule`` (and of its ``VQAutoencoder``):
    ``encode_codes`` / ``decode_codes`` (codes (N, h * w) in raster order), ``codebook_size``,
    ``patches_per_image``."""

    class_name = "VQModel"

    @property
    def codebook_size(self) -> int:
        return self.vae.quantize.n_e

    @property
    def patches_per_image(self) -> int:
        return self.config.latent_size ** 2

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> codes (N, h * w) in raster order: the entries ``quantize`` picks."""
        self._check(x)
        _, _, (_, _, codes) = self.vae.quantize(self.vae.encode(x.to(self.dtype)).latents)  # codes (N * h * w,)
        return codes.view(x.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, h * w) in raster order -> images (N, 3, H, W) clamped to [-1, 1], float32."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        s = self.config.latent_size
        shape = (codes.shape[0], s, s, self.vae.quantize.vq_embed_dim)  # (N, h, w, D)
        if self.vae.config.lookup_from_codebook:  # its decode looks the codes up itself
            out = self.vae.decode(codes.reshape(-1), force_not_quantize=True, shape=shape)
        else:
            quant = self.vae.quantize.get_codebook_entry(codes.reshape(-1), shape)  # (N, D, h, w)
            out = self.vae.decode(quant, force_not_quantize=True)
        return out.sample.float().clamp(-1, 1)


def load_diffusers_autoencoder(option: str | dict, vq: bool = False) -> DiffusersAutoencoder | DiffusersVQTokenizer:
    """The ``autoencoder`` option ``PATH`` or ``{path: PATH, image_size: N}`` naming a diffusers folder: an
    ``AutoencoderKL`` (``vq``: a ``VQModel``)."""
    cls = DiffusersVQTokenizer if vq else DiffusersAutoencoder
    if isinstance(option, dict):
        unknown = set(option) - {"path", "image_size"}
        if unknown:
            raise ValueError(f"autoencoder option for a diffusers folder takes path and image_size, "
                             f"got {sorted(unknown)}")
        return cls.from_folder(option["path"], option.get("image_size"))
    return cls.from_folder(option)
