"""LightningModule for Transfusion: a frozen autoencoder in front of the Transfusion model."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch

from transfusion.data.sequences import SequenceLayout
from transfusion.data.tokenizer import Tokenizer
from transfusion.flops import FlopAccounting, FlopCounter, flop_parameters
from transfusion.generation import Generator, SamplingOptions
from transfusion.lightning.autoencoder import AutoencoderModule, load_frozen
from transfusion.lightning.interface import GenerativeModule
from transfusion.lightning.optim import adamw_cosine
from transfusion.models.transfusion import Transfusion, TransfusionConfig
from transfusion.models.transformer import TransformerConfig


# the frozen autoencoder stays in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class TransfusionModule(FlopAccounting, GenerativeModule, L.LightningModule):
    image_sampling_fields = ("sampler", "num_steps", "clip_x0")  # reported by evaluations

    def __init__(self, tokenizer: str, autoencoder: str, preset: str = "debug", patch_size: int = 2,
                 patch_encoder: str = "linear", unet_channels: int = 64, diffusion_lambda: float = 5.0,
                 bidirectional_images: bool = True, attention: str = "auto", transformer: dict | None = None,
                 lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, warmup_steps: int = 4000, min_lr_ratio: float = 0.05,
                 cfg_scale: float = 5.0, num_inference_steps: int = 250, sampler: str = "ddpm",
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, clip_x0: float | None = 5.0,
                 generation_seed: int = 0):
        """
        Args:
            tokenizer: path of the SentencePiece model (``transfusion tokenizer`` trains one).
            autoencoder: path of a trained ``AutoencoderModule`` checkpoint; kept frozen.
            preset: transformer size (``TRANSFORMER_PRESETS``: debug, cpu-small, cpu-base, 0.16B ... 7B).
            transformer: overrides of the preset's ``TransformerConfig`` fields, e.g. ``{n_layers: 6}``.
            patch_encoder: "linear" (with timestep embedding) or "unet" (down/up blocks).
            diffusion_lambda: weight of the DDPM loss (paper: 5).
            bidirectional_images: attention inside an image is bidirectional (paper) or causal (ablation).
            min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio`` (paper: 3e-4 -> 1.5e-5).
            cfg_scale, num_inference_steps, sampler, max_new_tokens, temperature, top_p, clip_x0: generation settings
                for ``predict`` (``transfusion.generation.SamplingOptions``); prompt i uses seed generation_seed + i.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = Tokenizer(tokenizer)
        if not Path(autoencoder).is_file():
            raise FileNotFoundError(f"autoencoder checkpoint {autoencoder!r} does not exist; train one with "
                                    "`transfusion fit --config lightning_configs/autoencoder_embedded.yaml`")
        self.autoencoder = load_frozen(AutoencoderModule, autoencoder)
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
        self.sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        cfg_scale=cfg_scale, num_steps=num_inference_steps, sampler=sampler,
                                        clip_x0=clip_x0)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # FlopAccounting
        self.trained_steps = int(checkpoint.get("global_step", 0))  # for evaluation reports (validate/test)

    def sequence_layout(self) -> SequenceLayout:
        return SequenceLayout(self.tokenizer, self.config.patches_per_image, self.autoencoder.autoencoder.config.image_size)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> unit-variance latents (N, C, h, w)."""
        if images.shape[0] == 0:
            c, s = self.config.latent_channels, self.config.latent_size
            return images.new_zeros(0, c, s, s)
        return self.autoencoder.encode_latents(images)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_latents(latents)

    def text_logits(self, tokens: torch.Tensor, doc_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (P, V) at the ``at`` positions of text-only rows (B, L) (perplexity)."""
        hidden, _ = self.model(tokens, doc_ids, torch.full_like(tokens, -1))
        return self.model.lm_head(hidden[at])

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
        return self._common_step(batch, "train")

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
