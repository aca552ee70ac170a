"""The Transfusion model: one transformer over text tokens and image latent patches.

Text tokens enter through an embedding and leave through the LM head; the patches of each noisy
image latent enter through a patch encoder (with its timestep) and leave through a patch decoder as
predicted noise. Attention is causal over the sequence and bidirectional inside each image.
Loss = L_LM + lambda * L_DDPM (paper eq. 4); ``min_snr_gamma`` optionally weighs each image's L_DDPM by its
timestep (Min-SNR), which the paper does not. The noise schedule (``transfusion.schedules``, chosen by
``objective``) says what the patch decoder predicts: the noise (DDPM) or the velocity noise - x0 (rectified flow);
L_DDPM (``ddpm_loss``, the paper's name for the image loss whatever the objective) is the MSE to that target.

A batch is a set of rows with image patches in place: ``tokens`` (B, L) holds text ids (anything at
patch positions), ``image_ids`` (B, L) marks patch positions with the index of their image in the
batch's image list (-1 for text), ``doc_ids`` (B, L) separates packed documents. Images are listed in
order of appearance (row-major), each one's n patches contiguous and in raster order.

Legend: B rows, L length, D width, V vocabulary, N images, C latent channels, h x w latent size,
n patches per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.models.attention import block_mask, dense_mask, positions
from transfusion.models.init import init_weights
from transfusion.models.patch import build_patch_layers
from transfusion.models.transformer import Transformer, TransformerConfig
from transfusion.schedules import schedule_class


@dataclass
class TransfusionConfig:
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vocab_size: int = 2048
    latent_channels: int = 4
    latent_size: int = 8
    patch_size: int = 2
    patch_encoder: str = "linear"  # "linear" or "unet"
    unet_channels: int = 64
    diffusion_lambda: float = 5.0
    min_snr_gamma: float | None = None  # None: plain epsilon MSE (paper); else Min-SNR-gamma weights per image
    bidirectional_images: bool = True  # False: plain causal attention everywhere (Table 5 ablation)
    num_timesteps: int = 1000
    objective: str = "ddpm"  # "ddpm" (the paper's epsilon prediction) or "flow" (rectified flow, velocity prediction)
    attention: str = "auto"  # "auto": FlexAttention on CUDA, dense-mask SDPA elsewhere; or "sdpa" / "flex"

    def __post_init__(self):
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.patch_size <= 0 or self.latent_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide the latent size {self.latent_size}")
        if self.patch_encoder not in ("linear", "unet"):
            raise ValueError(f"patch_encoder must be 'linear' or 'unet', got {self.patch_encoder!r}")
        if self.diffusion_lambda < 0:
            raise ValueError(f"diffusion_lambda must be >= 0, got {self.diffusion_lambda}")
        schedule_class(self.objective)  # a known objective
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if self.min_snr_gamma is not None and not schedule_class(self.objective).MIN_SNR:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma} weighs DDPM's epsilon loss; with objective "
                             f"{self.objective!r} it must be None")
        if self.attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'flex', got {self.attention!r}")

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2


class Transfusion(nn.Module):
    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.transformer.dim
        self.embedding = nn.Embedding(cfg.vocab_size, D)
        self.transformer = Transformer(cfg.transformer)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.patch_encoder, self.patch_decoder = build_patch_layers(
            cfg.patch_encoder, cfg.latent_channels, cfg.patch_size, D, cfg.unet_channels
        )
        with torch.device("cpu"):  # a schedule, no parameters: real tensors even when the model is built on "meta"
            self.schedule = schedule_class(cfg.objective)(cfg.num_timesteps)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def init_weights(self, seed: int = 0) -> None:
        """Every parameter from ``seed`` alone (``transfusion.models.init``); the patch decoder's output layer at zero."""
        init_weights(self, seed, zero=tuple(f"patch_decoder.{name}." for name in self.patch_decoder.zero_init))

    def attention_mask(self, doc_ids: torch.Tensor, image_ids: torch.Tensor):
        """One mask per batch, shared by all layers."""
        use_flex = self.cfg.attention == "flex" or (self.cfg.attention == "auto" and doc_ids.is_cuda)
        build = block_mask if use_flex else dense_mask
        return build(doc_ids, image_ids, self.cfg.bidirectional_images)

    def forward(self, tokens, doc_ids, image_ids, x_t=None, t=None, mask=None, pos=None, caches=None):
        """Hidden states (B, L, D) and the schedule's prediction (N, C, h, w) (noise or velocity; None without images).

        ``pos`` (B, L) overrides the RoPE positions derived from ``doc_ids``; with ``caches`` (one per
        layer, see ``transfusion.kv_cache``) the inputs are only the new positions and ``mask`` covers
        the cached keys too.
        """
        h = self.embedding(tokens)  # (B, L, D)
        is_patch = image_ids >= 0
        context = None
        # with gradients, no images still runs the patch layers (on no rows): see the image-free case in loss
        if x_t is not None and (x_t.shape[0] > 0 or torch.is_grad_enabled()):
            patches, context = self.patch_encoder(x_t, t)  # (N, n, D)
            if patches.shape[0] * patches.shape[1] != int(is_patch.sum()):
                raise ValueError(
                    f"the batch has {int(is_patch.sum())} patch positions but {patches.shape[0]} images "
                    f"of {patches.shape[1]} patches each"
                )
            h = h.masked_scatter(is_patch[..., None], patches.to(h.dtype))
        if mask is None:
            mask = self.attention_mask(doc_ids, image_ids)
        hidden = self.transformer(h, positions(doc_ids) if pos is None else pos, mask, caches, is_image=is_patch)
        prediction = None
        if context is not None:
            N, n = x_t.shape[0], self.cfg.patches_per_image
            prediction = self.patch_decoder(hidden[is_patch].view(N, n, hidden.shape[-1]), t, context)
        return hidden, prediction

    def loss(self, tokens, doc_ids, image_ids, latents, max_t=None, pad_id: int = -1, boi_id: int = -1,
             generator=None, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             text_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L_LM + lambda * L_DDPM on one batch of clean latents (N, C, h, w); times (N,) and noise are drawn here
        unless given, from ``generator`` (one, or a list of one per image: ``Schedule.draw_times``). ``max_t`` (N,):
        each image's limit code (``transfusion.schedules``: FULL, a limit, or CLEAN: the image enters clean, t = 0,
        seen but never denoised, e.g. an edit's source, and is left out of L_DDPM). For flow, t is the float time
        s T. ``text_loss`` (B, L) bool: False where a token is not a next-token target (loss-off text of an
        interleaved document); None: all are."""
        if t is None:
            t = self.schedule.draw_times(latents.shape[0], max_t, generator, latents.device)
        if noise is None:
            noise = self.schedule.draw_noise(latents, generator)
        x_t = self.schedule.add_noise(latents, noise, t)
        hidden, prediction = self(tokens, doc_ids, image_ids, x_t, t)

        # next-token loss where input and target are text of the same document, input not BOI, target not PAD
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        is_text = image_ids < 0
        lm_positions = (is_text[:, :-1] & is_text[:, 1:] & (doc_ids[:, :-1] == doc_ids[:, 1:])
                        & (inp != boi_id) & (tgt != pad_id))
        if text_loss is not None:
            lm_positions &= text_loss[:, 1:]
        logits = self.lm_head(hidden[:, :-1][lm_positions]).float()  # (P, V)
        lm_loss = F.cross_entropy(logits, tgt[lm_positions]) if logits.numel() else hidden.sum() * 0.0

        noised = t > 0  # images entered clean (t = 0) are context, not denoising targets
        if prediction is not None and noised.any():  # per-image MSE to the schedule's target, over the noised images
            target = self.schedule.target(latents, noise)
            per_image = F.mse_loss(prediction[noised].float(), target[noised].float(),
                                   reduction="none").flatten(1).mean(1)
            if self.cfg.min_snr_gamma is not None:  # clean timesteps weigh gamma / SNR_t < 1 (see DDPM)
                ddpm_loss = (per_image * self.schedule.min_snr_weights(t[noised], self.cfg.min_snr_gamma)).mean()
            else:
                ddpm_loss = per_image.mean()
        else:  # no noised image: the image weights still ran in forward (on no rows, or clean images), so their
            # zero gradients reach DDP's and FSDP2's reductions as every other's do (not around them, on shards)
            per_image = latents.new_zeros(0)
            ddpm_loss = prediction.sum() * 0.0 if prediction is not None else latents.new_zeros(())
        loss = lm_loss + self.cfg.diffusion_lambda * ddpm_loss
        return {"loss": loss, "lm_loss": lm_loss, "ddpm_loss": ddpm_loss,
                "text_tokens": lm_positions.sum().detach(), "images": noised.sum().detach(),
                "ddpm_per_image": per_image.detach(), "t": t[noised]}
