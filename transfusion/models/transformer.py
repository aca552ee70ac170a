"""The Llama-style transformer shared by Transfusion and the Chameleon baseline.

RMSNorm -> RoPE -> Attention -> SwiGLU -> Block -> Transformer, no biases. The body maps embeddings to
hidden states; each model owns its modality-specific inputs and outputs. Chameleon's stability changes
are switches of the same block: ``qk_norm`` (LayerNorm on queries and keys) and ``norm_reorder``
(h = x + norm(attn(x)); out = h + norm(ffn(h))). ``modality_experts`` (Mixture-of-Transformers, Liang et al.
2024) gives image positions their own norms, Q/K/V/O projections and FFN (``Block.image``, a block of the same
shape) while attention stays global: each position passes through its modality's weights only.

Legend: B batch rows, L sequence length, D width, H heads, Dh head width (D / H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transfusion.models.attention import attend


@dataclass
class TransformerConfig:
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    ffn_dim: int | None = None  # None: 8/3 * dim rounded up to ffn_multiple_of (Llama)
    ffn_multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096
    qk_norm: bool = False
    norm_reorder: bool = False
    modality_experts: bool = False  # Mixture-of-Transformers: separate text and image weights in every block

    def __post_init__(self):
        for name in ("n_layers", "dim", "n_heads", "max_seq_len", "ffn_multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head width dim/n_heads={self.dim // self.n_heads} must be even for RoPE")
        if self.ffn_dim is None:
            self.ffn_dim = self.ffn_multiple_of * math.ceil(8 * self.dim / 3 / self.ffn_multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TransformerConfig":
        if name not in TRANSFORMER_PRESETS:
            raise ValueError(f"unknown transformer preset {name!r}; choose one of {sorted(TRANSFORMER_PRESETS)}")
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown transformer option(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        if ("dim" in overrides or "ffn_multiple_of" in overrides) and "ffn_dim" not in overrides:
            overrides["ffn_dim"] = None  # re-derive from the new width
        return replace(TRANSFORMER_PRESETS[name], **overrides)


TRANSFORMER_PRESETS = {
    "debug": TransformerConfig(n_layers=2, dim=64, n_heads=4, max_seq_len=256),
    "cpu-small": TransformerConfig(n_layers=4, dim=256, n_heads=4, max_seq_len=512),
    "cpu-base": TransformerConfig(n_layers=8, dim=384, n_heads=6, max_seq_len=1024),
    # the paper's sizes (Table: layers, width, heads); sequence length 4096
    "0.16B": TransformerConfig(n_layers=16, dim=768, n_heads=12, ffn_multiple_of=256),
    "0.37B": TransformerConfig(n_layers=24, dim=1024, n_heads=16, ffn_multiple_of=256),
    "0.76B": TransformerConfig(n_layers=24, dim=1536, n_heads=24, ffn_multiple_of=256),
    "1.4B": TransformerConfig(n_layers=24, dim=2048, n_heads=16, ffn_multiple_of=256),
    "7B": TransformerConfig(n_layers=32, dim=4096, n_heads=32, ffn_multiple_of=256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles for integer positions (B, L) -> each (B, 1, L, Dh/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, L, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, Dh) pairs (x[..., :Dh/2], x[..., Dh/2:]) by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps, bias=False) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps, bias=False) if cfg.qk_norm else nn.Identity()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> q, k, v (..., 3, H, Dh), q and k normalised (``qk_norm``), not yet rotated."""
        qkv = self.wqkv(x).unflatten(-1, (3, self.n_heads, self.head_dim))
        if isinstance(self.q_norm, nn.Identity):
            return qkv
        q, k, v = qkv.unbind(-3)
        return torch.stack([self.q_norm(q), self.k_norm(k), v], dim=-3)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask, cache=None,
                route=None) -> torch.Tensor:
        """``route(x, f)``: f(block, x) with each modality's block (modality experts; None: this one's weights)."""
        B, L, D = x.shape
        qkv = self.project(x) if route is None else route(x, lambda b, x: b.attention.project(x))  # (B, L, 3, H, Dh)
        q, k, v = apply_rope(qkv.permute(2, 0, 3, 1, 4)[:2], *rope).unbind(0) + (qkv[:, :, 2].transpose(1, 2),)
        if cache is not None:  # prepend cached keys/values of earlier positions
            k, v = cache(k, v)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(B, L, D)  # (B, H, L, Dh) -> (B, L, D)
        return self.wo(out) if route is None else route(out, lambda b, x: b.attention.wo(x))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def is_image_weight(name: str) -> bool:
    """A parameter name of the image weights of a model with modality experts (``Block.image``, ``image_norm``)."""
    return ".image." in name or "image_norm" in name


class Experts:
    """Routes positions to their modality's weights: ``experts(blocks, x, f)`` is f(text block, x) at text positions
    and f(image block, x) at image positions, each computed on its own positions only. Built once per forward."""

    def __init__(self, is_image: torch.Tensor):
        flat = is_image.flatten()
        self.index = ((~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1))  # positions of each modality

    def __call__(self, blocks: tuple["Block", "Block"], x: torch.Tensor, f) -> torch.Tensor:
        flat = x.flatten(0, 1)
        parts = [f(block, flat[index]) for block, index in zip(blocks, self.index)]
        out = parts[0].new_empty(flat.shape[0], *parts[0].shape[1:])
        for part, index in zip(parts, self.index):
            out = out.index_copy(0, index, part)
        return out.view(*x.shape[:2], *out.shape[1:])


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_reorder = cfg.norm_reorder
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        # Mixture-of-Transformers: these weights serve text; image positions use a block of their own
        self.image = Block(replace(cfg, modality_experts=False)) if cfg.modality_experts else None

    def forward(self, x: torch.Tensor, rope, mask, cache=None, experts: Experts | None = None) -> torch.Tensor:
        if self.image is None or experts is None:  # dense, or no image position in the batch
            if self.norm_reorder:  # Chameleon: normalise the branch outputs
                h = x + self.attention_norm(self.attention(x, rope, mask, cache))
                return h + self.ffn_norm(self.ffn(h))
            h = x + self.attention(self.attention_norm(x), rope, mask, cache)
            return h + self.ffn(self.ffn_norm(h))
        def route(x, f):
            return experts((self, self.image), x, f)

        if self.norm_reorder:
            h = x + route(self.attention(x, rope, mask, cache, route), lambda b, x: b.attention_norm(x))
            return h + route(h, lambda b, x: b.ffn_norm(b.ffn(x)))
        h = x + self.attention(route(x, lambda b, x: b.attention_norm(x)), rope, mask, cache, route)
        return h + route(h, lambda b, x: b.ffn(b.ffn_norm(x)))


class Transformer(nn.Module):
    """Blocks + final norm: (B, L, D) embeddings -> (B, L, D) hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.image_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.modality_experts else None
        self.reset_parameters()

        self.activation_checkpointing = False  # recompute each block in backward instead of storing it

    def init_std(self, name: str) -> float:
        """Standard deviation of the normal init of matrix ``name``; residual-branch outputs are scaled
        down with depth (GPT-2)."""
        return 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=self.init_std(name))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask, caches=None,
                is_image: torch.Tensor | None = None) -> torch.Tensor:
        """``is_image`` (B, L): the image positions, which take the image weights when ``modality_experts``."""
        if pos.max() >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(pos.max())} exceeds max_seq_len={self.cfg.max_seq_len}")
        if self.cfg.modality_experts and is_image is None:
            raise ValueError("a transformer with modality_experts needs is_image, the image positions (B, L)")
        # no image position (text, or a decoding step): every position takes the text weights, the dense path
        experts = Experts(is_image) if self.cfg.modality_experts and is_image.any() else None
        rope = rope_angles(pos, self.cfg.head_dim, self.cfg.rope_theta)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and caches is None
        for i, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, rope, mask, None, experts, use_reentrant=False)
            else:
                x = layer(x, rope, mask, None if caches is None else caches[i], experts)
        if experts is None:
            return self.norm(x)
        return torch.where(is_image[..., None], self.image_norm(x), self.norm(x))
