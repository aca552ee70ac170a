"""The Transfusion model: one transformer over text tokens and image latent patches.

Text tokens enter through an embedding and leave through the LM head; the patches of each noisy
image latent enter through a patch encoder (with its timestep) and leave through a patch decoder as
predicted noise. Attention is causal over the sequence and bidirectional inside each image.
Loss = L_LM + lambda * L_DDPM (paper eq. 4); ``min_snr_gamma`` optionally weighs each image's L_DDPM by its
timestep (Min-SNR), which the paper does not. With ``objective`` "flow" (rectified flow, ``transfusion.flow``)
the patch decoder predicts the velocity noise - x0 instead, and L_DDPM (still named ``ddpm_loss``) is its MSE.

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

from transfusion.diffusion import Diffusion
from transfusion.flow import RectifiedFlow
from transfusion.models.attention import block_mask, dense_mask, positions
from transfusion.models.patch import build_patch_layers
from transfusion.models.transformer import Transformer, TransformerConfig


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
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"objective must be 'ddpm' or 'flow', got {self.objective!r}")
        if self.objective == "flow" and self.min_snr_gamma is not None:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma} weighs DDPM's epsilon loss; with objective 'flow' "
                             "it must be None")
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
            self.diffusion = (RectifiedFlow(cfg.num_timesteps) if cfg.objective == "flow"
                              else Diffusion(cfg.num_timesteps))
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter from ``seed`` alone, one full tensor at a time on the CPU.

        A model built on the meta device and sharded (FSDP2: parameters are DTensors) gets exactly the
        values of an unsharded one, so 1 process, DDP and FSDP2 start from the same weights. Matrices:
        N(0, 0.02) (residual outputs scaled with depth) in the transformer, embedding and LM head,
        PyTorch's default (Kaiming-uniform) in the patch layers; zeros for the patch decoder's output layer and
        biases; ones for norm weights.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        zero = tuple(f"patch_decoder.{name}." for name in self.patch_decoder.zero_init)
        # frozen text's trained rows (lmfusion.SpecialRows, made before FSDP2 shards) are copies of their table's
        params = [(n, p) for n, p in self.named_parameters() if not n.endswith(".special_rows")]
        for i, (name, p) in enumerate(params):  # the same index, so the same draw, with or without them
            full = torch.empty(p.shape, dtype=torch.float32)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
            if name.startswith(zero) or name.endswith("bias"):
                full.zero_()
            elif p.dim() == 1:
                full.fill_(1.0)
            elif name.startswith("transformer."):
                full.normal_(0.0, self.transformer.init_std(name), generator=generator)
            elif name.startswith(("embedding.", "lm_head.")):
                full.normal_(0.0, 0.02, generator=generator)
            else:
                nn.init.kaiming_uniform_(full, a=5**0.5, generator=generator)
            if isinstance(p, DTensor):  # keep this rank's shard; every rank drew the same full tensor
                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(full.to_local())
            else:
                p.copy_(full)
        for module in self.modules():
            if hasattr(module, "init_special_rows"):
                module.reset_index()  # after to_empty
                module.init_special_rows()

    def attention_mask(self, doc_ids: torch.Tensor, image_ids: torch.Tensor):
        """One mask per batch, shared by all layers."""
        use_flex = self.cfg.attention == "flex" or (self.cfg.attention == "auto" and doc_ids.is_cuda)
        build = block_mask if use_flex else dense_mask
        return build(doc_ids, image_ids, self.cfg.bidirectional_images)

    def forward(self, tokens, doc_ids, image_ids, x_t=None, t=None, mask=None, pos=None, caches=None):
        """Hidden states (B, L, D) and predicted noise (N, C, h, w) (velocity for flow; None without images).

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
        eps = None
        if context is not None:
            N, n = x_t.shape[0], self.cfg.patches_per_image
            eps = self.patch_decoder(hidden[is_patch].view(N, n, hidden.shape[-1]), t, context)
        return hidden, eps

    def loss(self, tokens, doc_ids, image_ids, latents, max_t=None, pad_id: int = -1, boi_id: int = -1,
             generator: torch.Generator | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, text_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L_LM + lambda * L_DDPM on one batch of clean latents (N, C, h, w); timesteps (N,) and noise are
        drawn here unless given. ``max_t`` (N,): the largest timestep each image may draw; 0 makes an image enter
        clean (t = 0: an editing source image, seen but never denoised) and leaves it out of L_DDPM. For flow,
        L_DDPM (``ddpm_loss``, ``ddpm_per_image``) is the velocity MSE and t the float time s T. ``text_loss`` (B, L)
        bool: False where a token is not a next-token target (loss-off text of an interleaved document); None: all are."""
        N = latents.shape[0]
        if t is None:
            limit = None if max_t is None else torch.as_tensor(max_t, device=latents.device)
            t = self.diffusion.sample_timesteps(N, None if limit is None else limit.clamp(min=1), generator=generator,
                                                device=latents.device)
            if limit is not None:
                t = t.masked_fill(limit == 0, 0)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        x_t = self.diffusion.add_noise(latents, noise, t)
        hidden, eps = self(tokens, doc_ids, image_ids, x_t, t)

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
        if eps is not None and noised.any():  # per-image epsilon (velocity) MSE, averaged over the noised images
            target = noise if self.cfg.objective == "ddpm" else self.diffusion.velocity(latents, noise)
            per_image = F.mse_loss(eps[noised].float(), target[noised].float(), reduction="none").flatten(1).mean(1)
            if self.cfg.min_snr_gamma is not None:  # clean timesteps weigh gamma / SNR_t < 1 (see Diffusion)
                ddpm_loss = (per_image * self.diffusion.min_snr_weights(t[noised], self.cfg.min_snr_gamma)).mean()
            else:
                ddpm_loss = per_image.mean()
        else:  # no noised image: the image weights still ran in forward (on no rows, or clean images), so their
            # zero gradients reach DDP's and FSDP2's reductions as every other's do (not around them, on shards)
            per_image = latents.new_zeros(0)
            ddpm_loss = eps.sum() * 0.0 if eps is not None else latents.new_zeros(())
        loss = lm_loss + self.cfg.diffusion_lambda * ddpm_loss
        return {"loss": loss, "lm_loss": lm_loss, "ddpm_loss": ddpm_loss,
                "text_tokens": lm_positions.sum().detach(), "images": noised.sum().detach(),
                "ddpm_per_image": per_image.detach(), "t": t[noised]}
