"""The patch layers (``transfusion/models/patch.py``): patchify / unpatchify round trips in raster order, the
linear and U-Net patch encoders and decoders (shapes, zero-initialised output, timestep dependence, images kept
apart)."""

import pytest
import torch
import torch.nn as nn

from transfusion.models.patch import (
    LinearPatchDecoder,
    LinearPatchEncoder,
    UNetPatchDecoder,
    UNetPatchEncoder,
    build_patch_layers,
    patchify,
    unpatchify,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


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
