"""What Transfusion's and Chameleon's LightningModules share (``GenerativeModule``): the network built in
``configure_model`` from the seed alone (not at construction, not from the global random stream), and validation
losses that are means over every target of the epoch (token-weighted), whatever the batches hold."""

import lightning as L
import pytest
import torch

from transfusion.data.modules.embedded import TransfusionDataModule
from transfusion.lightning.eval_losses import EvalLosses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_losses_weigh_each_mean_by_its_count_and_skip_empty_ones():
    losses = EvalLosses(["lm_loss", "image_loss", "per_image"])
    losses.update("lm_loss", torch.tensor(2.0), torch.tensor(30))  # 30 targets at 2.0, 1 at 4.0: not (2 + 4) / 2
    losses.update("lm_loss", torch.tensor(4.0), 1)
    losses.update("image_loss", torch.tensor(float("nan")), torch.tensor(0))  # a batch without images: its NaN mean
    losses.update("per_image", torch.tensor([1.0, 2.0, 6.0]))  # per-item values
    means = losses.compute()
    assert means["lm_loss"].item() == pytest.approx(64 / 31) and means["per_image"].item() == 3.0
    assert torch.isnan(means["image_loss"])  # nothing was measured: NaN, not 0
    assert all(torch.isnan(v) for v in losses.compute().values())  # compute resets


@pytest.fixture(scope="module")
def modules(tokenizer_path, autoencoder_ckpt, vq_ckpt):
    from transfusion.lightning.chameleon import ChameleonModule
    from transfusion.lightning.transfusion import TransfusionModule

    return {"transfusion": lambda: TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug"),
            "chameleon": lambda: ChameleonModule(tokenizer_path, vq_ckpt, preset="debug")}


def _validate_recording(module, seed: int, monkeypatch) -> tuple[dict, list[dict]]:
    """``trainer.validate`` on 7 rows in batches of 3, 3, 1 (text and caption rows mixed: the batches hold very
    different numbers of text targets); returns the logged figures and each batch's outputs of the network's loss."""
    outputs, loss = [], module.network_class.loss
    monkeypatch.setattr(module.network_class, "loss", lambda *args, **kwargs: outputs.append(loss(*args, **kwargs))
                        or outputs[-1])
    data = TransfusionDataModule(seq_len=48, batch_size=3, val_rows=7, rows_per_epoch=8, num_examples=64,
                                 text_ratio=1.0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(seed)
    torch.rand(100)  # the global stream moves on: the network's weights must not depend on it
    trainer.validate(module, datamodule=data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, outputs


def _weighted(outputs: list[dict], key: str, count) -> float:
    counts = [float(count(o)) for o in outputs]
    values = [float(o[key]) if c else 0.0 for o, c in zip(outputs, counts)]  # a mean over nothing adds nothing
    return sum(v * c for v, c in zip(values, counts)) / sum(counts)


@pytest.mark.parametrize("kind", ["transfusion", "chameleon"])
def test_the_network_is_built_in_configure_model_from_the_seed_alone(modules, kind, monkeypatch):
    module = modules[kind]()
    assert "model" not in module._modules  # nothing built at construction
    _validate_recording(module, 5, monkeypatch)
    reference = module.network_class(module.config)
    reference.init_weights(5)  # what 1 process, DDP and FSDP2 (sharded, on the meta device first) all start from
    built = dict(module.model.named_parameters())
    assert built.keys() == dict(reference.named_parameters()).keys()
    assert all(torch.equal(built[name], p) for name, p in reference.named_parameters())


@pytest.mark.parametrize("kind", ["transfusion", "chameleon"])
def test_val_losses_are_token_weighted_over_the_epoch(modules, kind, monkeypatch):
    torch.manual_seed(0)  # the same weights whatever ran before
    module = modules[kind]()
    with torch.no_grad():  # built before the Trainer (so kept); a random head gives batches losses far apart
        module.model.lm_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    logged, outputs = _validate_recording(module, 0, monkeypatch)
    text = [int(o["text_tokens"]) for o in outputs]
    assert len(outputs) == 3 and len(set(text)) == 3  # batches with different numbers of text targets
    lm = _weighted(outputs, "lm_loss", lambda o: o["text_tokens"])
    row_weighted = sum(float(o["lm_loss"]) * rows for o, rows in zip(outputs, (3, 3, 1))) / 7  # Chameleon's before
    assert abs(lm - row_weighted) > 1e-3 * lm  # the weighting matters on these batches: 100x the tolerance below
    assert logged["val/lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert logged["val/lm_ppl"] == pytest.approx(torch.tensor(lm).exp().item(), rel=1e-5)
    if kind == "transfusion":
        ddpm = _weighted(outputs, "ddpm_loss", lambda o: o["images"])
        assert logged["val/ddpm_loss"] == pytest.approx(ddpm, rel=1e-5)
        assert logged["val/loss"] == pytest.approx(lm + 5.0 * ddpm, rel=1e-5)
    else:
        targets = lambda o: o["text_tokens"] + o["image_tokens"]  # noqa: E731
        assert logged["val/image_loss"] == pytest.approx(_weighted(outputs, "image_loss", lambda o: o["image_tokens"]),
                                                         rel=1e-5)
        assert logged["val/z_loss"] == pytest.approx(_weighted(outputs, "z_loss", targets), rel=1e-5)
        assert logged["val/loss"] == pytest.approx(_weighted(outputs, "loss", targets), rel=1e-5)
