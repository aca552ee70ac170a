"""The Llama-style transformer shared by Transfusion and the Chameleon baseline.

RMSNorm -> RoPE -> Attention -> SwiGLU -> Block -> Transformer, no biases. The body maps embeddings to
hidden states; each model owns its modality-specific inputs and outputs. Switches of the same block let it
represent current open LLM families exactly (``transfusion.models.llama``): grouped-query attention
(``n_kv_heads`` key/value heads shared by groups of query heads; caches hold only those), a head width other
than D / H (``head_width``), q/k/v biases (``qkv_bias``, Qwen2), a per-head RMSNorm on queries and keys
before RoPE (``qk_rmsnorm``, Qwen3) and RoPE scaling (``rope_type`` and its ``rope_*`` parameters, as
``transformers`` computes it).
Chameleon's stability changes are switches too: ``qk_norm`` (LayerNorm on queries and keys) and ``norm_reorder``
(h = x + norm(attn(x)); out = h + norm(ffn(h))). ``modality_experts`` (Mixture-of-Transformers, Liang et al.
2024) gives image positions their own norms, Q/K/V/O projections and FFN (``Block.image``, a block of the same
shape) while attention stays global: each position passes through its modality's weights only.

Legend: B batch rows, L sequence length, D width, H query heads, Hkv key/value heads, Dh head width (D / H unless
``head_width``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transfusion.models.attention import attend


ROPE_SCALING = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",), "dynamic": ("factor",)}


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE inverse frequencies (Dh/2,), computed as ``transformers.modeling_rope_utils`` computes them.

    ``dynamic`` (NTK) changes the frequencies only past ``max_position_embeddings``, which our positions never reach
    (``max_seq_len``): inside it, they are the default ones.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind not in ROPE_SCALING:
        raise ValueError(f"rope_type {kind!r} is not supported; choose 'default' or one of {sorted(ROPE_SCALING)}")
    missing = [k for k in ROPE_SCALING[kind] if k not in scaling]
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {missing}")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "dynamic":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: interpolated
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


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
    # current LLM families; None / False / "default" keep the original block (and every stored config, which
    # lacks these fields, loads as it was)
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads)
    head_width: int | None = None  # Dh (None: dim / n_heads)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_rmsnorm: bool = False  # per-head RMSNorm (with weights) on q and k before RoPE (Qwen3); not Chameleon's qk_norm
    rope_type: str = "default"  # RoPE scaling as transformers' rope_parameters: default, llama3, linear or dynamic
    rope_factor: float = 1.0  # llama3, linear, dynamic: the context extension factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_seq_len: int | None = None  # llama3: the pretraining context (None: max_seq_len)
    architecture: str | None = None  # the Hugging Face class the text weights came from, for export (None: Llama)

    def __post_init__(self):
        for name in ("n_layers", "dim", "n_heads", "max_seq_len", "ffn_multiple_of", "n_kv_heads", "head_width"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_width is None and self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"head width {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.qk_norm and self.qk_rmsnorm:
            raise ValueError("qk_norm (Chameleon's LayerNorm) and qk_rmsnorm (Qwen3's RMSNorm) exclude each other")
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # checks rope_type
        if self.ffn_dim is None:
            self.ffn_dim = self.ffn_multiple_of * math.ceil(8 * self.dim / 3 / self.ffn_multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads if self.head_width is None else self.head_width

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def rope_scaling(self) -> dict | None:
        """The RoPE scaling parameters in transformers' names (None: plain RoPE)."""
        if self.rope_type == "default":
            return None
        names = {"factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
                 "high_freq_factor": self.rope_high_freq_factor,
                 "original_max_position_embeddings": self.rope_original_max_seq_len or self.max_seq_len}
        return {"rope_type": self.rope_type, **{k: names[k] for k in ROPE_SCALING.get(self.rope_type, names)}}

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


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles for integer positions (B, L) -> each (B, 1, L, Dh/2)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, pos.device)
    angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, L, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, Dh) pairs (x[..., :Dh/2], x[..., Dh/2:]) by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_rmsnorm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm:
            self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps, bias=False)
            self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps, bias=False)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> q, k, v heads side by side (..., H + 2 Hkv, Dh), q and k normalised, not yet rotated."""
        qkv = self.wqkv(x).unflatten(-1, (-1, self.head_dim))
        if isinstance(self.q_norm, nn.Identity):
            return qkv
        q, k, v = qkv.split([self.n_heads, self.kv_heads, self.kv_heads], dim=-2)
        return torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask, cache=None,
                route=None) -> torch.Tensor:
        """``route(x, f)``: f(block, x) with each modality's block (modality experts; None: this one's weights)."""
        B, L, _ = x.shape
        qkv = self.project(x) if route is None else route(x, lambda b, x: b.attention.project(x))  # (B, L, H+2Hkv, Dh)
        q, k, v = qkv.transpose(1, 2).split([self.n_heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, H, L, Dh), (B, Hkv, L, Dh)
        if cache is not None:  # prepend cached keys/values of earlier positions (Hkv heads only)
            k, v = cache(k, v)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(B, L, -1)  # (B, H, L, Dh) -> (B, L, H Dh)
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
            elif name.endswith("bias"):  # q/k/v biases (qkv_bias)
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask, caches=None,
                is_image: torch.Tensor | None = None) -> torch.Tensor:
        """``is_image`` (B, L): the image positions, which take the image weights when ``modality_experts``."""
        if pos.max() >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(pos.max())} exceeds max_seq_len={self.cfg.max_seq_len}")
        if self.cfg.modality_experts and is_image is None:
            raise ValueError("a transformer with modality_experts needs is_image, the image positions (B, L)")
        # no image position (text, or a decoding step): every position takes the text weights, the dense path; but
        # with gradients the image weights run on no rows, so that every data-parallel rank (DDP, FSDP2) reduces
        # the same gradients whatever its rows hold
        route = self.cfg.modality_experts and (is_image.any() or torch.is_grad_enabled())
        experts = Experts(is_image) if route else None
        rope = rope_angles(pos, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and caches is None
        for i, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, rope, mask, None, experts, use_reentrant=False)
            else:
                x = layer(x, rope, mask, None if caches is None else caches[i], experts)
        if experts is None:
            return self.norm(x)
        return torch.where(is_image[..., None], self.image_norm(x), self.norm(x))
