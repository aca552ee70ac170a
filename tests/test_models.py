"""Invariants of the transformer body, the patch encoders/decoders and the Transfusion model and loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.data.sequences import SequenceLayout, TransfusionRows
from transfusion.models.attention import dense_mask, positions
from transfusion.models.patch import (
    LinearPatchDecoder,
    LinearPatchEncoder,
    UNetPatchDecoder,
    UNetPatchEncoder,
    build_patch_layers,
    patchify,
    unpatchify,
)
from transfusion.models.transformer import (
    TRANSFORMER_PRESETS,
    Attention,
    Block,
    Transformer,
    TransformerConfig,
    apply_rope,
    rope_angles,
)
from transfusion.models.transfusion import Transfusion, TransfusionConfig

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


# ---------------------------------------------------------------- patchify / unpatchify


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patchify_round_trip_and_raster_order(k, size):
    torch.manual_seed(0)
    N, C = 2, 4
    x = torch.randn(N, C, size, size, dtype=torch.float64)
    p = patchify(x, k)
    g = size // k
    assert p.shape == (N, g * g, C * k * k)
    assert torch.equal(unpatchify(p, k, size, size), x)
    for i in range(g):
        for j in range(g):
            block = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(N, C * k * k)
            assert torch.equal(p[:, i * g + j], block)
    # patch 0 is the top-left block, patch 1 the one to its right
    assert torch.equal(p[:, 0], x[:, :, :k, :k].reshape(N, -1))
    if g > 1:
        assert torch.equal(p[:, 1], x[:, :, :k, k:2 * k].reshape(N, -1))


def test_unpatchify_rectangular():
    x = torch.arange(2 * 3 * 4 * 8, dtype=torch.float64).view(2, 3, 4, 8)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 4, 8), x)


# ---------------------------------------------------------------- encoders / decoders

C_LAT, D_MODEL = 4, 32


@pytest.mark.parametrize("kind", ["linear", "unet"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patch_layer_shapes(kind, k):
    torch.manual_seed(0)
    size = 8
    enc, dec = build_patch_layers(kind, C_LAT, k, D_MODEL, unet_channels=32)
    x = torch.randn(3, C_LAT, size, size)
    t = torch.tensor([1, 500, 1000])
    patches, context = enc(x, t)
    n = (size // k) ** 2
    assert patches.shape == (3, n, D_MODEL)
    hidden = torch.randn(3, n, D_MODEL)
    out = dec(hidden, t, context)
    assert out.shape == (3, C_LAT, size, size)
    # zero-initialised output layer: the decoder starts by predicting zero noise
    assert torch.equal(out, torch.zeros_like(out))


def test_build_patch_layers_rejects_unknown_kind_and_non_power_of_two():
    with pytest.raises(ValueError, match="patch_encoder"):
        build_patch_layers("conv", 4, 2, 32)
    with pytest.raises(ValueError, match="power of two"):
        build_patch_layers("unet", 4, 3, 32)


def test_linear_encoder_adds_one_timestep_vector_to_every_patch():
    torch.manual_seed(0)
    enc = LinearPatchEncoder(C_LAT, 2, D_MODEL).double()
    x = torch.randn(2, C_LAT, 8, 8, dtype=torch.float64)
    t1, t2 = torch.tensor([10, 10]), torch.tensor([900, 900])
    a, ctx = enc(x, t1)
    b, _ = enc(x, t2)
    assert tuple(ctx) == (8, 8)
    diff = b - a  # (N, n, D)
    assert diff.abs().max() > 1e-3
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-12)
    # the same vector for a different latent: it depends on t only
    y = torch.randn(2, C_LAT, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(enc(y, t2)[0] - enc(y, t1)[0], diff, rtol=0, atol=1e-12)
    # without the timestep term the encoder is the linear map of each patch
    emb = enc.t_embed(t1)[:, None]
    torch.testing.assert_close(a - emb, patchify(x, 2) @ enc.proj.weight.T + enc.proj.bias, rtol=0, atol=1e-12)


def test_linear_decoder_is_per_patch_linear_inverse_layout():
    torch.manual_seed(0)
    dec = LinearPatchDecoder(C_LAT, 2, D_MODEL).double()
    nn.init.normal_(dec.proj.weight)
    hidden = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    out = dec(hidden, torch.tensor([1, 2]), (8, 8))
    torch.testing.assert_close(patchify(out, 2), hidden @ dec.proj.weight.T, rtol=0, atol=1e-12)


def test_unet_patches_are_local_to_their_image():
    """Images in a batch never mix in the U-Net encoder/decoder (per-image GroupNorm)."""
    torch.manual_seed(0)
    enc, dec = UNetPatchEncoder(C_LAT, 4, D_MODEL).double(), UNetPatchDecoder(C_LAT, 4, D_MODEL).double()
    nn.init.normal_(dec.conv_out.weight, std=0.1)
    x = torch.randn(3, C_LAT, 8, 8, dtype=torch.float64)
    t = torch.tensor([5, 50, 500])
    p0, s0 = enc(x, t)
    x2 = x.clone()
    x2[1] += 1.0
    p1, s1 = enc(x2, t)
    assert (p1[1] - p0[1]).abs().max() > 1e-6
    torch.testing.assert_close(p1[[0, 2]], p0[[0, 2]], rtol=0, atol=1e-12)
    hidden = torch.randn(3, 4, D_MODEL, dtype=torch.float64)
    e0, e1 = dec(hidden, t, s0), dec(hidden, t, s1)
    torch.testing.assert_close(e1[[0, 2]], e0[[0, 2]], rtol=0, atol=1e-12)
    assert (e1[1] - e0[1]).abs().max() > 1e-6  # skip connections carry the image into the decoder


@pytest.mark.parametrize("channels", [16, 64])  # 16: one channel per GroupNorm group
def test_unet_depends_on_timestep(channels):
    torch.manual_seed(0)
    enc = UNetPatchEncoder(C_LAT, 2, D_MODEL, channels)
    dec = UNetPatchDecoder(C_LAT, 2, D_MODEL, channels)
    nn.init.normal_(dec.conv_out.weight, std=0.1)
    x = torch.randn(2, C_LAT, 8, 8)
    lo, hi = torch.tensor([1, 1]), torch.tensor([999, 999])
    (a, skips), (b, _) = enc(x, lo), enc(x, hi)
    hidden = torch.randn(2, 16, D_MODEL)
    assert (a - b).abs().max() > 1e-3, "encoder output does not depend on t"
    assert (dec(hidden, lo, skips) - dec(hidden, hi, skips)).abs().max() > 1e-3, "decoder output does not depend on t"


# ---------------------------------------------------------------- TransfusionConfig


def test_transfusion_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        TransfusionConfig(latent_size=8, patch_size=3)
    with pytest.raises(ValueError, match="patch_size"):
        TransfusionConfig(latent_size=8, patch_size=16)
    with pytest.raises(ValueError, match="patch_size"):
        TransfusionConfig(patch_size=0)
    with pytest.raises(ValueError, match="patch_encoder"):
        TransfusionConfig(patch_encoder="conv")
    with pytest.raises(ValueError, match="diffusion_lambda"):
        TransfusionConfig(diffusion_lambda=-0.1)
    with pytest.raises(ValueError, match="attention"):
        TransfusionConfig(attention="xformers")
    with pytest.raises(ValueError, match="vocab_size"):
        TransfusionConfig(vocab_size=0)
    assert TransfusionConfig(latent_size=8, patch_size=2).patches_per_image == 16
    assert TransfusionConfig(latent_size=32, patch_size=4).patches_per_image == 64
    assert TransfusionConfig(diffusion_lambda=0.0).diffusion_lambda == 0.0


# ---------------------------------------------------------------- Transfusion.loss

BOS, EOS, PAD, BOI, EOI = 1, 2, 3, 4, 5


def fake_rows(n_patches: int) -> TransfusionRows:
    """TransfusionRows with a stand-in tokenizer: only its ids and encode are used by ``document``."""
    tok = SimpleNamespace(bos_id=BOS, eos_id=EOS, pad_id=PAD, boi_id=BOI, eoi_id=EOI,
                          encode=lambda s: [10 + (ord(c) % 50) for c in s])
    layout = SequenceLayout(tokenizer=tok, patches_per_image=n_patches, image_size=8)
    pairs = [{"image": torch.zeros(3, 8, 8), "captions": ["abc"]}]
    return TransfusionRows(pairs, None, layout, seq_len=64, num_rows=1, text_ratio=0.0)


def build_row(docs: list[list[int]], L: int):
    """Documents of token ids (-1 marking patches) packed into one row of length L -> tokens, doc_ids.
    Padding gets token PAD and document id L."""
    tokens, doc_ids = [], []
    for d, doc in enumerate(docs):
        tokens += doc
        doc_ids += [d] * len(doc)
    tokens = torch.tensor(tokens + [PAD] * (L - len(tokens)))
    doc_ids = torch.tensor(doc_ids + [L] * (L - len(doc_ids)))
    return tokens, doc_ids


def small_model(encoder="linear", lam=5.0, seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=vocab, latent_channels=4,
                            latent_size=4, patch_size=2, patch_encoder=encoder, diffusion_lambda=lam)
    return Transfusion(cfg)


def loss_batch():
    """Row 0: caption-first, image-first and caption-dropped documents packed, then padding.
    Row 1: a text row (documents split at BOS) with a BOI followed by text, then padding."""
    n = 4
    rows = fake_rows(n)
    cap1, cap2 = [20, 21, 22], [30, 31]
    d0 = rows.document(cap1, image_first=False)  # BOS c c c BOI P P P P EOI EOS
    d1 = rows.document(cap2, image_first=True)  # BOS BOI P P P P EOI c c EOS
    d2 = rows.document([], image_first=False)  # BOS BOI P P P P EOI
    assert d0 == [BOS, *cap1, BOI, -1, -1, -1, -1, EOI, EOS]
    assert d1 == [BOS, BOI, -1, -1, -1, -1, EOI, *cap2, EOS]
    assert d2 == [BOS, BOI, -1, -1, -1, -1, EOI]
    L = 32
    t0, doc0 = build_row([d0, d1, d2], L)  # 11 + 10 + 7 = 28 tokens, 4 padding
    text = [BOS, 40, BOI, 41, EOS, BOS, 42, 43, 44, EOS]
    t1 = torch.tensor(text + [PAD] * (L - len(text)))
    doc1 = torch.cumsum((t1 == BOS).long(), 0)
    doc1[len(text):] = L
    tokens = torch.stack([t0, t1])
    doc_ids = torch.stack([doc0, doc1])
    image_ids = torch.full_like(tokens, -1)
    is_patch = tokens == -1
    image_ids[is_patch] = torch.arange(3).repeat_interleave(n)
    tokens[is_patch] = PAD
    # the (input position -> target) pairs that must carry LM loss, by hand
    lm_pairs = [
        # row 0, doc 0 (0..10): BOS->c, c->c, c->c, c->BOI, EOI->EOS
        (0, 0), (0, 1), (0, 2), (0, 3), (0, 9),
        # doc 1 (11..20): BOS->BOI, EOI->c, c->c, c->EOS
        (0, 11), (0, 17), (0, 18), (0, 19),
        # doc 2 (21..27): BOS->BOI only (the document ends at EOI)
        (0, 21),
        # row 1: BOS->40, 40->BOI, (BOI->41 excluded), 41->EOS, BOS->42, 42->43, 43->44, 44->EOS
        (1, 0), (1, 1), (1, 3), (1, 5), (1, 6), (1, 7), (1, 8),
    ]
    return tokens, doc_ids, image_ids, lm_pairs


def test_loss_counts_exactly_the_valid_lm_positions():
    model = small_model().double()
    tokens, doc_ids, image_ids, lm_pairs = loss_batch()
    lat = torch.randn(3, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=BOI)
    assert int(out["text_tokens"]) == len(lm_pairs) == 17
    assert int(out["images"]) == 3
    # each exclusion rule is load-bearing: without boi_id the BOI->text pair counts; without pad_id, PAD->PAD does
    out_no_boi = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=-1)
    assert int(out_no_boi["text_tokens"]) == len(lm_pairs) + 1
    out_no_pad = model.loss(tokens, doc_ids, image_ids, lat, pad_id=-1, boi_id=BOI)
    assert int(out_no_pad["text_tokens"]) == len(lm_pairs) + (4 - 1) + (22 - 1)  # PAD->PAD inside both paddings


def test_loss_values_reproduce_by_hand():
    model = small_model(lam=0.7).double()
    with torch.no_grad():
        nn.init.normal_(model.patch_decoder.proj.weight, std=0.1)  # non-zero noise predictions
    tokens, doc_ids, image_ids, lm_pairs = loss_batch()
    lat = torch.randn(3, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    max_t = torch.tensor([1000, 300, 1000])
    out = model.loss(tokens, doc_ids, image_ids, lat, max_t=max_t, pad_id=PAD, boi_id=BOI,
                     generator=torch.Generator().manual_seed(42))

    # replay the generator: timesteps first, then the noise
    g = torch.Generator().manual_seed(42)
    t = model.schedule.sample_timesteps(3, max_t, generator=g)
    noise = torch.randn(lat.shape, generator=g, dtype=lat.dtype)
    assert 1 <= int(t[1]) <= 300
    x_t = model.schedule.add_noise(lat, noise, t)
    with torch.no_grad():
        hidden, eps = model(tokens, doc_ids, image_ids, x_t, t)
        rows, cols = zip(*lm_pairs)
        logits = model.lm_head(hidden[list(rows), list(cols)])
        lm = F.cross_entropy(logits, tokens[list(rows), [c + 1 for c in cols]])
    per_image = [((eps[i] - noise[i]) ** 2).mean() for i in range(3)]
    ddpm = sum(per_image) / 3
    torch.testing.assert_close(out["lm_loss"].double(), lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ddpm_loss"].double(), ddpm, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["loss"], out["lm_loss"] + 0.7 * out["ddpm_loss"], rtol=1e-6, atol=1e-7)
    assert out["loss"].requires_grad and out["lm_loss"].requires_grad  # parts keep their graph: a trainer may reweight them

    # a fresh generator with another seed draws other noise, so another ddpm loss
    other = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=BOI,
                       generator=torch.Generator().manual_seed(43))
    assert other["ddpm_loss"] != out["ddpm_loss"]


def test_min_snr_weights_each_image_by_its_timestep():
    model = small_model().double()
    with torch.no_grad():
        nn.init.normal_(model.patch_decoder.proj.weight, std=0.1)
    tokens, doc_ids, image_ids, _ = loss_batch()
    lat = torch.randn(3, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 500, 900])  # SNR about 90, 0.9 and 0.02
    noise = torch.randn(lat.shape, dtype=lat.dtype, generator=torch.Generator().manual_seed(1))
    plain = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=BOI, t=t, noise=noise)
    model.cfg.min_snr_gamma = 5.0
    weighted = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=BOI, t=t, noise=noise)
    ab = model.schedule.alpha_bar[t]
    snr = ab / (1 - ab)
    assert snr[0] > 5 > snr[1] > snr[2]
    weights = torch.tensor([5 / float(snr[0]), 1.0, 1.0], dtype=torch.float64)  # min(SNR, 5) / SNR by hand
    torch.testing.assert_close(model.schedule.min_snr_weights(t, 5.0).double(), weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(weighted["ddpm_loss"].double(), (plain["ddpm_per_image"] * weights).mean(),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weighted["ddpm_per_image"], plain["ddpm_per_image"])  # logged unweighted
    assert weighted["ddpm_loss"] < plain["ddpm_loss"]
    with pytest.raises(ValueError, match="min_snr_gamma"):
        TransfusionConfig(min_snr_gamma=0.0)


def test_zero_decoder_gives_ddpm_loss_of_noise_power():
    model = small_model().double()
    tokens, doc_ids, image_ids, _ = loss_batch()
    lat = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    out = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=BOI, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    model.schedule.sample_timesteps(3, generator=g)
    noise = torch.randn(lat.shape, generator=g, dtype=lat.dtype)
    torch.testing.assert_close(out["ddpm_loss"].double(), noise.pow(2).mean(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_text_only_batch_loss_is_finite_and_patch_grads_are_zero(encoder):
    model = small_model(encoder)
    L = 16
    tokens = torch.tensor([[BOS, 10, 11, 12, EOS, BOS, 13, 14, EOS] + [PAD] * 7] * 2)
    doc_ids = torch.cumsum((tokens == BOS).long(), 1)
    doc_ids[:, 9:] = L
    image_ids = torch.full_like(tokens, -1)
    lat = torch.zeros(0, 4, 4, 4)
    out = model.loss(tokens, doc_ids, image_ids, lat, pad_id=PAD, boi_id=BOI)
    assert torch.isfinite(out["loss"]) and out["ddpm_loss"] == 0 and int(out["images"]) == 0
    assert int(out["text_tokens"]) == 2 * 7
    torch.testing.assert_close(out["loss"], out["lm_loss"])
    out["loss"].backward()
    for name, p in list(model.patch_encoder.named_parameters()) + list(model.patch_decoder.named_parameters()):
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p.grad)), name
    assert model.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.transformer.parameters())


def test_forward_rejects_mismatched_patch_count():
    model = small_model()
    tokens, doc_ids, image_ids, _ = loss_batch()
    with pytest.raises(ValueError, match="patch positions"):
        model(tokens, doc_ids, image_ids, torch.randn(2, 4, 4, 4), torch.tensor([1, 2]))


# ---------------------------------------------------------------- overfitting one batch


@pytest.mark.slow
def test_overfits_one_fixed_batch():
    torch.manual_seed(0)
    cfg = TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=2048, latent_channels=4,
                            latent_size=8, patch_size=2, patch_encoder="linear")
    model = Transfusion(cfg)
    n = cfg.patches_per_image  # 16
    rows = fake_rows(n)
    L = 64
    docs0 = [rows.document([100, 101, 102, 103, 104], image_first=False),  # 1 + 5 + 18 + 1 = 25
             rows.document([200, 201, 202, 203], image_first=True)]  # 1 + 18 + 4 + 1 = 24
    docs1 = [rows.document([300, 301, 302, 303, 304, 305, 306], image_first=False)]  # 27
    t0, d0 = build_row(docs0, L)
    t1, d1 = build_row(docs1, L)
    tokens, doc_ids = torch.stack([t0, t1]), torch.stack([d0, d1])
    image_ids = torch.full_like(tokens, -1)
    image_ids[tokens == -1] = torch.arange(3).repeat_interleave(n)
    tokens[tokens == -1] = PAD
    latents = torch.randn(3, 4, 8, 8)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = last = None
    for step in range(200):
        out = model.loss(tokens, doc_ids, image_ids, latents, pad_id=PAD, boi_id=BOI,
                         generator=torch.Generator().manual_seed(1234))
        if first is None:
            first = {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}
    assert first["lm_loss"] > 7.0 and 0.8 < first["ddpm_loss"] < 1.3  # ~ln(2048) and ~E[noise^2] at init
    # Every document opens with BOS at position 0 and sees nothing else (isolated documents, restarted
    # positions), so the token after BOS (100, BOI or 300: three documents) cannot be told apart: the LM loss
    # is bounded below by 3 ln 3 over the 22 LM positions; everything else is determined by its context.
    assert int(out["text_tokens"]) == 22
    bound = 3 * math.log(3) / 22  # ~0.150
    assert bound - 1e-3 < last["lm_loss"] < bound + 0.03, last
    assert last["ddpm_loss"] < 0.01, last
