"""Training switches: activation checkpointing recomputes the blocks and changes memory, not results; GPU paths
(skipped without CUDA): FlexAttention with one block mask per batch equals the dense path, and bf16-mixed training
runs its matrix multiplies in bf16 through the CLI."""

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

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


def _counted_loss_and_grads(model, batch):
    """Loss and gradients, with the attention calls of each block (forward + recomputation in backward) and the
    bytes autograd saved for backward."""
    calls = [0] * len(model.transformer.layers)
    hooks = [block.attention.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(model.transformer.layers)]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, grads = _loss_and_grads(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return loss, grads, calls, sum(saved)


def test_activation_checkpointing_recomputes_blocks_for_the_same_loss_and_gradients(one_thread):
    model = _model()
    batch = _batch()
    loss, grads, calls, saved = _counted_loss_and_grads(model, batch)
    assert calls == [1] * len(calls)  # stored activations: each block runs once
    model.transformer.activation_checkpointing = True
    loss_ckpt, grads_ckpt, calls_ckpt, saved_ckpt = _counted_loss_and_grads(model, batch)
    assert calls_ckpt == [2] * len(calls)  # each block ran again in backward
    assert saved_ckpt < saved / 2, (saved_ckpt, saved)  # what it did not store: the blocks' inner activations
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


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the tensor inputs of each matrix multiply dispatched while active (below autocast,
    so after its casts)."""

    OPS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm)

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS:
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def matmul_input_dtypes():
    """The input dtypes of the matrix multiplies of every ``nn.Linear`` forward run inside the block (all modules,
    wherever they are built). Only inside Linear: compiled code elsewhere (FlexAttention) never sees the mode."""
    recorder = _MatmulDtypes()

    def enter(module, args):
        if isinstance(module, nn.Linear):
            recorder.__enter__()  # returns the mode: a hook's return value would replace the inputs

    def leave(module, args, out):
        if isinstance(module, nn.Linear):
            recorder.__exit__(None, None, None)

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        yield recorder.seen
    finally:
        pre.remove()
        post.remove()


def _debug_fit(tmp_path, tokenizer_path, autoencoder_ckpt, *overrides):
    """`transfusion fit` with the GPU bf16 trainer overlay (then ``overrides``): 5 debug steps, one validation."""
    from transfusion.cli import cli_main

    return cli_main(["fit", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
                     "--config", str(CONFIGS / "trainer_gpu_bf16.yaml"),
                     "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                     "--model.init_args.preset", "debug", "--data.init_args.seq_len", "64",
                     "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
                     "--trainer.max_steps", "5", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "5",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger.init_args.save_dir", str(tmp_path), *overrides])


def _assert_matmuls_in(cli, seen: list, dtype: torch.dtype) -> None:
    assert cli.trainer.global_step == 5 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    # every projection of every forward pass (5 steps, validation) multiplied inputs of ``dtype``
    assert len(seen) >= 5 * len([m for m in cli.model.model.modules() if isinstance(m, nn.Linear)]), len(seen)
    assert all(set(dtypes) == {dtype} for dtypes in seen), sorted(set(seen), key=str)
    # mixed precision: the weights (and so the optimizer state) stay float32
    assert all(p.dtype == torch.float32 for p in cli.model.model.parameters())


@pytest.mark.slow
@cuda
def test_bf16_mixed_fit_on_one_gpu_multiplies_in_bf16(tmp_path, tokenizer_path, autoencoder_ckpt):
    with matmul_input_dtypes() as seen:
        cli = _debug_fit(tmp_path, tokenizer_path, autoencoder_ckpt)
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.strategy.root_device.type == "cuda"
    _assert_matmuls_in(cli, seen, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_precision_shows_in_the_matmul_inputs_on_cpu(tmp_path, tokenizer_path, autoencoder_ckpt, precision, dtype):
    """The same check where CI runs it (CPU autocast), and its control: full precision multiplies float32."""
    with matmul_input_dtypes() as seen:
        cli = _debug_fit(tmp_path, tokenizer_path, autoencoder_ckpt, "--trainer.accelerator", "cpu",
                        "--trainer.precision", precision)
    _assert_matmuls_in(cli, seen, dtype)
