"""A diffusers ``AutoencoderKL`` folder as Transfusion's frozen autoencoder (``transfusion.models.diffusers_vae``):
encode / decode equal diffusers' own with the pipelines' scaling and shift, the latent-cache fingerprint covers the
weights and the normalisation, bad folders are refused by file and field, and a folder trains through
`transfusion fit`, generates, and round-trips through `transfusion export` / ``from_pretrained`` (``vae/`` inside).
A ``VQModel`` folder does the same for Chameleon: its codes are the ones diffusers' quantizer picks.

The VAEs are tiny (8 and 16 channels, 16px, one downsampling) with random weights, written with ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_vae(folder: Path, latent_channels: int = 4, seed: int = 0, **config) -> Path:
    """A random 16px ``AutoencoderKL`` (downsampling 2) written to ``folder`` in the diffusers layout."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=latent_channels, sample_size=16, **config)
    vae.save_pretrained(folder)
    return folder


def make_vq(folder: Path, seed: int = 0, **config) -> Path:
    """A random 16px ``VQModel`` (downsampling 2, 32 codebook entries) written to ``folder``."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(**{**dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                           latent_channels=4, num_vq_embeddings=32, sample_size=16), **config})
    with torch.no_grad():  # entries spread like the encoder's outputs, so images use many of them
        vq.quantize.embedding.weight.normal_(0, 0.5)
    vq.save_pretrained(folder)
    return folder


def _load(option):
    from transfusion.lightning.autoencoder import AutoencoderModule, load_frozen

    return load_frozen(AutoencoderModule, option)


# SD 1/2 (4 channels, scale only), SD3 / FLUX (16 channels, scale and shift), SDXL-style per-channel mean and std
CASES = {"sd": dict(latent_channels=4, scaling_factor=0.18215),
         "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
         "per_channel": dict(latent_channels=4, scaling_factor=0.5, latents_mean=[0.1, -0.2, 0.3, 0.0],
                             latents_std=[1.5, 0.5, 2.0, 1.0])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_and_decode_equal_diffusers_with_the_pipelines_normalisation(case, tmp_path):
    from diffusers import AutoencoderKL

    settings = CASES[case]
    folder = make_vae(tmp_path / "vae", **settings)
    ae = _load(str(folder))
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    z_ch = settings["latent_channels"]
    assert (ae.config.latent_channels, ae.config.image_size, ae.config.downsample_factor, ae.config.latent_size) == (
        z_ch, 16, 2, 8)

    ref = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    scale, shift = settings["scaling_factor"], settings.get("shift_factor", 0.0)
    mean = torch.tensor(settings.get("latents_mean", [shift] * z_ch)).view(1, z_ch, 1, 1)
    std = torch.tensor(settings.get("latents_std", [1.0] * z_ch)).view(1, z_ch, 1, 1)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():  # as diffusers pipelines: (z - shift) * scale; z / scale + shift (SDXL: mean and std)
        expected_z = (ref.encode(x).latent_dist.mean - mean) * scale / std
        z = ae.encode_latents(x)
        expected_x = ref.decode(z * std / scale + mean).sample.clamp(-1, 1)
        decoded = ae.decode_latents(z)
    assert z.shape == (2, z_ch, 8, 8) and z.dtype == torch.float32
    torch.testing.assert_close(z, expected_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, expected_x, rtol=1e-5, atol=1e-5)
    assert torch.equal(ae.encode_latents(x), z)  # the posterior mean: deterministic

    ae.to(torch.float64)  # dtype handled: inputs follow the weights, outputs are float32
    assert ae.encode_latents(x).dtype == torch.float32 and ae.decode_latents(z).dtype == torch.float32
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 16, 16\)"):
        ae.encode_latents(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("config", [{}, {"lookup_from_codebook": True},
                                    {"norm_type": "spatial", "block_out_channels": (32, 32)}],  # GroupNorm(32)
                         ids=["vq", "lookup_from_codebook", "movq"])
def test_vq_codes_and_decoding_equal_diffusers(config, tmp_path):
    """A VQModel folder as Chameleon's tokenizer: the codes are the entries diffusers' quantizer picks (raster
    order), decoding them equals diffusers' decode of the unquantized latents (which quantizes them)."""
    from diffusers import VQModel

    from transfusion.lightning.autoencoder import VQAutoencoderModule, load_frozen

    folder = make_vq(tmp_path / "vq", **config)
    vq = load_frozen(VQAutoencoderModule, str(folder))
    assert (vq.codebook_size, vq.model.patches_per_image, vq.config.image_size) == (32, 64, 16)
    ref = VQModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h = ref.encode(x).latents  # (N, D, h, w)
        _, _, (_, _, expected_codes) = ref.quantize(h)
        expected = ref.decode(h).sample.clamp(-1, 1)
    codes = vq.encode_codes(x)
    assert codes.shape == (2, 64) and codes.dtype == torch.long and len(codes.unique()) > 2
    assert torch.equal(codes, expected_codes.view(2, 64))
    assert torch.equal(vq.model.encode_codes(x), codes)  # what the generator calls
    torch.testing.assert_close(vq.decode_codes(codes), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        vq.decode_codes(torch.full((1, 64), 32))


def test_image_size_option_and_check(tmp_path):
    folder = make_vae(tmp_path / "vae")
    ae = _load({"path": str(folder), "image_size": 32})  # any multiple of the downsampling factor
    assert ae.config.image_size == 32 and ae.config.latent_size == 16
    assert ae.encode_latents(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"image_size \(15\) must be a positive multiple of .* downsampling factor 2"):
        _load({"path": str(folder), "image_size": 15})
    with pytest.raises(ValueError, match=r"takes path and image_size, got \['scale'\]"):
        _load({"path": str(folder), "scale": 1.0})


def test_fingerprint_covers_weights_and_normalisation(tmp_path):
    from transfusion.data.sources.latent_cache import autoencoder_fingerprint

    folder = make_vae(tmp_path / "vae")
    base = autoencoder_fingerprint(_load(str(folder)))
    assert autoencoder_fingerprint(_load(str(folder))) == base  # a hash of the folder, not of the load

    other = make_vae(tmp_path / "reseeded", seed=1)  # other weights
    assert autoencoder_fingerprint(_load(str(other))) != base
    for field, value in (("scaling_factor", 0.5), ("shift_factor", 0.25)):
        changed = tmp_path / field
        changed.mkdir()
        (changed / "diffusion_pytorch_model.safetensors").write_bytes(
            (folder / "diffusion_pytorch_model.safetensors").read_bytes())
        config = json.loads((folder / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps({**config, field: value}))
        assert autoencoder_fingerprint(_load(str(changed))) != base, field


def test_invalid_folders_are_refused_by_file_and_field(tmp_path):
    from transfusion.lightning.autoencoder import VQAutoencoderModule, load_frozen

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json' does not exist"):
        _load(str(tmp_path / "empty"))

    make_vq(tmp_path / "vq")
    with pytest.raises(ValueError, match=r"vq/config\.json': _class_name is 'VQModel', expected 'AutoencoderKL' "
                                         r"\(a VQModel is Chameleon's autoencoder\)"):
        _load(str(tmp_path / "vq"))
    make_vae(tmp_path / "kl")
    with pytest.raises(ValueError, match=r"kl/config\.json': _class_name is 'AutoencoderKL', expected 'VQModel'"):
        load_frozen(VQAutoencoderModule, str(tmp_path / "kl"))

    folder = make_vae(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))  # the weights have 4
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors' do not fit .*config\.json' "
                                         r"\(latent_channels 16"):
        _load(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "in_channels": 1}))
    with pytest.raises(ValueError, match=r"config\.json': in_channels is 1, the images are RGB \(3\)"):
        _load(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors' does not exist"):
        _load(str(folder))


@pytest.mark.slow
def test_fit_generate_export_and_from_pretrained_with_a_diffusers_vae(tmp_path, tokenizer_path):
    """`transfusion fit` with the folder as autoencoder; the checkpoint generates; `transfusion export` writes
    a folder with vae/ inside that reloads (without the original folder) to the same generations; the latent
    cache made with the folder trains, and is refused after the folder's scaling changes."""
    import shutil

    from safetensors.torch import load_file

    from transfusion.cli import cli_main, main
    from transfusion.export import export
    from transfusion.lightning.transfusion import TransfusionModule

    from test_real_data import coco_fit_args

    folder = make_vae(tmp_path / "sd-vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    _, args = coco_fit_args(tmp_path, "transfusion_real_cpu.yaml", tokenizer_path, str(folder))
    args += ["--model.init_args.sampling.num_steps", "4", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false"]
    steps = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    cli = cli_main(["fit", *args, *steps])
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.config.latent_channels == 16 and cli.model.config.latent_size == 8

    ckpt = cli.trainer.checkpoint_callback.last_model_path
    module = TransfusionModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    captions, seeds = ["a red circle", "a blue square"], [3, 4]
    images = module.generate_images(captions, seeds)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()

    out = export(ckpt, tmp_path / "export")
    assert (out / "vae" / "config.json").is_file() and (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not any(k.startswith("autoencoder.") for k in load_file(out / "model.safetensors"))  # in vae/ only
    assert json.loads((out / "config.json").read_text())["init_args"]["autoencoder"] == {"path": "vae",
                                                                                           "image_size": 16}
    shutil.move(folder, tmp_path / "moved")  # self-contained: the original folder is not needed
    loaded = TransfusionModule.from_pretrained(out)
    assert torch.equal(loaded.generate_images(captions, seeds), images)
    assert loaded.autoencoder_fingerprint == module.autoencoder_fingerprint
    repo = tmp_path / "hf" / "models--someone--tiny" / "snapshots" / ("0" * 40)  # a Hub repo id: file by file
    loaded.save_pretrained(repo)
    (repo.parents[1] / "refs").mkdir()
    (repo.parents[1] / "refs" / "main").write_text("0" * 40)
    from_hub = TransfusionModule.from_pretrained("someone/tiny", cache_dir=tmp_path / "hf", local_files_only=True)
    assert torch.equal(from_hub.generate_images(captions, seeds), images)
    shutil.move(tmp_path / "moved", folder)

    # the latent cache: made with the folder, trained from, refused once the folder's scaling changes
    main(["cache-latents", *args, "--output", str(tmp_path / "latents"), "--batch_size", "8"])
    meta = json.loads((tmp_path / "latents" / "train" / "index.json").read_text())  # a shard set per split
    assert meta["image"] == "latents" and meta["latent_shape"] == [16, 8, 8]
    assert meta["autoencoder_fingerprint"] == module.autoencoder_fingerprint
    cached = ["--data.init_args.latent_cache", str(tmp_path / "latents"), "--trainer.max_steps", "1",
              "--trainer.val_check_interval", "1"]
    assert cli_main(["fit", *args, *cached]).trainer.global_step == 1
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    with pytest.raises(ValueError, match="made by another autoencoder"):
        cli_main(["fit", *args, *cached])


@pytest.mark.slow
def test_chameleon_fit_generate_export_and_code_cache_with_a_diffusers_vqmodel(tmp_path, tokenizer_path):
    """Chameleon with a VQModel folder as its tokenizer: `transfusion fit`, generation from the checkpoint, the
    exported folder (vae/ inside) reloads to the same images, and `transfusion cache-latents` writes its codes."""
    from test_real_data import coco_fit_args

    from transfusion.cli import cli_main, main
    from transfusion.export import export
    from transfusion.lightning.chameleon import ChameleonModule

    folder = make_vq(tmp_path / "vq")
    _, args = coco_fit_args(tmp_path, "chameleon_real_cpu.yaml", tokenizer_path, str(folder))
    args += ["--data.init_args.seq_len", "96", "--trainer.limit_val_batches", "1",  # 64 codes an image
             "--trainer.enable_progress_bar", "false"]
    cli = cli_main(["fit", *args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert (cli.model.config.codebook_size, cli.model.config.patches_per_image) == (32, 64)

    ckpt = cli.trainer.checkpoint_callback.last_model_path
    module = ChameleonModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    captions, seeds = ["a red circle", "a blue square"], [3, 4]
    images = module.generate_images(captions, seeds)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    out = export(ckpt, tmp_path / "export")
    assert (out / "vae" / "config.json").is_file()
    assert torch.equal(ChameleonModule.from_pretrained(out).generate_images(captions, seeds), images)

    main(["cache-latents", *args, "--output", str(tmp_path / "codes"), "--batch_size", "8"])
    meta = json.loads((tmp_path / "codes" / "train" / "index.json").read_text())
    assert meta["image"] == "codes" and meta["latent_shape"] == [64]
    assert meta["autoencoder_fingerprint"] == module.autoencoder_fingerprint
