"""Training compute: FLOPs ~ 6 * N * D (paper section 4.1, after Kaplan et al. 2020).

N counts the parameters a token passes through: the transformer body plus the modality parts (patch
encoders/decoders), not the token embedding or the LM head (an embedding lookup and, in Kaplan's
convention, the output embedding are left out). With modality experts (Mixture-of-Transformers) a position
passes through its own modality's weights only: the image weights (the same shapes as the text ones) are
not counted a second time, so MoT and the dense model of the same size have the same N. D counts the positions trained on: text tokens, image
patches (Transfusion) or image codes (Chameleon), not padding. 6 = 2 (multiply-add) x 3 (forward +
backward). The exact variant adds attention scores and weighted sums, which 6ND leaves out:
12 * layers * width FLOPs for each (query, key) pair attention allows (forward 2 matmuls of 2 FLOPs per
pair and channel, x3 with backward), the width being the query heads' H * Dh (``attention_width``: D unless the
head width is set apart). Grouped-query attention shares each key/value head among H / Hkv query heads: N counts
its smaller K/V projections, while the score and value matmuls still run for every query head.

``FlopCounter`` keeps the running totals in buffers, so they are in every checkpoint and survive resume.

Legend: B rows, L length.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from transfusion.models.transformer import is_image_weight

EXCLUDED_PREFIXES = ("embedding.", "lm_head.")


def flop_parameters(model: nn.Module) -> int:
    """N: parameters a position passes through, outside the token embedding and LM head (one modality's weights
    of a Mixture-of-Transformers block: its image weights, ``.image.`` and ``image_norm``, are left out)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(EXCLUDED_PREFIXES) and not is_image_weight(name))


def training_flops(params: int, tokens: int) -> float:
    """6 * N * D."""
    return 6.0 * params * tokens


def attention_width(cfg) -> int:
    """Channels of attention's score and value matmuls for a ``TransformerConfig``: H * Dh (query heads)."""
    return cfg.n_heads * cfg.head_dim


def attention_flops(n_layers: int, dim: int, pairs: int) -> float:
    """Training FLOPs of attention's score and value matmuls over ``pairs`` allowed (query, key) pairs."""
    return 12.0 * n_layers * dim * pairs


def attention_pairs(doc_ids: torch.Tensor, image_ids: torch.Tensor, real: torch.Tensor, bidirectional: bool) -> int:
    """Allowed (query, key) pairs among the ``real`` positions of rows (B, L): causal within each document,
    plus the later patches of the same image when images attend bidirectionally."""
    total = 0
    for r in range(doc_ids.shape[0]):
        lengths = torch.unique_consecutive(doc_ids[r][real[r]], return_counts=True)[1]
        total += int((lengths * (lengths + 1) // 2).sum())
    if bidirectional:
        n = torch.unique(image_ids[image_ids >= 0], return_counts=True)[1]
        total += int((n * (n - 1) // 2).sum())
    return total


class FlopCounter(nn.Module):
    """Running totals of positions and attention pairs trained on; ``flops`` is 6 * N * D (``dim``: the attention
    width, ``attention_width``)."""

    def __init__(self, params: int, n_layers: int, dim: int):
        super().__init__()
        self.params, self.n_layers, self.dim = int(params), n_layers, dim
        self.register_buffer("tokens", torch.zeros((), dtype=torch.long))  # int64: never cast by .to(dtype)
        self.register_buffer("pairs", torch.zeros((), dtype=torch.long))

    def add(self, tokens: int, pairs: int = 0) -> None:
        self.tokens += int(tokens)
        self.pairs += int(pairs)

    @property
    def flops(self) -> float:
        return training_flops(self.params, int(self.tokens))

    @property
    def exact_flops(self) -> float:
        return self.flops + attention_flops(self.n_layers, self.dim, int(self.pairs))

    def summary(self) -> dict:
        """What the sweep reads from a checkpoint (``checkpoint["flops"]``)."""
        return {"params": self.params, "tokens": int(self.tokens), "flops": self.flops,
                "attention_pairs": int(self.pairs), "exact_flops": self.exact_flops}


def checkpoint_flops(path: str) -> dict:
    """``FlopCounter.summary()`` of a Transfusion or Chameleon checkpoint, for sweeps and comparison tables."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "flops" not in checkpoint:
        raise KeyError(f"{path} has no FLOP count: it was not written by a TransfusionModule or ChameleonModule")
    return checkpoint["flops"]
