"""Modality experts (Mixture-of-Transformers) on a micro-batch without a noised image, under DDP and FSDP2.

Two gloo processes on the CPU, one of them (or both) with text only. The image weights of a rank without images
must still reach the gradient reduction: under FSDP2 the earlier ``sum(p.sum() for p in image weights) * 0`` mixed
sharded block parameters (DTensors) with the root's unsharded ones and raised in backward; had it not, its zero
gradients would have gone to the shards around FSDP2's reduce-scatter. Every gradient (the image weights' above
all) must equal the one-process reference, the mean of the two ranks' losses, and be the same on both ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from transfusion.lightning.parallel import fully_shard_blocks  # imported before the ranks fork, not in each
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

CONFIG = TransfusionConfig(transformer=TransformerConfig(n_layers=2, dim=32, n_heads=2, modality_experts=True),
                           vocab_size=64, patch_encoder="unet", unet_channels=8)


def _batch(images: bool) -> tuple[torch.Tensor, ...]:
    """One 40-token row; with ``images``, one 8x8 latent (16 patches) at positions 5..20, else none."""
    g = torch.Generator().manual_seed(1)
    tokens, doc = torch.randint(0, CONFIG.vocab_size, (1, 40), generator=g), torch.zeros(1, 40, dtype=torch.long)
    image_ids, latents = torch.full((1, 40), -1), torch.randn(1, 4, 8, 8, generator=g)
    if images:
        image_ids[0, 5:21] = 0
        return tokens, doc, image_ids, latents
    return tokens, doc, image_ids, latents[:0]


def _model() -> Transfusion:
    model = Transfusion(CONFIG)
    model.init_weights(0)
    with torch.no_grad():  # the patch decoder starts at zero: give it weights, so that every gradient is non-zero
        for name, p in model.named_parameters():
            if name.startswith("patch_decoder."):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


CASES = {"one_rank_without": (True, False), "both_without": (False, False)}  # rank 0's and rank 1's row has images


class _Loss(torch.nn.Module):
    """The model's training loss as a forward, as Lightning's DDP wrapper calls ``training_step``."""

    def __init__(self, model: Transfusion):
        super().__init__()
        self.model = model

    def forward(self, rank: int, images: bool) -> torch.Tensor:
        return self.model.loss(*_batch(images), generator=torch.Generator().manual_seed(rank))["loss"]


def _rank(rank: int, strategy: str, out: str) -> None:
    """One gloo process: the model under ``strategy`` ("ddp" or "fsdp2"), one backward per case, its full
    gradients saved."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.{strategy}.rendezvous", rank=rank, world_size=2)
    model = _model()
    if strategy == "fsdp2":
        fully_shard_blocks(model, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
        loss = _Loss(model)
    else:  # find_unused_parameters=False: every parameter must take part on every rank
        loss = torch.nn.parallel.DistributedDataParallel(_Loss(model))
    for case, images in CASES.items():
        model.zero_grad(set_to_none=True)
        loss(rank, images[rank]).backward()
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for n, p in model.named_parameters()}
        torch.save(grads, f"{out}.{strategy}.{case}.{rank}.pt")
    dist.destroy_process_group()


def test_image_free_micro_batch_reduces_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "grads")
    for strategy in ("fsdp2", "ddp"):
        mp.start_processes(_rank, args=(strategy, out), nprocs=2, start_method="fork")

    for case, images in CASES.items():
        reference = _Loss(_model())
        ((reference(0, images[0]) + reference(1, images[1])) / 2).backward()
        expected = {n: p.grad for n, p in reference.model.named_parameters()}
        image_weights = [n for n in expected if ".image." in n or "image_norm" in n]
        assert image_weights and all(g is not None for g in expected.values())
        for strategy in ("fsdp2", "ddp"):
            ranks = [torch.load(f"{out}.{strategy}.{case}.{r}.pt") for r in range(2)]
            for name, grad in expected.items():
                assert all(g[name] is not None for g in ranks), (strategy, case, name)
                assert torch.equal(ranks[0][name], ranks[1][name]), (strategy, case, name)
                torch.testing.assert_close(ranks[0][name], grad, rtol=1e-5, atol=1e-7, msg=f"{strategy} {case} {name}")
        if images[0]:  # rank 0's image trains the image weights (halved by the mean); rank 1 adds zeros
            assert all(expected[n].any() for n in image_weights)
        else:  # text only everywhere: the image weights' gradients are exactly zero, yet reduced
            assert not any(expected[n].any() for n in image_weights)
