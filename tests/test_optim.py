"""The paper's optimisation (``transfusion.lightning.optim``): AdamW without weight decay on norms and biases, a linear
warm-up, then a cosine decay that ends at ``lr * min_lr_ratio``."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from transfusion.lightning.optim import adamw_cosine
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that must not decay, found by what they are: every parameter of a norm layer (by type, or a class
    named *Norm such as RMSNorm) and every bias."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORMS) or type(module).__name__.endswith("Norm")
        for name, _ in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def _groups_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{parameter name: its group's weight decay}; each trainable parameter in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in decay, f"{names[id(p)]} is in two groups"
            decay[names[id(p)]] = group["weight_decay"]
    return decay


def _lrs(config: dict, steps: int) -> list[float]:
    """The learning rate of each optimizer step 0..steps-1 (and after), stepping as Lightning does (interval step)."""
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_norms_and_biases_get_no_weight_decay():
    # every kind of norm the models have: RMSNorm, LayerNorm (qk-norm), GroupNorm (U-Net patch encoder and decoder)
    cfg = TransfusionConfig(transformer=TransformerConfig.from_name("debug", qk_norm=True), vocab_size=64,
                            latent_size=4, patch_size=2, patch_encoder="unet")
    model = Transfusion(cfg)
    model.embedding.weight.requires_grad_(False)  # frozen: in no group
    optimizer = adamw_cosine(model.parameters(), 1e-3, (0.9, 0.95), 1e-8, 0.1, 10, 0.05, 100)["optimizer"]
    decay = _groups_by_name(model, optimizer)
    no_decay = _no_decay_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable and "embedding.weight" not in decay
    assert {n for n, wd in decay.items() if wd == 0.0} == no_decay & trainable
    assert {n for n, wd in decay.items() if wd == 0.1} == trainable - no_decay
    # all kinds are really there: norm weights of each type, biases, and matrices, embeddings and convolutions decay
    assert {"transformer.norm.weight", "transformer.layers.0.attention.q_norm.weight",
            "patch_decoder.norm_out.weight", "patch_decoder.norm_out.bias", "patch_decoder.proj.bias"} <= no_decay
    assert {"lm_head.weight", "transformer.layers.0.attention.wo.weight", "patch_decoder.conv_out.weight"} <= set(
        n for n, wd in decay.items() if wd == 0.1)


@pytest.mark.parametrize("warmup, min_lr_ratio", [(10, 0.05), (0, 0.1), (0, 0.0)])
def test_schedule_warms_up_then_ends_at_min_lr_ratio(warmup, min_lr_ratio):
    lr, total = 3e-4, 100
    param = nn.Parameter(torch.zeros(2, 2))
    lrs = _lrs(adamw_cosine([param], lr, (0.9, 0.95), 1e-8, 0.1, warmup, min_lr_ratio, total), total + 50)
    if warmup:
        assert lrs[:warmup] == pytest.approx([lr * (k + 1) / warmup for k in range(warmup)])  # linear, up to lr
    assert lrs[warmup] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then never increases
    half = warmup + (total - warmup) // 2  # cosine: halfway between lr and its floor at half the decay
    assert lrs[half] == pytest.approx(lr * (min_lr_ratio + (1 - min_lr_ratio) / 2))
    # the last of `total` optimizer steps is one cosine step above the floor, which holds from `total` on
    last_gap = lr * (1 - min_lr_ratio) * (1 - math.cos(math.pi / (total - warmup))) / 2
    assert lrs[total - 1] == pytest.approx(lr * min_lr_ratio + last_gap, rel=1e-9, abs=1e-15)
    assert lrs[total:] == pytest.approx([lr * min_lr_ratio] * 50, rel=1e-12, abs=1e-15)


def test_transfusion_module_optimizes_the_network_with_its_options(tokenizer_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule

    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", lr=2e-3, weight_decay=0.2,
                               warmup_steps=0, min_lr_ratio=0.25)
    network = module.model  # built before the stand-in trainer below, which could not place it
    module.trainer = SimpleNamespace(estimated_stepping_batches=40)  # what configure_optimizers reads of a Trainer
    config = module.configure_optimizers()
    decay = _groups_by_name(network, config["optimizer"])
    assert set(decay) == {n for n, _ in network.named_parameters()}  # the network, not the frozen autoencoder
    no_decay = _no_decay_names(network)
    assert all(wd == (0.0 if n in no_decay else 0.2) for n, wd in decay.items())
    lrs = _lrs(config, 41)
    assert lrs[0] == pytest.approx(2e-3) and lrs[40] == pytest.approx(2e-3 * 0.25)


def test_text_lr_gives_the_text_weights_their_own_groups(tokenizer_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule
    from transfusion.models.lmfusion import is_text_weight

    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", modality_experts=True, lr=3e-3,
                               text_lr=3e-4, warmup_steps=0, min_lr_ratio=0.1)
    network = module.model
    module.trainer = SimpleNamespace(estimated_stepping_batches=20)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    names = {id(p): n for n, p in network.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(lr_of) == set(names.values())
    assert {n for n, lr in lr_of.items() if lr == 3e-4} == {n for n in lr_of if is_text_weight(n)}
    assert {"transformer.layers.0.image.ffn.w2.weight", "patch_encoder.proj.weight"} & set(lr_of) <= {
        n for n, lr in lr_of.items() if lr == 3e-3}
    decay = _groups_by_name(network, optimizer)
    no_decay = _no_decay_names(network)
    assert all(wd == (0.0 if n in no_decay else 0.1) for n, wd in decay.items())
    for _ in range(20):  # one schedule scales both: the ratio stays 10, the floor is min_lr_ratio of each
        assert len({round(g["lr"] / g["initial_lr"], 12) for g in optimizer.param_groups}) == 1
        optimizer.step()
        config["lr_scheduler"]["scheduler"].step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([3e-5, 3e-4])
    with pytest.raises(ValueError, match="text_lr must be > 0"):
        TransfusionModule(tokenizer_path, autoencoder_ckpt, text_lr=0.0)
    with pytest.raises(ValueError, match="text_lr is for text weights that train"):
        TransfusionModule(tokenizer_path, autoencoder_ckpt, modality_experts=True, freeze_text=True, text_lr=1e-4)
