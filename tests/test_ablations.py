"""The paper's ablations (Tables 5-8) are one-line overrides of a shipped config; each one reaches the model or
the data: intra-image attention, patch encoder, patch size and the image-first noise limit."""

from pathlib import Path

import pytest
import torch
import yaml

from transfusion.cli import cli_main
from transfusion.models.patch import LinearPatchEncoder, UNetPatchDecoder, UNetPatchEncoder
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def _cli(tokenizer, autoencoder, *overrides):
    """Model and data of transfusion_embedded.yaml (debug-sized) with ``overrides``, built but not run."""
    cli = cli_main(["--config", str(CONFIGS / "transfusion_embedded.yaml"),  # run=False: no subcommand
                    "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
                    "--model.init_args.preset", "debug", "--data.init_args.seq_len", "64",
                    "--data.init_args.num_workers", "0", *overrides], run=False)
    cli.datamodule.layout = cli.model.sequence_layout()
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def test_intra_image_attention_switch(tokenizer_path, autoencoder_ckpt):
    module, data = _cli(tokenizer_path, autoencoder_ckpt)
    causal, _ = _cli(tokenizer_path, autoencoder_ckpt, "--model.init_args.bidirectional_images", "false")
    assert module.config.bidirectional_images and not causal.config.bidirectional_images
    row = next(r for r in (data.train_set[i] for i in range(20)) if (r["image_ids"] >= 0).any())
    doc, img = row["doc_ids"][None], row["image_ids"][None]
    first = int((img[0] >= 0).nonzero()[0])
    n = module.config.patches_per_image
    bidir, plain = module.model.attention_mask(doc, img), causal.model.attention_mask(doc, img)
    assert bidir[0, 0, first, first + n - 1]  # the first patch sees the last patch of its image
    assert not plain[0, 0, first, first + n - 1]
    assert torch.equal(plain, torch.tril(plain))


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_patch_encoder_switch(tokenizer_path, autoencoder_ckpt, encoder):
    module, data = _cli(tokenizer_path, autoencoder_ckpt, "--model.init_args.patch_encoder", encoder,
                        "--model.init_args.unet_channels", "16")
    expected = UNetPatchEncoder if encoder == "unet" else LinearPatchEncoder
    assert isinstance(module.model.patch_encoder, expected)
    assert isinstance(module.model.patch_decoder, UNetPatchDecoder) == (encoder == "unet")
    batch = data.train_dataloader().collate_fn([data.train_set[i] for i in range(4)])
    assert torch.isfinite(module._common_step(batch, "train"))


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_patch_size_switch(tokenizer_path, autoencoder_ckpt, patch_size):
    module, data = _cli(tokenizer_path, autoencoder_ckpt, "--model.init_args.patch_size", str(patch_size))
    n = (4 // patch_size) ** 2  # the debug autoencoder's latent is 4x4
    assert module.config.patches_per_image == n and data.layout.patches_per_image == n
    row = next(r for r in (data.train_set[i] for i in range(20)) if len(r["images"]))
    assert int((row["image_ids"] >= 0).sum()) == n * len(row["images"])


def test_patch_size_8_on_an_8x8_latent_and_a_clear_error_otherwise():
    cfg = TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=64, latent_channels=4,
                            latent_size=8, patch_size=8)
    assert cfg.patches_per_image == 1
    model = Transfusion(cfg)
    x = torch.randn(2, 4, 8, 8)
    patches, _ = model.patch_encoder(x, torch.tensor([3, 7]))
    assert patches.shape == (2, 1, 64)
    with pytest.raises(ValueError, match="patch_size=8 must divide the latent size 4"):
        TransfusionConfig(latent_size=4, patch_size=8)


@pytest.mark.parametrize("limit", ["500", "null"])
def test_image_first_noise_limit_switch(tokenizer_path, autoencoder_ckpt, limit):
    module, data = _cli(tokenizer_path, autoencoder_ckpt, "--data.init_args.image_first_max_t", limit)
    tok = module.tokenizer
    seen_first = seen_caption_first = 0
    for i in range(60):
        row = data.train_set[i]
        starts = ((row["tokens"] == tok.bos_id) & (row["image_ids"] < 0)).nonzero().flatten()
        for k, max_t in enumerate(row["max_t"].tolist()):  # documents and images are one to one in pair rows
            image_first = row["tokens"][int(starts[k]) + 1] == tok.boi_id and _has_caption_after(row, k, tok)
            if image_first:
                seen_first += 1
                assert max_t == (500 if limit == "500" else 0)  # 0: the full schedule
            else:
                seen_caption_first += 1
                assert max_t == 0
    assert seen_first > 0 and seen_caption_first > 0


def _has_caption_after(row, k, tok) -> bool:
    """Whether image k is followed by text before its document ends (image first) rather than ending it."""
    positions = (row["image_ids"] == k).nonzero().flatten()
    after = int(positions[-1]) + 2  # skip EOI
    return after < len(row["tokens"]) and row["doc_ids"][after] == row["doc_ids"][int(positions[0])] \
        and row["tokens"][after] != tok.pad_id


def test_every_transfusion_size_has_a_chameleon_config():
    # the sizes of the comparison; other transfusion_*.yaml are variants of them (streamed data, a diffusers VAE)
    for size in ("embedded", "real_cpu", "paper"):
        path = CONFIGS / f"transfusion_{size}.yaml"
        chameleon = yaml.safe_load((CONFIGS / f"chameleon_{size}.yaml").read_text())
        transfusion = yaml.safe_load(path.read_text())
        args = chameleon["model"]["init_args"]
        assert args["preset"] == transfusion["model"]["init_args"]["preset"]
        assert args["qk_norm"] and args["norm_reorder"] and args["z_loss_weight"] == 1e-5
        assert chameleon["data"]["init_args"]["seq_len"] == transfusion["data"]["init_args"]["seq_len"] or size == "embedded"
        if size != "embedded":
            assert args["lr"] == 1e-4
