"""LightningModule for Transfusion: a frozen autoencoder in front of the Transfusion model."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch

from transfusion.data.latent_cache import autoencoder_fingerprint
from transfusion.data.sequences import SequenceLayout
from transfusion.data.tokenizer import Tokenizer
from transfusion.flops import FlopAccounting, FlopCounter, flop_parameters
from transfusion.generation import Generator, SamplingOptions
from transfusion.lightning.autoencoder import AutoencoderModule, load_frozen
from transfusion.lightning.checkpoint import check_config, flatten_config
from transfusion.lightning.optim import adamw_cosine
from transfusion.lightning.seeding import step_generator
from transfusion.models.transfusion import Transfusion, TransfusionConfig
from transfusion.models.transformer import TransformerConfig


# the frozen autoencoder stays in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


# TransfusionConfig fields that define the weights; the others (lambda, masks, attention kernel) may change
ARCHITECTURE = ("transformer", "vocab_size", "latent_channels", "latent_size", "patch_size", "patch_encoder",
                "unet_channels", "num_timesteps")


def check_options(hp) -> SamplingOptions:
    """Raise a ValueError naming the first invalid optimisation or generation option; the sampling options."""
    if hp.lr <= 0:
        raise ValueError(f"model option lr must be > 0, got {hp.lr}")
    if len(hp.betas) != 2 or not all(0.0 <= b < 1.0 for b in hp.betas):
        raise ValueError(f"model option betas must be two numbers in [0, 1), got {list(hp.betas)}")
    for name in ("eps", "weight_decay", "warmup_steps"):
        if hp[name] < 0:
            raise ValueError(f"model option {name} must be >= 0, got {hp[name]}")
    if not 0.0 <= hp.min_lr_ratio <= 1.0:
        raise ValueError(f"model option min_lr_ratio must be in [0, 1], got {hp.min_lr_ratio}")
    if hp.diffusion_lambda < 0:  # also checked by TransfusionConfig, but only after the autoencoder is loaded
        raise ValueError(f"model option diffusion_lambda must be >= 0, got {hp.diffusion_lambda}")
    if hp.patch_size <= 0:
        raise ValueError(f"model option patch_size must be positive, got {hp.patch_size}")
    TransformerConfig.from_name(hp.preset, **(hp.transformer or {}))  # unknown preset, heads vs width, ...
    try:
        return SamplingOptions(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p,
                               cfg_scale=hp.cfg_scale, num_steps=hp.num_inference_steps, sampler=hp.sampler,
                               clip_x0=hp.clip_x0)
    except ValueError as error:
        raise ValueError(f"model option {str(error).replace('num_steps', 'num_inference_steps')}") from None


class TransfusionModule(FlopAccounting, L.LightningModule):
    def __init__(self, tokenizer: str, autoencoder: str | dict, preset: str = "debug", patch_size: int = 2,
                 patch_encoder: str = "linear", unet_channels: int = 64, diffusion_lambda: float = 5.0,
                 bidirectional_images: bool = True, attention: str = "auto", transformer: dict | None = None,
                 lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, warmup_steps: int = 4000, min_lr_ratio: float = 0.05,
                 cfg_scale: float = 5.0, num_inference_steps: int = 250, sampler: str = "ddpm",
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, clip_x0: float | None = 5.0,
                 generation_seed: int = 0, noise_seed: int = 0):
        """
        Args:
            tokenizer: path of the SentencePiece model (``transfusion tokenizer`` trains one).
            autoencoder: path of a trained ``AutoencoderModule`` checkpoint; kept frozen. (A dict of
                ``AutoencoderModule`` arguments builds an untrained one, for weights loaded afterwards:
                ``transfusion.export.load_exported``.)
            preset: transformer size (``TRANSFORMER_PRESETS``: debug, cpu-small, cpu-base, 0.16B ... 7B).
            transformer: overrides of the preset's ``TransformerConfig`` fields, e.g. ``{n_layers: 6}``.
            patch_encoder: "linear" (with timestep embedding) or "unet" (down/up blocks).
            diffusion_lambda: weight of the DDPM loss (paper: 5).
            bidirectional_images: attention inside an image is bidirectional (paper) or causal (ablation).
            min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio`` (paper: 3e-4 -> 1.5e-5).
            cfg_scale, num_inference_steps, sampler, max_new_tokens, temperature, top_p, clip_x0: generation settings
                for ``predict`` (``transfusion.generation.SamplingOptions``); prompt i uses seed generation_seed + i.
            noise_seed: the training noise and timesteps of a step are drawn from a generator seeded by
                (noise_seed, global step, batch index, rank): a resumed run draws what an uninterrupted one would.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sampling = check_options(self.hparams)  # before any file is read
        self.tokenizer = Tokenizer(tokenizer)
        if isinstance(autoencoder, dict):
            self.autoencoder = AutoencoderModule(**autoencoder)
        elif not Path(autoencoder).is_file():
            raise FileNotFoundError(f"autoencoder checkpoint {autoencoder!r} does not exist; train one with "
                                    "`transfusion fit --config lightning_configs/autoencoder_embedded.yaml`")
        else:
            self.autoencoder = load_frozen(AutoencoderModule, autoencoder)
        self.autoencoder.requires_grad_(False).eval()
        ae_cfg = self.autoencoder.autoencoder.config
        self.config = TransfusionConfig(
            transformer=TransformerConfig.from_name(preset, **(transformer or {})),
            vocab_size=self.tokenizer.vocab_size, latent_channels=ae_cfg.latent_channels,
            latent_size=ae_cfg.latent_size, patch_size=patch_size, patch_encoder=patch_encoder,
            unet_channels=unet_channels, diffusion_lambda=diffusion_lambda,
            bidirectional_images=bidirectional_images, attention=attention,
        )
        self.model = Transfusion(self.config)
        self.flop_counter = FlopCounter(flop_parameters(self.model), self.config.transformer.n_layers,
                                        self.config.transformer.dim)  # N: body + patch layers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # FlopAccounting
        checkpoint["transfusion_config"] = flatten_config(self.config)
        checkpoint["autoencoder_config"] = flatten_config(self.autoencoder.config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another architecture: a clear error naming the fields, not a shape mismatch."""
        if "transfusion_config" in checkpoint:
            check_config(checkpoint["transfusion_config"], self.config, "this Transfusion checkpoint", ARCHITECTURE)
        if "autoencoder_config" in checkpoint:
            check_config(checkpoint["autoencoder_config"], self.autoencoder.config, "the autoencoder in this checkpoint")
        super().on_load_checkpoint(checkpoint)  # FlopAccounting
        self.trained_steps = int(checkpoint.get("global_step", 0))  # for evaluation reports (validate/test)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    def sequence_layout(self) -> SequenceLayout:
        return SequenceLayout(self.tokenizer, self.config.patches_per_image, self.autoencoder.autoencoder.config.image_size,
                              autoencoder_fingerprint=autoencoder_fingerprint(self.autoencoder))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> unit-variance latents (N, C, h, w); cached latents pass through."""
        c, s = self.config.latent_channels, self.config.latent_size
        if images.shape[0] == 0:
            return images.new_zeros(0, c, s, s)
        if tuple(images.shape[1:]) == (c, s, s):  # from `transfusion cache-latents` (h < H: never pixels)
            return images
        return self.autoencoder.encode_latents(images)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_latents(latents)

    def _common_step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.encode_images(batch["images"])
        T = self.model.diffusion.num_timesteps
        max_t = torch.where(batch["max_t"] > 0, batch["max_t"], T)
        out = self.model.loss(batch["tokens"], batch["doc_ids"], batch["image_ids"], latents, max_t,
                              pad_id=self.tokenizer.pad_id, boi_id=self.tokenizer.boi_id, generator=generator)
        B = batch["tokens"].shape[0]
        self.log(f"{stage}/loss", out["loss"], prog_bar=True, batch_size=B, sync_dist=stage != "train")
        self.log(f"{stage}/lm_loss", out["lm_loss"], prog_bar=True, batch_size=B, sync_dist=stage != "train")
        self.log(f"{stage}/ddpm_loss", out["ddpm_loss"], prog_bar=True, batch_size=B, sync_dist=stage != "train")
        if stage != "train":
            self.log(f"{stage}/lm_ppl", out["lm_loss"].exp(), batch_size=B, sync_dist=True)  # text and captions
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        is_patch = batch["image_ids"] >= 0
        self.count_flops(batch["doc_ids"], batch["image_ids"], is_patch | (batch["tokens"] != self.tokenizer.pad_id),
                         self.config.bidirectional_images)
        return self._common_step(batch, "train", step_generator(self, batch_idx, self.hparams.noise_seed))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(batch_idx)  # same noise every validation
        return self._common_step(batch, "val", generator)

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        return self._common_step(batch, "test", generator)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Generate for prompt records (``transfusion.data.prompts``); each gets its ``output`` segments."""
        hp = self.hparams
        outputs = Generator(self, self.sampling).generate(
            [r["prompt"] for r in batch], seeds=[hp.generation_seed + r["index"] for r in batch],
            max_new_tokens=[r.get("max_new_tokens") for r in batch])
        return [{**record, "output": output} for record, output in zip(batch, outputs)]

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_cosine(self.model.parameters(), hp.lr, hp.betas, hp.eps, hp.weight_decay, hp.warmup_steps,
                            hp.min_lr_ratio, self.trainer.estimated_stepping_batches)
