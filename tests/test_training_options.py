"""Training switches: activation checkpointing changes memory, not results; GPU paths (skipped without CUDA):
FlexAttention with one block mask per batch equals the dense path, and bf16-mixed training runs through the CLI."""

from pathlib import Path

import pytest
import torch

from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    L, n = 48, 4
    tokens = torch.randint(6, 64, (2, L), generator=g)
    doc_ids = torch.zeros(2, L, dtype=torch.long)
    doc_ids[0, 30:] = 1
    image_ids = torch.full((2, L), -1)
    image_ids[0, 10:10 + n], image_ids[1, 20:20 + n], image_ids[1, 40:40 + n] = 0, 1, 2
    latents = torch.randn(3, 4, 4, 4, generator=g)
    t, noise = torch.tensor([10, 500, 999]), torch.randn(3, 4, 4, 4, generator=g)
    return [x.to(device) for x in (tokens, doc_ids, image_ids, latents, t, noise)]


def _loss_and_grads(model, batch):
    tokens, doc_ids, image_ids, latents, t, noise = batch
    out = model.loss(tokens, doc_ids, image_ids, latents, t=t, noise=noise)
    grads = torch.autograd.grad(out["loss"], list(model.parameters()), allow_unused=True)
    return out["loss"], grads


def _model(**overrides):
    cfg = TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=64, latent_size=4,
                            patch_size=2, **overrides)
    model = Transfusion(cfg)
    model.init_weights(0)
    return model


def test_activation_checkpointing_gives_the_same_loss_and_gradients(one_thread):
    model = _model()
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch)
    model.transformer.activation_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    assert torch.equal(loss, loss_ckpt)
    for a, b in zip(grads, grads_ckpt):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_init_weights_is_deterministic_and_keeps_zero_outputs(one_thread):
    a, b = _model(), _model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.patch_decoder.proj.weight.abs().sum() == 0  # starts by predicting zero noise
    torch.testing.assert_close(a.transformer.layers[0].attention.wo.weight.std().item(), 0.01, rtol=0.1, atol=0)


@cuda
def test_flex_attention_on_cuda_equals_dense():
    batch = _batch("cuda")
    dense, flex = _model(attention="sdpa").cuda(), _model(attention="flex").cuda()
    flex.load_state_dict(dense.state_dict())
    loss_d, grads_d = _loss_and_grads(dense, batch)
    loss_f, grads_f = _loss_and_grads(flex, batch)
    torch.testing.assert_close(loss_f, loss_d, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_f, grads_d):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@cuda
def test_bf16_mixed_fit_on_one_gpu(tmp_path, tokenizer_path, autoencoder_ckpt):
    from transfusion.cli import cli_main

    cli = cli_main(["fit", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
                    "--config", str(CONFIGS / "trainer_gpu_bf16.yaml"),
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                    "--model.init_args.preset", "debug", "--data.init_args.seq_len", "64",
                    "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
                    "--trainer.max_steps", "5", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "5",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 5 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
