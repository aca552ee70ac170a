"""The Chameleon baseline (as the Transfusion paper trains it): images as VQ codes inside the vocabulary.

The same transformer as Transfusion with Chameleon's stability changes switched on (QK-norm, norm
reordering; ``transformer.py``). The vocabulary is the text vocabulary followed by the K codebook
entries: code c is token ``text_vocab_size + c``. An image is BOI, its h*w codes in raster order, EOI.
Attention is causal within each document. Loss = next-token cross-entropy on every token, text and image
codes alike, plus the z-loss 1e-5 * log^2 Z (Z the softmax normaliser) that keeps logits from drifting.

Rows come from the same data pipeline as Transfusion (``transfusion.data.rows.sequences``): ``image_ids``
(B, L) marks the n code positions of each image, and ``insert_codes`` writes the images' codes there.

Legend: B rows, L length, D width, V = text vocabulary + K codes, N images, n codes per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.models.attention import block_mask, dense_mask, positions
from transfusion.models.init import init_weights
from transfusion.models.transformer import Transformer, TransformerConfig


@dataclass
class ChameleonConfig:
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(qk_norm=True, norm_reorder=True))
    text_vocab_size: int = 2048
    codebook_size: int = 512
    patches_per_image: int = 64  # n: an image's codes, one per position of the VQ latent (h * w)
    z_loss_weight: float = 1e-5
    attention: str = "auto"  # as in TransfusionConfig
    RENAMED = {"image_tokens": "patches_per_image"}  # names in configs saved before (checkpoints, hub folders)

    def __post_init__(self):
        for name in ("text_vocab_size", "codebook_size", "patches_per_image"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.z_loss_weight < 0:
            raise ValueError(f"z_loss_weight must be >= 0, got {self.z_loss_weight}")
        if self.attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'flex', got {self.attention!r}")

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.codebook_size


def insert_codes(tokens: torch.Tensor, image_ids: torch.Tensor, codes: torch.Tensor, text_vocab_size: int) -> torch.Tensor:
    """Tokens (B, L) with the images' codes (N, n) written, as ids past the text vocabulary, at image positions."""
    is_image = image_ids >= 0
    if codes.numel() != int(is_image.sum()):
        raise ValueError(f"the batch has {int(is_image.sum())} image positions but {codes.shape[0]} images "
                         f"of {codes.shape[-1] if codes.dim() == 2 else '?'} codes each")
    return tokens.masked_scatter(is_image, (codes + text_vocab_size).to(tokens.dtype))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of log^2 Z, Z = sum(exp(logits)) (logits (P, V))."""
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).pow(2).mean()


class Chameleon(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.transformer.dim
        self.embedding = nn.Embedding(cfg.vocab_size, D)
        self.transformer = Transformer(cfg.transformer)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def init_weights(self, seed: int = 0) -> None:
        """Every parameter from ``seed`` alone (``transfusion.models.init``): the same values sharded or not."""
        init_weights(self, seed)

    def attention_mask(self, doc_ids: torch.Tensor):
        """Causal within each document; one mask per batch, shared by all layers."""
        use_flex = self.cfg.attention == "flex" or (self.cfg.attention == "auto" and doc_ids.is_cuda)
        build = block_mask if use_flex else dense_mask
        return build(doc_ids, torch.full_like(doc_ids, -1), bidirectional=False)

    def forward(self, tokens, doc_ids, mask=None, pos=None, caches=None) -> torch.Tensor:
        """Hidden states (B, L, D); ``pos``, ``mask`` and ``caches`` as in ``Transfusion.forward``."""
        if mask is None:
            mask = self.attention_mask(doc_ids)
        return self.transformer(self.embedding(tokens), positions(doc_ids) if pos is None else pos, mask, caches)

    def loss(self, tokens, doc_ids, image_ids, pad_id: int = -1, text_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Next-token loss on text and image tokens + z-loss; ``tokens`` (B, L) already hold the codes. ``text_loss``
        (B, L) bool: False where a token is not a target (loss-off text and images of interleaved documents)."""
        hidden = self(tokens, doc_ids)
        tgt = tokens[:, 1:]
        trained = (doc_ids[:, :-1] == doc_ids[:, 1:]) & (tgt != pad_id)  # (B, L-1)
        if text_loss is not None:
            trained &= text_loss[:, 1:]
        logits = self.lm_head(hidden[:, :-1][trained])  # (P, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        if not logits.numel():
            zero = hidden.sum() * 0.0
            return {"loss": zero, "lm_loss": zero.detach(), "image_loss": zero.detach(), "z_loss": zero.detach(),
                    "text_tokens": torch.tensor(0), "image_tokens": torch.tensor(0)}
        ce = F.cross_entropy(logits, tgt[trained], reduction="none")  # (P,)
        is_image = (image_ids[:, 1:] >= 0)[trained]  # targets that are image codes
        zl = z_loss(logits)
        nan = ce.new_tensor(float("nan"))
        return {"loss": ce.mean() + self.cfg.z_loss_weight * zl,
                "lm_loss": ce[~is_image].mean().detach() if (~is_image).any() else nan,
                "image_loss": ce[is_image].mean().detach() if is_image.any() else nan,
                "z_loss": zl.detach(), "text_tokens": (~is_image).sum(), "image_tokens": is_image.sum()}
