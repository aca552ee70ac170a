"""The transformer body (``transfusion/models/transformer.py``): presets against the paper's sizes, config
validation, qk_norm and norm_reorder against hand-written attention and residual orderings, RoPE as a rotation
with relative scores."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.models.attention import dense_mask, positions
from transfusion.models.transformer import (
    TRANSFORMER_PRESETS,
    Attention,
    Block,
    Transformer,
    TransformerConfig,
    apply_rope,
    rope_angles,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---------------------------------------------------------------- TransformerConfig presets

PAPER_SIZES = {  # name: (layers, width, heads), the paper's model table
    "0.16B": (16, 768, 12),
    "0.37B": (24, 1024, 16),
    "0.76B": (24, 1536, 24),
    "1.4B": (24, 2048, 16),
    "7B": (32, 4096, 32),
}
BODY_RANGES = {  # non-embedding parameters of the transformer body
    "0.16B": (0.10e9, 0.20e9),
    "0.37B": (0.25e9, 0.40e9),
    "0.76B": (0.60e9, 0.80e9),
    "1.4B": (1.10e9, 1.50e9),
    "7B": (6.0e9, 7.0e9),
}


def expected_body_params(cfg: TransformerConfig) -> int:
    D, F_ = cfg.dim, cfg.ffn_dim
    per_layer = 3 * D * D + D * D + 2 * D * F_ + F_ * D + 2 * D  # wqkv, wo, w13, w2, two RMSNorm weights
    if cfg.qk_norm:
        per_layer += 2 * cfg.head_dim
    return cfg.n_layers * per_layer + D  # + final norm


def test_presets_exist():
    for name in ["debug", "cpu-small", "cpu-base", *PAPER_SIZES]:
        cfg = TransformerConfig.from_name(name)
        assert isinstance(cfg, TransformerConfig)
        assert cfg.dim % cfg.n_heads == 0 and cfg.head_dim % 2 == 0


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_presets_shape_and_size(name):
    cfg = TransformerConfig.from_name(name)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads) == PAPER_SIZES[name]
    assert cfg.max_seq_len >= 4096
    assert cfg.ffn_dim % cfg.ffn_multiple_of == 0 and cfg.ffn_dim >= 8 * cfg.dim / 3
    with torch.device("meta"):
        body = Transformer(cfg)
    n = sum(p.numel() for p in body.parameters())
    assert n == expected_body_params(cfg)
    lo, hi = BODY_RANGES[name]
    assert lo < n < hi, f"{name}: {n / 1e9:.3f}B non-embedding parameters"


def test_7b_matches_llama_ffn_and_sizes_increase():
    assert TransformerConfig.from_name("7B").ffn_dim == 11008  # Llama-2 7B's SwiGLU width
    counts = [expected_body_params(TransformerConfig.from_name(n)) for n in PAPER_SIZES]
    assert counts == sorted(counts)


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError) as e:
        TransformerConfig.from_name("13B")
    msg = str(e.value)
    assert "13B" in msg
    for name in TRANSFORMER_PRESETS:
        assert name in msg


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig.from_name("debug", n_heads=3)
    with pytest.raises(ValueError, match="even"):
        TransformerConfig(dim=60, n_heads=4)  # head width 15
    for field in ("n_layers", "dim", "n_heads", "max_seq_len"):
        with pytest.raises(ValueError, match=field):
            TransformerConfig(**{field: 0})


def test_from_name_overrides_do_not_mutate_presets():
    before = TRANSFORMER_PRESETS["debug"]
    snapshot = (before.n_layers, before.dim, before.qk_norm, before.ffn_dim)
    cfg = TransformerConfig.from_name("debug", qk_norm=True, n_layers=3)
    assert cfg.qk_norm and cfg.n_layers == 3
    assert (before.n_layers, before.dim, before.qk_norm, before.ffn_dim) == snapshot


def test_from_name_dim_override_rederives_ffn_dim():
    assert TransformerConfig.from_name("debug", dim=128).ffn_dim == TransformerConfig(dim=128).ffn_dim == 384


# ---------------------------------------------------------------- qk_norm, norm_reorder, RoPE


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (norm weights away from 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _rope_and_mask(B, L, head_dim):
    doc_ids = torch.zeros(B, L, dtype=torch.long)
    pos = positions(doc_ids)
    return rope_angles(pos, head_dim, 10_000.0), dense_mask(doc_ids, torch.full((B, L), -1))


def _manual_attention(attn: Attention, x, rope, mask, qk_norm: bool):
    B, L, D = x.shape
    H, Dh = attn.n_heads, attn.head_dim
    q, k, v = (x @ attn.wqkv.weight.T).view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q = F.layer_norm(q, (Dh,), attn.q_norm.weight, None, attn.q_norm.eps)
        k = F.layer_norm(k, (Dh,), attn.k_norm.weight, None, attn.k_norm.eps)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, L, D) @ attn.wo.weight.T


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_structure_and_output(qk_norm):
    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("debug", qk_norm=qk_norm)
    attn = Attention(cfg).double()
    _randomise(attn)
    if qk_norm:
        assert isinstance(attn.q_norm, nn.LayerNorm) and isinstance(attn.k_norm, nn.LayerNorm)
        assert attn.q_norm.normalized_shape == (cfg.head_dim,) and attn.q_norm.bias is None
    else:
        assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    B, L = 2, 10
    x = torch.randn(B, L, cfg.dim, dtype=torch.float64)
    rope, mask = _rope_and_mask(B, L, cfg.head_dim)
    out = attn(x, rope, mask)
    torch.testing.assert_close(out, _manual_attention(attn, x, rope, mask, qk_norm), rtol=0, atol=1e-5)
    if qk_norm:  # the switch matters: the same weights without the LayerNorms give different outputs
        assert (_manual_attention(attn, x, rope, mask, qk_norm=False) - out).abs().max() > 1e-3


def test_qk_norm_changes_model_outputs_and_parameter_count():
    torch.manual_seed(0)
    plain = Transformer(TransformerConfig.from_name("debug"))
    normed = Transformer(TransformerConfig.from_name("debug", qk_norm=True))
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(("q_norm" in m or "k_norm" in m) for m in missing) and len(missing) == 4
    extra = sum(p.numel() for p in normed.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 2 * plain.cfg.head_dim  # 2 layers x (q, k) LayerNorm weights
    x = torch.randn(1, 12, 64)
    rope_pos = torch.arange(12)[None]
    mask = dense_mask(torch.zeros(1, 12, dtype=torch.long), torch.full((1, 12), -1))
    assert (plain(x, rope_pos, mask) - normed(x, rope_pos, mask)).abs().max() > 1e-4


@pytest.mark.parametrize("norm_reorder", [False, True])
def test_block_residual_structure(norm_reorder):
    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("debug", norm_reorder=norm_reorder)
    block = Block(cfg).double()
    _randomise(block, seed=1)
    B, L = 2, 9
    x = torch.randn(B, L, cfg.dim, dtype=torch.float64)
    rope, mask = _rope_and_mask(B, L, cfg.head_dim)
    out = block(x, rope, mask)
    attn = lambda z: block.attention(z, rope, mask)  # noqa: E731
    if norm_reorder:  # Chameleon: normalise the branch outputs
        h = x + block.attention_norm(attn(x))
        expected = h + block.ffn_norm(block.ffn(h))
    else:  # pre-norm (Llama)
        h = x + attn(block.attention_norm(x))
        expected = h + block.ffn(block.ffn_norm(h))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    # and it is not the other ordering
    if norm_reorder:
        h2 = x + attn(block.attention_norm(x))
        other = h2 + block.ffn(block.ffn_norm(h2))
    else:
        h2 = x + block.attention_norm(attn(x))
        other = h2 + block.ffn_norm(block.ffn(h2))
    assert (other - out).abs().max() > 1e-3


def test_norm_reorder_bounds_branch_outputs():
    """With norm_reorder each residual branch is RMS-normalised: its RMS equals the (unit) norm weight."""
    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("debug", norm_reorder=True)
    block = Block(cfg).double()
    x = 100 * torch.randn(1, 7, cfg.dim, dtype=torch.float64)
    rope, mask = _rope_and_mask(1, 7, cfg.head_dim)
    seen = {}
    block.attention_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o))
    block.ffn_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("ffn", o))
    out = block(x, rope, mask)
    for key in ("attn", "ffn"):
        rms = seen[key].pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3)
    torch.testing.assert_close(out, x + seen["attn"] + seen["ffn"], rtol=0, atol=1e-10)


def test_rope_is_a_rotation_with_relative_scores():
    torch.manual_seed(0)
    Dh = 16
    q, k = torch.randn(1, 1, 1, Dh), torch.randn(1, 1, 1, Dh)

    def rot(x, p):
        cos, sin = rope_angles(torch.tensor([[p]]), Dh, 10_000.0)
        return apply_rope(x, cos, sin)

    assert torch.allclose(rot(q, 0), q)
    torch.testing.assert_close(rot(q, 37).norm(), q.norm(), rtol=1e-5, atol=0)
    s1 = (rot(q, 10) * rot(k, 3)).sum()
    s2 = (rot(q, 107) * rot(k, 100)).sum()
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-4)
    assert (s1 - (rot(q, 10) * rot(k, 9)).sum()).abs() > 1e-4
