"""Files written by the code before issue 28 (main at 7a332c2) load in this code and compute what that code computed.

``tests/data/legacy`` was made there by ``make_legacy.py`` through the public command and API: a tokenizer, a KL
autoencoder and a VQ-VAE checkpoint, Transfusion (with an EMA) and Chameleon checkpoints of 2 ``transfusion fit``
steps (optimizer state; the flat sampling hyper-parameters ``cfg_scale``, ``num_steps``, ``max_new_tokens`` of the
time), their ``transfusion export`` folders, ``transfusion predict`` outputs, and ``reference.pt``: that code's
outputs on fixed inputs. The checkpoints hold the tokenizer and autoencoder paths relative to the repository root
(as a run from there writes them). In float64 the outputs agree to rounding (bit for bit on the machine that wrote
them); the tolerances only allow for another machine's float kernels.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from transfusion.cli import cli_main
from transfusion.data.modules.resumable import ResumableSampler
from transfusion.generation import ChameleonSamplingOptions, SamplingOptions
from transfusion.lightning.autoencoder import AutoencoderModule, VQAutoencoderModule
from transfusion.lightning.chameleon import ChameleonModule
from transfusion.lightning.ema import EMA
from transfusion.lightning.transfusion import TransfusionModule

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy"
CLASSES = {"transfusion": (TransfusionModule, SamplingOptions),
           "chameleon": (ChameleonModule, ChameleonSamplingOptions)}
FLAT = r"flat sampling arguments .* are deprecated"  # the old hyper-parameters, mapped into the sampling group
TRANSFORMER = '{"n_layers": 1, "dim": 16, "n_heads": 2}'  # as make_legacy.py: the debug preset, smaller
CLOSE = {"rtol": 1e-9, "atol": 1e-12}  # float64


@pytest.fixture(scope="module")
def reference():
    return torch.load(LEGACY / "reference.pt", weights_only=True)


@pytest.fixture(scope="module", params=["checkpoint", "save_pretrained"])
def loaded(request):
    """{name: module in float64, eval mode} for both models, from their checkpoints (loaded from the repository
    root, where the paths they hold resolve, as for the run that wrote them) or from their exports."""
    modules = {}
    for name in CLASSES:
        if request.param == "checkpoint":
            with contextlib.chdir(ROOT), pytest.warns(FutureWarning, match=FLAT):
                modules[name] = CLASSES[name][0].load_from_checkpoint(LEGACY / f"{name}.ckpt", map_location="cpu")
        else:
            with pytest.warns(FutureWarning, match=FLAT):
                modules[name] = CLASSES[name][0].from_pretrained(LEGACY / name)
    return {name: module.double().eval() for name, module in modules.items()}


@pytest.mark.parametrize("name", list(CLASSES))
def test_settings_and_weights_as_saved(loaded, reference, name):
    module, ref = loaded[name], reference[name]
    assert module.sampling == CLASSES[name][1](**ref["sampling"])  # flat keys mapped into the group, values kept
    assert module.weights_source == ref["weights_source"]  # Transfusion: its EMA's, as the old code chose
    tokenizer = module.tokenizer
    for text, tokens, doc_ids in zip(ref["texts"], ref["tokens"], ref["doc_ids"]):
        assert [tokenizer.bos_id, *tokenizer.encode(text)] == tokens[doc_ids >= 0].tolist()


@pytest.mark.parametrize("name", list(CLASSES))
@torch.no_grad()
def test_text_logits_and_losses_as_before(loaded, reference, name):
    module, ref = loaded[name], reference[name]
    at = ref["doc_ids"] >= 0
    torch.testing.assert_close(module.text_logits(ref["tokens"], ref["doc_ids"], at), ref["text_logits"], **CLOSE)
    for rows in ("train", "val"):  # train rows carry row_index: per-image draws; val rows: one generator
        loss = module.validation_step(ref["rows"][rows], 0)
        torch.testing.assert_close(loss.double(), ref["val_loss"][rows].double(), rtol=1e-6, atol=1e-9)


@torch.no_grad()
def test_latents_and_denoising_as_before(loaded, reference):
    module, ref = loaded["transfusion"], reference["transfusion"]
    torch.testing.assert_close(module.encode_images(ref["images"]), ref["latents"], **CLOSE)
    torch.testing.assert_close(module.model.schedule.add_noise(ref["latents"], ref["noise"], ref["t"]), ref["x_t"],
                               **CLOSE)
    row, d = ref["denoise"]["row"], ref["denoise"]
    _, prediction = module.model(row["tokens"], row["doc_ids"], row["image_ids"], d["x_t"], d["t"])
    torch.testing.assert_close(prediction, d["prediction"], **CLOSE)


@torch.no_grad()
def test_codes_as_before(loaded, reference):
    ref = reference["chameleon"]
    assert torch.equal(loaded["chameleon"].autoencoder.encode_codes(ref["images"]), ref["codes"])


@pytest.mark.parametrize("name", list(CLASSES))
def test_generation_as_before(loaded, reference, name):
    module, ref = loaded[name], reference[name]
    assert module.generate_captions(ref["images"], [3, 4]) == ref["captions"]  # greedy, the module's token budget
    torch.testing.assert_close(module.generate_images(["a small red circle in the top left", "a big blue square"],
                                                      [3, 4]), ref["generated"], rtol=1e-7, atol=1e-9)


def test_autoencoder_checkpoints_load(reference):
    ae = AutoencoderModule.load_from_checkpoint(LEGACY / "autoencoder.ckpt", map_location="cpu").double().eval()
    torch.testing.assert_close(ae.encode_latents(reference["transfusion"]["images"]),
                               reference["transfusion"]["latents"], **CLOSE)
    vq = VQAutoencoderModule.load_from_checkpoint(LEGACY / "vqvae.ckpt", map_location="cpu").double().eval()
    assert torch.equal(vq.encode_codes(reference["chameleon"]["images"]), reference["chameleon"]["codes"])


def test_a_moved_checkpoint_names_the_missing_file_and_loads_with_paths_given(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: the checkpoint's relative paths do not resolve
    with pytest.raises(FileNotFoundError, match=r"tokenizer model 'tests/data/legacy/tokenizer\.model' does not exist"):
        TransfusionModule.load_from_checkpoint(LEGACY / "transfusion.ckpt", map_location="cpu")
    with pytest.warns(FutureWarning, match=FLAT):
        module = TransfusionModule.load_from_checkpoint(LEGACY / "transfusion.ckpt", map_location="cpu",
                                                        tokenizer=str(LEGACY / "tokenizer.model"),
                                                        autoencoder=str(LEGACY / "autoencoder.ckpt"))
    ref = reference["transfusion"]
    with torch.no_grad():
        logits = module.double().text_logits(ref["tokens"], ref["doc_ids"], ref["doc_ids"] >= 0)
    torch.testing.assert_close(logits, ref["text_logits"], **CLOSE)


def _predict(name: str, output: Path, where: Path = ROOT, files: tuple[str, ...] = ()) -> None:
    with contextlib.chdir(where):
        cli_main(["predict", "--config", str(ROOT / f"lightning_configs/{name}_embedded.yaml"),
                  "--config", str(ROOT / f"lightning_configs/{name}_embedded_predict.yaml"), *files,
                  "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
                  "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
                  *(["--model.init_args.sampling.num_steps", "4"] if name == "transfusion" else []),  # old: flat
                  "--ckpt_path", str(LEGACY / f"{name}.ckpt"),
                  "--data.init_args.prompts", str(LEGACY / "prompts.jsonl"),
                  "--trainer.callbacks.init_args.output_dir", str(output),
                  "--trainer.default_root_dir", str(output)])  # its config.yaml: not in the repository


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLASSES))
def test_predict_from_a_legacy_checkpoint_writes_what_it_wrote(name, tmp_path):
    """`transfusion predict --ckpt_path` on the old checkpoint: the same records and the same pixels (to 1/255)."""
    _predict(name, tmp_path)
    before = LEGACY / f"{name}_predict"
    records = (tmp_path / "generations.jsonl").read_text()
    assert records == (before / "generations.jsonl").read_text()
    for record in map(json.loads, records.splitlines()):
        for image in record["images"]:
            new, old = (np.asarray(Image.open(folder / image), dtype=int) for folder in (tmp_path, before))
            assert np.abs(new - old).max() <= 1, image


@pytest.mark.slow
def test_predict_from_a_moved_checkpoint_uses_the_files_the_command_names(tmp_path, capsys):
    """Run elsewhere, the checkpoint's relative tokenizer and autoencoder paths do not resolve: the command line's
    own (which exist) are used, with a note, and it writes what it wrote where the checkpoint was made."""
    files = ("--model.init_args.tokenizer", str(LEGACY / "tokenizer.model"),
             "--model.init_args.autoencoder", str(LEGACY / "autoencoder.ckpt"))
    _predict("transfusion", tmp_path / "out", where=tmp_path, files=files)
    assert "the checkpoint's tokenizer tests/data/legacy/tokenizer.model does not exist here" in capsys.readouterr().err
    before = LEGACY / "transfusion_predict"
    assert (tmp_path / "out" / "generations.jsonl").read_text() == (before / "generations.jsonl").read_text()


class _TrainedRows(Callback):
    """The ``row_index`` of every training batch: which rows of the epoch's order a run trained on."""

    def __init__(self):
        self.rows: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows += batch["row_index"].tolist()


@pytest.mark.slow
def test_fit_resumes_from_a_legacy_checkpoint(tmp_path):
    """One more step from the old checkpoint: its optimizer state, step, EMA and data position are taken up."""
    with contextlib.chdir(ROOT):
        cli = cli_main(["--config", "lightning_configs/transfusion_embedded.yaml",
                        "--model.init_args.tokenizer", "tests/data/legacy/tokenizer.model",
                        "--model.init_args.autoencoder", "tests/data/legacy/autoencoder.ckpt",
                        "--model.init_args.preset", "debug", "--model.init_args.transformer", TRANSFORMER,
                        "--model.init_args.warmup_steps", "5",
                        "--trainer.callbacks+=transfusion.lightning.ema.EMA", "--trainer.callbacks.decay=0.9",
                        "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
                        "--data.init_args.num_workers", "0", "--trainer.max_steps", "3",
                        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                        "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
        trained = _TrainedRows()
        cli.trainer.callbacks.append(trained)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=LEGACY / "transfusion.ckpt")
    old = torch.load(LEGACY / "transfusion.ckpt", map_location="cpu", weights_only=True)
    assert cli.trainer.global_step == 3
    state = cli.trainer.optimizers[0].state_dict()["state"]
    assert set(state) == set(old["optimizer_states"][0]["state"])
    assert all(int(s["step"]) == 3 for s in state.values())  # Adam took up the 2 steps of the old state
    ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMA))
    assert ema.updates == next(v for k, v in old["callbacks"].items() if k.startswith("EMA"))["updates"] + 1
    position = old[type(cli.datamodule).__qualname__]  # Lightning restores it under the class name
    hp = cli.datamodule.hparams
    sampler = ResumableSampler(hp.rows_per_epoch, seed=hp.seed)
    sampler.epoch = position["epoch"]
    assert trained.rows == sampler.order()[position["rows"]:][:4].tolist()  # the next rows of the old run
