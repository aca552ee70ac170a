"""LightningModule for the Chameleon baseline: a frozen VQ-VAE in front of the Chameleon model.

Trains on the same rows as Transfusion (``TransfusionDataModule``: caption first 80%, image first 20%,
caption dropout for CFG); each image's n positions receive its VQ codes. The image-first noise limit
(``max_t``) has no meaning for discrete codes and is ignored.
"""

from __future__ import annotations

import math

import torch

from transfusion.data.tokenizer import Tokenizer
from transfusion.generation.options import legacy_fields
from transfusion.generation import ChameleonGenerator, ChameleonSamplingOptions
from transfusion.lightning.autoencoder import VQAutoencoderModule, load_frozen
from transfusion.lightning.generative import GenerativeModule
from transfusion.lightning.optim import OptimizerConfig
from transfusion.models.chameleon import Chameleon, ChameleonConfig, insert_codes
from transfusion.models.transformer import TransformerConfig


class ChameleonModule(GenerativeModule):
    network_class = Chameleon
    generator_class = ChameleonGenerator
    image_sampling_fields = ("image_temperature", "image_top_p")  # reported by evaluations
    eval_loss_names = ("loss", "lm_loss", "image_loss", "z_loss")

    def __init__(self, tokenizer: str, autoencoder: str | dict, preset: str = "debug", transformer: dict | None = None,
                 qk_norm: bool = True, norm_reorder: bool = True, z_loss_weight: float = 1e-5, attention: str = "auto",
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, warmup_steps: int = 4000, min_lr_ratio: float = 0.05,
                 sampling: ChameleonSamplingOptions | None = None, generation_seed: int = 0, eval_weights: str = "ema",
                 # deprecated: the fields of ``sampling`` as flat arguments (earlier YAMLs and checkpoints)
                 cfg_scale: float | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, image_temperature: float | None = None,
                 image_top_p: float | None = None):
        """
        Args:
            tokenizer: path of the SentencePiece model (``transfusion tokenizer``).
            autoencoder: path of a trained ``VQAutoencoderModule`` checkpoint, or of a diffusers ``VQModel`` folder
                (``transfusion.models.diffusers_vae``); kept frozen (or its settings, as in an export).
            preset, transformer: transformer size and overrides, as for ``TransfusionModule``.
            qk_norm, norm_reorder, z_loss_weight: Chameleon's stability changes (paper: on, on, 1e-5).
            lr: the paper's Chameleon learning rate is 1e-4; the rest of the optimisation as Transfusion's.
            sampling: generation settings (``transfusion.generation.ChameleonSamplingOptions``): ``cfg_scale``
                (classifier-free guidance on image-code logits, from a caption-dropped stream), ``temperature``,
                ``top_p`` (text; 0: greedy), ``image_temperature``, ``image_top_p`` (image codes); in YAML one group
                ``sampling: {cfg_scale: 5}``. The same fields as flat arguments are deprecated (mapped, with a warning).
            eval_weights: with EMA callbacks, the weights that evaluations and checkpoints loaded outside ``fit``
                use: "ema", "raw" or an EMA's name, as for ``TransfusionModule``.
        """
        super().__init__()
        # options first, files after: a bad option is reported before anything is read
        self.save_hyperparameters(ignore=legacy_fields(ChameleonSamplingOptions))
        self.set_sampling(ChameleonSamplingOptions, sampling, locals())
        self.optim = OptimizerConfig(lr, tuple(betas), eps, weight_decay, warmup_steps, min_lr_ratio)
        transformer_config = TransformerConfig.from_name(preset, qk_norm=qk_norm, norm_reorder=norm_reorder,
                                                         **(transformer or {}))
        self.tokenizer = Tokenizer(tokenizer)
        self.autoencoder = load_frozen(VQAutoencoderModule, autoencoder)
        vq = self.autoencoder.model
        self.config = ChameleonConfig(
            transformer=transformer_config, text_vocab_size=self.tokenizer.vocab_size,
            codebook_size=vq.codebook_size, patches_per_image=vq.patches_per_image, z_loss_weight=z_loss_weight,
            attention=attention,
        )
        self.flop_counter = self.network_flop_counter()  # N: the transformer body

    @property
    def patches_per_image(self) -> int:
        """Rows as for Transfusion, with n = the VQ latent's codes per image."""
        return self.config.patches_per_image

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> codes (N, n); codes (N, n) from `transfusion cache-latents` pass through."""
        if images.shape[0] == 0:
            return torch.zeros(0, self.config.patches_per_image, dtype=torch.long, device=images.device)
        if not images.is_floating_point():
            if tuple(images.shape[1:]) != (self.config.patches_per_image,):
                raise ValueError(f"cached codes of shape {tuple(images.shape[1:])}, the VQ-VAE gives "
                                 f"({self.config.patches_per_image},): re-run `transfusion cache-latents`")
            return images.long()
        return self.autoencoder.encode_codes(images)

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        """The batch's tokens (B, L) with image codes in place."""
        return insert_codes(batch["tokens"], batch["image_ids"], self.encode_images(batch["images"]),
                            self.config.text_vocab_size)

    def text_logits(self, tokens: torch.Tensor, doc_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (P, text + codebook) at the ``at`` positions of text-only rows (B, L): perplexity is scored
        over the whole vocabulary, so probability the model puts on image codes counts against it."""
        return self.model.lm_head(self.model(tokens, doc_ids)[at])

    def _common_step(self, batch: dict, stage: str, tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.batch_tokens(batch) if tokens is None else tokens
        out = self.model.loss(tokens, batch["doc_ids"], batch["image_ids"], pad_id=self.tokenizer.pad_id,
                              text_loss=batch.get("text_loss"))
        if stage != "train":  # means over every target of all processes, logged at the epoch's end
            targets = out["text_tokens"] + out["image_tokens"]
            for key, count in (("loss", targets), ("z_loss", targets), ("lm_loss", out["text_tokens"]),
                               ("image_loss", out["image_tokens"])):
                self.eval_losses.update(key, out[key], count)
            return out["loss"]
        B = tokens.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=B)
        self.log("train/z_loss", out["z_loss"], batch_size=B)
        for key in ("lm_loss", "image_loss"):  # absent from batches without text / images
            if not math.isnan(float(out[key])):
                self.log(f"train/{key}", out[key], prog_bar=True, batch_size=B)
        return out["loss"]

    def eval_figures(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        figures = {k: v for k, v in means.items() if not torch.isnan(v)}  # no text / no image in the data: absent
        if "lm_loss" in figures:
            figures["lm_ppl"] = figures["lm_loss"].exp()  # text and captions
        return figures

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = self.batch_tokens(batch)
        self.count_flops(batch["doc_ids"], batch["image_ids"], tokens != self.tokenizer.pad_id, bidirectional=False)
        return self._common_step(batch, "train", tokens)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "test")
