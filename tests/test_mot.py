"""Modality experts (Mixture-of-Transformers) and starting from a text model (LMFusion).

Tied experts are the dense model exactly; each position passes through its own modality's weights only; the
FLOP count holds the parameters a position uses (checked by hand); the KV cache changes nothing; frozen text
weights keep text-only logits bit-identical through image training.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from transfusion.flops import flop_parameters
from transfusion.generation import IMAGE, SamplingOptions, TransfusionGenerator
from transfusion.models.lmfusion import freeze_text_weights, load_text_weights
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(**transformer):
    """A dense model and a Mixture-of-Transformers model whose image weights are copies of its text weights."""
    torch.manual_seed(0)
    cfg = TransfusionConfig(transformer=TransformerConfig(n_layers=2, dim=64, n_heads=4, **transformer), vocab_size=100)
    dense = Transfusion(cfg)
    with torch.no_grad():  # non-trivial norms and patch decoder (zero-initialised) so that every weight matters
        for name, p in dense.named_parameters():
            if p.dim() == 1 or "patch_decoder" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.2 * torch.randn_like(p))
    mot = Transfusion(replace(cfg, transformer=replace(cfg.transformer, modality_experts=True)))
    mot.load_state_dict(dense.state_dict(), strict=False)
    with torch.no_grad():
        params = dict(mot.named_parameters())
        for name, p in params.items():
            if ".image." in name:
                p.copy_(params[name.replace(".image.", ".")])
        params["transformer.image_norm.weight"].copy_(params["transformer.norm.weight"])
    return dense, mot


def batch():
    B, L = 2, 40
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 100, (B, L), generator=g)
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[1, 30:] = 1
    img = torch.full((B, L), -1)
    img[0, 5:21], img[1, 10:26] = 0, 1
    return tokens, doc, img, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])


@pytest.mark.parametrize("chameleon_norms", [False, True])
def test_tied_experts_equal_the_dense_model_exactly(chameleon_norms):
    dense, mot = pair(qk_norm=chameleon_norms, norm_reorder=chameleon_norms)
    hidden_d, eps_d = dense(*batch())
    hidden_m, eps_m = mot(*batch())
    assert torch.equal(hidden_d, hidden_m) and torch.equal(eps_d, eps_m)
    loss_d = dense.loss(*batch()[:3], batch()[3], generator=torch.Generator().manual_seed(2))
    loss_m = mot.loss(*batch()[:3], batch()[3], generator=torch.Generator().manual_seed(2))
    assert torch.equal(loss_d["loss"], loss_m["loss"])


def test_each_position_passes_through_its_own_modality_only():
    _, mot = pair()
    tokens, doc, img, x_t, t = batch()
    hidden, eps = mot(tokens, doc, img, x_t, t)
    with torch.no_grad():  # change every image weight: text before the first image cannot see it
        for name, p in mot.named_parameters():
            if ".image." in name or "image_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hidden2, eps2 = mot(tokens, doc, img, x_t, t)
    assert torch.equal(hidden[0, :5], hidden2[0, :5]) and torch.equal(hidden[1, :10], hidden2[1, :10])
    assert not torch.allclose(hidden[0, 5:21], hidden2[0, 5:21]) and not torch.allclose(eps, eps2)
    assert not torch.allclose(hidden[0, 21:], hidden2[0, 21:])  # later text attends to the image's keys and values
    # a text-only batch never touches the image weights: zero gradients, yet present, so that data-parallel
    # processes reduce the same parameters whatever their rows hold
    mot.zero_grad(set_to_none=True)
    out = mot.loss(tokens, doc, torch.full_like(img, -1), x_t[:0])
    out["loss"].backward()
    grads = {n: p.grad for n, p in mot.named_parameters()}
    image = [g for n, g in grads.items() if ".image." in n or "image_norm" in n]
    assert image and all(g is not None and not g.any() for g in image)
    assert grads["transformer.layers.0.attention.wqkv.weight"].abs().sum() > 0


def test_flop_parameters_count_one_modality_by_hand():
    dense, mot = pair()
    D, F, layers = 64, 192, 2  # ffn_dim: 64 * ceil(8 * 64 / 3 / 64)
    block = D + 3 * D * D + D * D + D + 2 * D * F + F * D  # norms, wqkv, wo, w13, w2
    assert block == 53_376
    body = layers * block + D  # + final norm
    patch = flop_parameters(dense) - body
    assert patch == sum(p.numel() for n, p in dense.named_parameters() if n.startswith("patch_"))
    assert flop_parameters(mot) == flop_parameters(dense) == 129_552  # a position uses one modality's weights
    non_embedding = sum(p.numel() for n, p in mot.named_parameters() if not n.startswith(("embedding", "lm_head")))
    assert non_embedding == 129_552 + body  # the image weights exist, once more than the text ones


@pytest.fixture(scope="module")
def mot_module(tokenizer_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule

    torch.manual_seed(0)
    m = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", modality_experts=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # see test_generation.py: non-degenerate text and images from an untrained model
        m.model.lm_head.weight.copy_(torch.randn(m.model.lm_head.weight.shape, generator=g))
        m.model.patch_decoder.proj.weight.copy_(0.2 * torch.randn(m.model.patch_decoder.proj.weight.shape, generator=g))
        for name, p in m.model.named_parameters():
            if ".image." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.double().eval()


@pytest.mark.parametrize("prompt", [["a large blue square", IMAGE], "image->text"])
def test_cache_matches_recompute_with_experts(mot_module, prompt):
    from transfusion.data.embedded.shapes import ShapesDataset

    if prompt == "image->text":
        prompt = [ShapesDataset(2, 16, seed=3)[0]["image"].double(), "a"]
    outs = []
    for use_cache in (True, False):
        options = SamplingOptions(num_steps=4, max_new_tokens=5, cfg_scale=3.0, use_cache=use_cache)
        generator = TransfusionGenerator(mot_module.model, mot_module.autoencoder.model, mot_module.tokenizer, options)
        outs.append(generator.generate([prompt], seeds=[5], decode=False)[0])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        if isinstance(a, str):
            assert a == b
        else:
            assert float((a - b).abs().max() / a.abs().max()) < 1e-9


def test_checkpoints_from_before_the_options_load_as_dense_ddpm():
    from transfusion.lightning.checkpoint import check_config, flatten_config

    dense, mot = pair()
    stored = {k: v for k, v in flatten_config(dense.cfg).items()
              if k not in ("objective", "transformer.modality_experts")}  # written before the two options
    check_config(stored, dense.cfg, "an old checkpoint", ("transformer", "objective"))
    with pytest.raises(ValueError, match="transformer.modality_experts: checkpoint False != config True"):
        check_config(stored, mot.cfg, "an old checkpoint", ("transformer", "objective"))


def test_freezing_keeps_only_image_weights_and_patch_layers_trainable():
    _, mot = pair()
    trainable = freeze_text_weights(mot)
    names = {n for n, p in mot.named_parameters() if p.requires_grad}
    assert names and all(".image." in n or "image_norm" in n or n.startswith("patch_") for n in names)
    assert trainable == sum(p.numel() for n, p in mot.named_parameters() if n in names)
    assert not mot.embedding.weight.requires_grad and not mot.lm_head.weight.requires_grad


def test_load_text_weights_refuses_what_does_not_fit():
    dense, mot = pair()
    state = {k: v for k, v in dense.state_dict().items() if not k.startswith("patch_")}
    with pytest.raises(ValueError, match="missing"):
        load_text_weights(mot, {k: v for k, v in state.items() if "layers.1" not in k})
    with pytest.raises(ValueError, match="has shape"):
        load_text_weights(mot, {**state, "transformer.norm.weight": torch.ones(3)})
    copy.deepcopy(mot)  # still a valid module
