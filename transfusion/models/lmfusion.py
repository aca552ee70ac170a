"""Starting Transfusion from a pretrained text model (LMFusion, Shi et al. 2024).

The text model's weights (token embedding, LM head, every block's norms, attention projections and FFN,
the final norm) become the text weights of a Mixture-of-Transformers Transfusion; the image weights of each
block start as copies of them, and the patch layers from scratch. Frozen text weights keep text ability
exactly: a text-only sequence passes only through them, so its logits never change.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from transfusion.models.transformer import is_image_weight


def is_text_weight(name: str) -> bool:
    """Parameters a text position passes through: all but the image weights and the patch layers."""
    return not (is_image_weight(name) or name.startswith(("patch_encoder.", "patch_decoder.")))


@torch.no_grad()
def load_text_weights(model: nn.Module, state: dict[str, torch.Tensor], image_from_text: bool = True) -> None:
    """Copy a text model's weights (our names, ``transfusion.models.llama``) into ``model``; the embedding and LM
    head may have more rows than the text model (special tokens appended to its tokenizer): those keep their
    initialisation. ``image_from_text``: the image weights start as copies of the text weights."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(n for n in params if is_text_weight(n) and n not in state)
    if unknown or missing:
        raise ValueError(f"the text model does not fit this Transfusion: unknown {unknown[:5]}, missing {missing[:5]}")
    for name, value in state.items():
        p = params[name]
        rows = value.shape[0]
        extendable = name in ("embedding.weight", "lm_head.weight")  # rows of appended special tokens
        if value.shape[1:] != p.shape[1:] or rows > p.shape[0] or (rows != p.shape[0] and not extendable):
            raise ValueError(f"text model weight {name} has shape {tuple(value.shape)}, this model {tuple(p.shape)}")
        p[:rows].copy_(value.to(p.dtype))
    if image_from_text:
        for name, p in params.items():
            if ".image." in name:
                p.copy_(params[name.replace(".image.", ".", 1)])
            elif "image_norm" in name:
                p.copy_(params[name.replace("image_norm", "norm")])


def freeze_text_weights(model: nn.Module) -> int:
    """Stop training the text weights; returns how many parameters stay trainable."""
    for name, p in model.named_parameters():
        p.requires_grad_(not is_text_weight(name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
