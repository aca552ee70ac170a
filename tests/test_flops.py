"""FLOP accounting: N by hand for both models, 6ND, attention pairs against the real masks, and the
cumulative count through `transfusion fit` equal to the positions the data loader actually served."""

from pathlib import Path

import pytest
import torch

from transfusion.cli import cli_main
from transfusion.flops import (FlopCounter, attention_flops, attention_pairs, checkpoint_flops, flop_parameters,
                              training_flops)
from transfusion.models.attention import dense_mask
from transfusion.models.chameleon import Chameleon, ChameleonConfig
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def test_parameter_counts_by_hand():
    # debug body: 2 layers, D 64, ffn 192: wqkv 12288 + wo 4096 + w13 24576 + w2 12288 + 2 norms 128, + final norm 64
    body = 2 * (12288 + 4096 + 24576 + 12288 + 128) + 64
    transfusion = Transfusion(TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=100,
                                                latent_channels=4, latent_size=4, patch_size=2))
    # linear patch layers, C 4, k 2: in 16*64+64, timestep MLP 256*64+64 + 64*64+64, out 64*16+16
    patch = (16 * 64 + 64) + (256 * 64 + 64 + 64 * 64 + 64) + (64 * 16 + 16)
    assert flop_parameters(transfusion) == body + patch == 129552
    chameleon = Chameleon(ChameleonConfig(transformer=TransformerConfig.from_name("debug", qk_norm=True),
                                          text_vocab_size=100, codebook_size=30, patches_per_image=4))
    assert flop_parameters(chameleon) == body + 2 * 2 * 16  # + QK LayerNorm weights (head width 16), no embeddings


def test_formulas():
    assert training_flops(1_000, 2_000) == 12_000_000
    assert training_flops(7e9, 2e12) == pytest.approx(8.4e22)  # the paper's large run: 6 * 7B * 2T
    assert attention_flops(2, 64, 10) == 12 * 2 * 64 * 10
    counter = FlopCounter(params=10, n_layers=2, dim=8)
    counter.add(100, 40)
    counter.add(50, 10)
    assert counter.summary() == {"params": 10, "tokens": 150, "flops": 6 * 10 * 150, "attention_pairs": 50,
                                 "exact_flops": 6 * 10 * 150 + 12 * 2 * 8 * 50}
    restored = FlopCounter(params=10, n_layers=2, dim=8)
    restored.load_state_dict(counter.state_dict())
    assert restored.flops == counter.flops


@pytest.mark.parametrize("bidirectional", [True, False])
def test_attention_pairs_match_the_mask(bidirectional):
    # row 0: doc A (text, image of 4, text), doc B (image of 4), padding; row 1: one text document
    doc_ids = torch.tensor([[0] * 8 + [1] * 6 + [9] * 2, [0] * 16])
    image_ids = torch.full((2, 16), -1)
    image_ids[0, 2:6], image_ids[0, 9:13] = 0, 1
    real = torch.ones(2, 16, dtype=torch.bool)
    real[0, 14:] = False
    mask = dense_mask(doc_ids, image_ids, bidirectional)[:, 0]  # (B, L, L)
    expected = sum(int(mask[b][real[b]][:, real[b]].sum()) for b in range(2))
    assert attention_pairs(doc_ids, image_ids, real, bidirectional) == expected
    assert expected == 36 + 21 + 136 + (2 * 6 if bidirectional else 0)


def test_fit_counts_every_trained_position(tmp_path, tokenizer_path, autoencoder_ckpt):
    steps = 3
    cli = cli_main(["fit", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                    "--model.init_args.preset", "debug", "--data.init_args.seq_len", "64",
                    "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                    "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    module, pad = cli.model, cli.model.tokenizer.pad_id
    tokens = pairs = 0
    for _, batch in zip(range(steps), cli.datamodule.train_dataloader()):  # the same seeded order as training
        real = (batch["image_ids"] >= 0) | (batch["tokens"] != pad)
        tokens += int(real.sum())
        pairs += attention_pairs(batch["doc_ids"], batch["image_ids"], real, bidirectional=True)
    assert module.flop_counter.params == flop_parameters(module.model)
    path = cli.trainer.checkpoint_callback.last_model_path
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint_flops(path) == ckpt["flops"]
    assert ckpt["flops"]["tokens"] == tokens and ckpt["flops"]["attention_pairs"] == pairs
    assert ckpt["flops"]["flops"] == 6.0 * module.flop_counter.params * tokens
    assert ckpt["state_dict"]["flop_counter.tokens"].item() == tokens  # restored on resume
    old = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("flop_counter.")}}
    module.on_load_checkpoint(old)  # checkpoints from before FLOP accounting load, starting from zero
    module.load_state_dict(old["state_dict"])
    assert module.flop_counter.tokens.item() == 0
