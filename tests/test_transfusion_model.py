"""The Transfusion model and its loss (``transfusion/models/transfusion.py``): config validation, exactly the valid
LM positions counted, the loss reproduced by hand (LM cross-entropy, DDPM MSE, lambda, Min-SNR weights), text-only
batches, and one fixed batch overfitted down to its information-theoretic bound."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.data.rows.sequences import SequenceLayout, TransfusionRows
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


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
