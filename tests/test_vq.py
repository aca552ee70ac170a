"""The VQ-VAE of the Chameleon baseline: quantizer gradients and losses, dead-code re-initialisation, training
through the CLI with codebook statistics logged, and a checkpoint that loads back."""

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transfusion.lightning.autoencoder import VQAutoencoderModule, load_frozen
from transfusion.models.autoencoder import AutoencoderConfig
from transfusion.models.vq import VectorQuantizer, VQAutoencoder

pytestmark = [pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"), pytest.mark.usefixtures("one_thread")]


def _quantizer() -> VectorQuantizer:
    q = VectorQuantizer(codebook_size=3, dim=2, beta=0.25)
    with torch.no_grad():
        q.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    return q


def test_nearest_code_loss_and_straight_through_gradient():
    q = _quantizer()
    z = torch.tensor([[0.9, 0.2], [0.1, -0.1], [-0.2, 0.7], [1.2, 0.1]]).t().reshape(1, 2, 2, 2).requires_grad_(True)
    z_q, codes, stats = q(z)
    assert codes.flatten().tolist() == [1, 0, 2, 1]
    expected = q.codebook.weight[codes.flatten()].t().reshape(1, 2, 2, 2)
    assert torch.allclose(z_q, expected)  # forward: the codebook entries
    mse = F.mse_loss(z.detach(), expected.detach())
    assert torch.allclose(stats["vq_loss"], mse * 1.25)  # codebook + 0.25 * commitment, equal in value
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, upstream)  # straight-through: dz = d z_q exactly
    assert q.codebook.weight.grad is None  # the reconstruction path does not reach the codebook
    z.grad = None
    stats["vq_loss"].backward()
    e = expected.detach()
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - e) / z.numel())  # commitment pulls z_e only
    used = q.codebook.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [True, True, True]


def test_usage_and_perplexity():
    q = _quantizer()
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]).t().reshape(1, 2, 2, 2)
    _, _, stats = q(z)  # two codes, used equally
    assert stats["usage"].item() == pytest.approx(2 / 3)
    assert stats["perplexity"].item() == pytest.approx(2.0)


def test_dead_codes_are_reinitialised_from_encoder_outputs_and_counted():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, dim=4, usage_decay=0.5, dead_code_threshold=0.1)
    z = torch.randn(2, 4, 3, 3) + 10.0  # far from the initial codebook
    assert q.reset_dead_codes(z) == 8  # usage starts at 0: the first batch initialises every entry from data
    assert (q.codebook.weight.min() > 5).item() and q.codes_reset.item() == 8
    assert torch.equal(q.usage, torch.ones(8))  # grace period
    q.train()
    before = q.codebook.weight.detach().clone()
    for _ in range(6):  # only the entry nearest to this one vector is used; the EMA of the others decays
        _, codes, _ = q(z[:1, :, :1, :1])
    live = int(codes.flatten()[0])
    dead = q.usage < 0.1
    assert dead.sum().item() == 7 and not dead[live]
    assert q.reset_dead_codes(z) == 7 and q.codes_reset.item() == 15
    assert torch.equal(q.codebook.weight[live], before[live])  # live entries untouched
    assert not torch.equal(q.codebook.weight[dead], before[dead])
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(q.codebook.weight[dead].detach(), flat).min(1).values
    assert (nearest < 0.1).all()  # each re-initialised entry sits on an encoder output


def test_vq_autoencoder_shapes_and_codes_roundtrip():
    config = AutoencoderConfig.from_name("debug")
    model = VQAutoencoder(config, codebook_size=32)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, z_e, codes, stats = model(x)
    assert recon.shape == x.shape and z_e.shape == (2, 4, 4, 4) and codes.shape == (2, 4, 4)
    assert torch.equal(model.encode_codes(x), codes.flatten(1))  # (N, h * w) in raster order
    assert torch.allclose(model.decode_codes(codes.flatten(1)), recon.clamp(-1, 1), atol=1e-5)  # = the forward pass
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        model.decode_codes(torch.full((1, 16), 32))
    with pytest.raises(ValueError, match="image_size"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_fit_logs_codebook_statistics_and_checkpoint_loads(vq_ckpt):
    metrics = Path(vq_ckpt).parents[1] / "metrics.csv"
    rows = list(csv.DictReader(open(metrics)))
    train = [r for r in rows if r.get("train/codebook_usage")]
    assert len(train) == 5
    for key in ("train/codebook_perplexity", "train/dead_codes_reset_total", "train/vq_loss", "train/codebook_alive"):
        assert all(r[key] for r in train), key
    unused = 64 * (1 - float(train[0]["train/codebook_usage"]))
    assert float(train[0]["train/dead_codes_reset_total"]) == pytest.approx(unused)  # initialised from data
    assert 1 < float(train[-1]["train/codebook_perplexity"]) <= 64
    assert [r for r in rows if r.get("val/codebook_usage")]
    module = load_frozen(VQAutoencoderModule, vq_ckpt)
    assert module.model.codebook_size == 64 and module.model.patches_per_image == 16 and not module.training
    assert module.model.quantizer.codes_reset.item() == float(train[-1]["train/dead_codes_reset_total"])
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = module.encode_codes(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert module.decode_codes(codes).shape == images.shape
    with pytest.raises(TypeError, match="encode_codes"):
        module.encode_latents(images)


def test_replicas_keep_one_codebook_under_data_parallel(tmp_path):
    """Usage counts are summed over processes and replacements come from rank 0: codebooks stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from vq_replica import replica

    # fork: the children start with torch imported (spawning re-imports it, ~10 s on 2 busy cores)
    mp.start_processes(replica, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    a, b = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert torch.equal(a["codebook"], b["codebook"]) and torch.equal(a["usage"], b["usage"])
    assert a["usage"].sum() > 0


def test_wrong_kind_of_autoencoder_is_refused(vq_ckpt, autoencoder_ckpt):
    from transfusion.lightning.autoencoder import AutoencoderModule

    with pytest.raises(ValueError, match=r"(expected|not a checkpoint of) AutoencoderModule"):
        load_frozen(AutoencoderModule, vq_ckpt)
    with pytest.raises(ValueError, match=r"(expected|not a checkpoint of) VQAutoencoderModule"):
        load_frozen(VQAutoencoderModule, autoencoder_ckpt)
