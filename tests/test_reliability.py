"""Reliability: a run killed with SIGKILL resumes exactly; checkpoints are atomic, plain and checked
against the config; non-finite steps are skipped or stop training; bad options fail at start-up.

(Bad data files are tested in test_bad_data.py.)
"""

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfusion.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_configs"


# ----------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL

def _fit_command(root: Path, tokenizer: str, autoencoder: str, steps: int, *extra: str) -> list[str]:
    """`transfusion fit` on the debug preset: checkpoint (last.ckpt only) and log the loss every step."""
    overlay = root / "every_step.yaml"
    root.mkdir(parents=True, exist_ok=True)
    overlay.write_text(
        "trainer:\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: {root}, name: logs, flush_logs_every_n_steps: 1}}\n"
        "  callbacks:\n"
        "    - class_path: transfusion.lightning.callbacks.LastStepCheckpoint\n"
        "      init_args: {every_n_train_steps: 1, save_last: true, save_top_k: 0}\n"
        "    - class_path: transfusion.lightning.nonfinite.NonFiniteGuard\n")
    return [sys.executable, "-m", "transfusion.cli", "fit",
            "--config", str(CONFIGS / "transfusion_embedded.yaml"), "--config", str(overlay),
            "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
            "--model.init_args.preset", "debug", "--model.init_args.warmup_steps", "3",
            # 24 rows of 4: an epoch is 6 steps, so the runs cross an epoch boundary; one data worker
            "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4", "--data.init_args.rows_per_epoch", "24",
            "--data.init_args.num_workers", "1", "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


def _finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``communicate`` with a timeout; a process that hangs is killed, so it cannot outlive the test."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


def _losses(root: Path, version: str = "*") -> dict[int, list[str]]:
    """{step: [train/loss as written, ...]} over the runs (versions) under ``root``; a torn last line is ignored."""
    losses: dict[int, list[str]] = {}
    for path in sorted((root / "logs").glob(f"version_{version}/metrics.csv")):
        for row in csv.DictReader(path.open()):
            try:
                losses.setdefault(int(row["step"]), []).append(repr(float(row["train/loss"])))
            except (KeyError, TypeError, ValueError):
                continue
    return losses


@pytest.mark.slow
@pytest.mark.distributed  # several processes (2 runs side by side, a data worker each)
def test_sigkill_then_resume_gives_the_same_losses(sigkill_resumed):
    """The shared run of conftest.py (two EMAs on; test_ema.py asserts their weights): killed with SIGKILL
    mid-epoch, then ``--ckpt_path last`` gives bitwise the losses of the uninterrupted run."""
    run, steps = sigkill_resumed, sigkill_resumed.steps
    assert run.killed_returncode == -signal.SIGKILL
    assert 3 <= max(run.before) < steps - 1
    assert run.saved_step >= 3  # the last.ckpt left by the kill is complete, and plain (weights_only)
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]

    reference = _losses(run.straight)
    assert sorted(reference) == list(range(steps))
    after = _losses(run.root)
    assert sorted(after) == list(range(steps))
    assert min(_losses(run.root, "1")) == run.saved_step  # continued from the checkpoint, not from step 0
    for step, values in after.items():  # steps run twice (after the last checkpoint, before the kill) agree too
        assert set(values) == set(reference[step]), (step, values, reference[step])


def test_autoencoder_resume_is_exact_too(tmp_path, one_thread):
    """The autoencoder's posterior samples and data order also survive an interruption (in-process)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from transfusion.data.modules.image import ImageDataModule
    from transfusion.lightning.autoencoder import AutoencoderModule

    class Crash(Exception):
        pass

    class Record(L.Callback):
        def __init__(self, crash_at=None):
            self.losses, self.crash_at = {}, crash_at

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[trainer.global_step] = float(outputs["loss"])
            if trainer.global_step == self.crash_at:
                raise Crash  # before this step's checkpoint (ModelCheckpoint runs last)

    def fit(name, record, ckpt_path=None):
        L.seed_everything(0)
        module = AutoencoderModule("debug", image_size=16)
        data = ImageDataModule(image_size=16, num_train=40, num_val=8, batch_size=8)  # 5 steps an epoch
        every_step = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[record, every_step])
        trainer.fit(module, data, ckpt_path=ckpt_path)

    fit("straight", straight := Record())
    with pytest.raises(Crash):
        fit("crashed", crashed := Record(crash_at=4))
    fit("crashed", resumed := Record(), ckpt_path=tmp_path / "crashed" / "last.ckpt")
    assert sorted(straight.losses) == list(range(1, 9)) and min(resumed.losses) == 4
    assert {**crashed.losses, **resumed.losses} == straight.losses


def test_resumable_sampler_order_shards_and_start():
    from transfusion.data.modules.resumable import ResumableSampler

    full = list(ResumableSampler(10, seed=3))
    assert sorted(full) == list(range(10)) and full != list(range(10)) and full == list(ResumableSampler(10, seed=3))
    other_epoch = ResumableSampler(10, seed=3)
    other_epoch.set_epoch(1)
    assert sorted(other_epoch) == list(range(10)) and list(other_epoch) != full  # a new order every epoch
    ranks = [list(ResumableSampler(10, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3] and len(set(sum(ranks, []))) == 9  # disjoint, equal, tail dropped
    resumed = ResumableSampler(10, seed=3)
    resumed.start_row = 4
    assert list(resumed) == full[4:] and len(resumed) == 10  # len: the whole epoch, as Lightning counts it
    resumed.set_epoch(1)
    assert list(resumed) == list(other_epoch)  # the next epoch starts at its beginning
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0)


# ----------------------------------------------------------------------------------------------------------
# checkpoints: atomic, plain, exported as safetensors, checked against the config

def _quick_fit(root: Path, tokenizer: str, autoencoder: str, steps: int = 2, *extra: str):
    return cli_main(["fit", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
                     "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
                     "--model.init_args.preset", "debug", "--data.init_args.seq_len", "64",
                     "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                     "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                     "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    """A 2-step debug Transfusion checkpoint written by `transfusion fit`."""
    torch.set_num_threads(1)
    cli = _quick_fit(tmp_path_factory.mktemp("trained"), tokenizer_path, autoencoder_ckpt)
    from transfusion.lightning.checkpoint import AtomicCheckpointIO

    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the CLI's default
    return cli.trainer.checkpoint_callback.last_model_path


def test_checkpoint_is_written_atomically(tmp_path):
    from transfusion.lightning.checkpoint import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:  # torch.save fails half-way through writing
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "x": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# The writer process: one whole checkpoint, then torch.save is made to write half of the next one and SIGKILL its
# own process, so the kill lands mid-write every time (not when a race happens to allow it).
TORN_WRITER = """
import io, os, signal, sys, torch
from transfusion.lightning.checkpoint import AtomicCheckpointIO
writer, path = AtomicCheckpointIO(), sys.argv[1]
writer.save_checkpoint({"i": 0, "w": torch.arange(100_000.0)}, path)
save = torch.save

def torn_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print(len(data) // 2, flush=True)  # the torn file's size
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = torn_save
writer.save_checkpoint({"i": 1, "w": torch.zeros(100_000)}, path)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", TORN_WRITER, str(path)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    out, err = _finish(writer, 120)
    assert writer.returncode == -signal.SIGKILL, err[-3000:]  # killed inside torch.save, not after it
    checkpoint = torch.load(path, weights_only=True)  # the previous checkpoint, whole
    assert checkpoint["i"] == 0 and torch.equal(checkpoint["w"], torch.arange(100_000.0))
    (torn,) = [p for p in tmp_path.iterdir() if p != path]  # the half-written file, left by the kill
    assert torn.stat().st_size == int(out.split()[-1]) > 0
    with pytest.raises(Exception):
        torch.load(torn, weights_only=True)
    # `--ckpt_path last` resumes from the whole checkpoint, never from the newer torn file
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from transfusion.cli import find_last_checkpoint

    trainer = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path)], loggers=[],
                              default_root_dir=str(tmp_path))
    assert find_last_checkpoint(trainer) == str(path)


def test_fit_checkpoint_is_plain_and_records_config_and_data_position(trained):
    checkpoint = torch.load(trained, weights_only=True)  # executes no pickled code
    json_types = (str, int, float, bool, type(None), list, dict)
    assert all(isinstance(v, json_types) for v in checkpoint["hyper_parameters"].values())
    assert checkpoint["transfusion_config"]["transformer.n_layers"] == 2
    # the data position, in the trainer's own epoch count: 2 batches of 4 rows
    assert checkpoint["TransfusionDataModule"] == {"epoch": checkpoint["epoch"], "rows": 8}
    assert not list(Path(trained).parent.glob(".*.tmp"))


def test_checkpoint_from_another_config_names_the_fields(trained):
    from transfusion.lightning.transfusion import TransfusionModule

    with pytest.raises(ValueError, match=r"transformer\.n_layers: checkpoint 2 != config 3") as error:
        TransfusionModule.load_from_checkpoint(trained, transformer={"n_layers": 3, "dim": 96})
    assert "transformer.dim: checkpoint 64 != config 96" in str(error.value)
    with pytest.raises(ValueError, match=r"patch_size: checkpoint 2 != config 4"):
        TransfusionModule.load_from_checkpoint(trained, patch_size=4)
    TransfusionModule.load_from_checkpoint(trained, diffusion_lambda=1.0)  # not part of the weights: allowed


def test_resuming_fit_with_another_config_names_the_fields(trained, tmp_path, tokenizer_path, autoencoder_ckpt):
    with pytest.raises(ValueError, match=r"mismatched fields:\n  transformer\.n_layers: checkpoint 2 != config 1"):
        _quick_fit(tmp_path, tokenizer_path, autoencoder_ckpt, 4, "--model.init_args.transformer", "{n_layers: 1}",
                   "--ckpt_path", trained)


def test_safetensors_export_and_import(trained, tmp_path, capsys):
    from safetensors import safe_open

    from transfusion.cli import main
    from transfusion.lightning.transfusion import TransfusionModule

    main(["export", "--ckpt_path", trained, "--output", str(tmp_path / "export")])
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                      "tokenizer.model"]
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        assert "autoencoder.model.latent_std" in f.keys() and "model.lm_head.weight" in f.keys()

    original = TransfusionModule.load_from_checkpoint(trained, map_location="cpu").eval()
    imported = TransfusionModule.from_pretrained(tmp_path / "export")
    assert imported.config == original.config and not imported.training
    for (name, a), (_, b) in zip(original.state_dict().items(), imported.state_dict().items()):
        assert torch.equal(a, b), name
    assert imported.tokenizer.encode("a red circle") == original.tokenizer.encode("a red circle")

    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x")])
    assert "missing.ckpt" in capsys.readouterr().err


def test_autoencoder_export_and_import(autoencoder_ckpt, tmp_path):
    from transfusion.export import export
    from transfusion.lightning.autoencoder import AutoencoderModule

    original = AutoencoderModule.load_from_checkpoint(autoencoder_ckpt, map_location="cpu").eval()
    imported = AutoencoderModule.from_pretrained(export(autoencoder_ckpt, tmp_path / "ae"))
    assert isinstance(imported, AutoencoderModule) and imported.config == original.config
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(imported.encode_latents(images), original.encode_latents(images))  # latent_std included


# ----------------------------------------------------------------------------------------------------------
# numerical faults

def _poisoned_run(tokenizer: str, autoencoder: str, guard, poison_step: int | None = 2, steps: int = 4):
    """Train in-process with the loss of step ``poison_step`` (None: every step) multiplied by NaN."""
    import lightning as L

    from transfusion.data.modules.embedded import TransfusionDataModule
    from transfusion.lightning.transfusion import TransfusionModule

    class Poisoned(TransfusionModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            poisoned = poison_step is None or self.global_step == poison_step
            return loss * float("nan") if poisoned else loss

    module = Poisoned(tokenizer, autoencoder, warmup_steps=0)
    data = TransfusionDataModule(seq_len=64, batch_size=4, rows_per_epoch=64, val_rows=4, layout=module.sequence_layout())
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[guard] if guard is not None else [])
    trainer.fit(module, data)
    return module, trainer


def _all_finite(module) -> bool:
    return all(bool(p.isfinite().all()) for p in module.parameters())


def test_nonfinite_step_is_skipped_and_counted(tokenizer_path, autoencoder_ckpt, one_thread):
    from transfusion.lightning.nonfinite import NonFiniteGuard

    unguarded, _ = _poisoned_run(tokenizer_path, autoencoder_ckpt, None)
    assert not _all_finite(unguarded)  # the injected NaN does reach the weights without the guard

    guard = NonFiniteGuard(action="skip")
    with pytest.warns(UserWarning, match=r"skipping step 2 \(epoch 0, batch 2\): loss nan, non-finite gradient in"):
        module, trainer = _poisoned_run(tokenizer_path, autoencoder_ckpt, guard)
    assert _all_finite(module) and trainer.global_step == 4
    assert guard.skipped == 1 and guard.consecutive == 0  # later steps trained normally
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    assert guard.state_dict() == {"skipped": 1, "consecutive": 0}  # kept in checkpoints


def test_nonfinite_step_can_stop_training_naming_step_batch_and_parameter(tokenizer_path, autoencoder_ckpt, one_thread):
    from transfusion.lightning.nonfinite import NonFiniteError, NonFiniteGuard

    with pytest.raises(NonFiniteError, match=r"step 2 \(epoch 0, batch 2\).*model\.embedding\.weight"):
        _poisoned_run(tokenizer_path, autoencoder_ckpt, NonFiniteGuard(action="stop"))
    with pytest.raises(NonFiniteError, match="2 consecutive steps skipped"):  # diverged: every step non-finite
        _poisoned_run(tokenizer_path, autoencoder_ckpt, NonFiniteGuard(max_consecutive_skips=2), poison_step=None)
    with pytest.raises(ValueError, match="action"):
        NonFiniteGuard(action="ignore")


# ----------------------------------------------------------------------------------------------------------
# bad options: a one-line error naming the option, before any data is read

BAD_OPTIONS = [
    (["--model.init_args.diffusion_lambda", "-1"], "diffusion_lambda must be >= 0"),
    (["--model.init_args.patch_size", "3"], "patch_size=3 must divide the latent size 4"),
    (["--model.init_args.transformer", "{n_heads: 5}"], "n_heads=5 must divide dim=64"),
    (["--model.init_args.transformer", "{n_layer: 3}"], r"unknown transformer option\(s\) \['n_layer'\]"),
    (["--model.init_args.preset", "huge"], "unknown transformer preset 'huge'"),
    (["--model.init_args.lr", "0"], "lr must be > 0"),
    (["--model.init_args.sampling.num_steps", "0"], "num_steps must be >= 1"),
    (["--model.init_args.autoencoder", "missing.ckpt"], "autoencoder checkpoint 'missing.ckpt' does not exist"),
    (["--data.init_args.caption_dropout", "1.5"], r"caption_dropout must be in \[0, 1\)"),
    (["--data.init_args.batch_size", "0"], "batch_size must be an integer >= 1"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_option_fails_at_start_up_naming_it(args, message, tmp_path, tokenizer_path, autoencoder_ckpt, capsys):
    # the text corpus does not exist: an error about it would mean data was read before the options were checked
    with pytest.raises(SystemExit) as exit_info:
        _quick_fit(tmp_path, tokenizer_path, autoencoder_ckpt, 2, "--data.init_args.text_path",
                   str(tmp_path / "no-such-corpus.txt"), *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("transfusion fit: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_autoencoder_image_size_it_cannot_handle(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "autoencoder_embedded.yaml"), "--model.init_args.image_size", "30",
                  "--trainer.default_root_dir", str(tmp_path)])
    assert "image_size (30) must be divisible by the downsample factor 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "autoencoder_embedded.yaml"), "--data.init_args.image_size", "24",
                  "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "model.init_args.image_size=32 but data.init_args.image_size=24" in err, err
