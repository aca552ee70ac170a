"""Preemption: SIGTERM during `transfusion fit` saves last.ckpt at the end of the current step and stops with exit
status 143; `--ckpt_path last` then gives bitwise the losses of an uninterrupted run (docs/reliability.md)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_reliability import _env, _finish, _fit_command, _losses


def _wait_for_step(root, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(_losses(root), default=-1) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before step {step}"


def _gone(group: int) -> bool:
    """No process of the process group ``group`` is running (zombies that no one reaped yet count as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return False
    return True


def _all_gone(group: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _gone(group)


@pytest.mark.slow
@pytest.mark.distributed  # several processes (2 runs side by side, a data worker each)
def test_sigterm_saves_at_the_step_end_then_resumes_bitwise(tmp_path, straight_fit):
    """``straight_fit`` of conftest.py (two EMAs on) preempted with SIGTERM after step 3, then resumed; the same
    uninterrupted run is the SIGKILL tests' reference."""
    steps = straight_fit.steps
    root = tmp_path / "preempted"
    preempted = subprocess.Popen(straight_fit.command(root), env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_step(root, 3, preempted)
    os.killpg(preempted.pid, signal.SIGTERM)  # every process of the run, its data worker too (as SLURM does)
    sent = time.monotonic()
    _, err = _finish(preempted, 120)
    assert preempted.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert time.monotonic() - sent < 60 and _all_gone(preempted.pid)  # one step and a checkpoint; nothing left behind
    assert "SIGTERM: saved" in err and "resume with --ckpt_path last" in err, err[-3000:]
    before = _losses(root)
    saved = torch.load(root / "logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert saved == max(before) + 1 < steps  # saved after the last step it trained (and logged): nothing lost

    resumed = subprocess.run(straight_fit.command(root, "--ckpt_path", "last"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after = _losses(straight_fit.wait()), _losses(root)
    assert sorted(reference) == list(range(steps)) and sorted(after) == list(range(steps))
    assert min(_losses(root, "1")) == saved  # continued from the SIGTERM checkpoint, not from step 0
    for step, values in after.items():
        assert values == reference[step], (step, values, reference[step])  # each step trained once, same loss


def test_sigterm_inside_a_gradient_accumulation_window_saves_at_its_end(tmp_path):
    """In-process: the checkpoint falls on an optimizer step, never between the micro-batches of one."""
    import lightning as L
    from torch.utils.data import DataLoader

    from transfusion.lightning.preemption import PreemptionCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(torch.randn(16, 2), batch_size=2)

    class Terminate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:  # the first micro-batch of the second window of two
                os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    trainer = L.Trainer(max_steps=6, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Terminate(), PreemptionCheckpoint()])
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(Tiny())
    assert exit_info.value.code == 128 + signal.SIGTERM
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # micro-batches 2 and 3 made step 2; the run stopped before batch 4
    assert trainer.fit_loop.epoch_loop.batch_progress.total.processed == 4
    assert signal.getsignal(signal.SIGTERM) == handler  # the process's own handler is back
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_fit_adds_the_preemption_and_lost_rank_callbacks(tmp_path, tokenizer_path, autoencoder_ckpt):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from test_reliability import CONFIGS
    from transfusion.cli import cli_main
    from transfusion.lightning.lost_rank import LostRankReport
    from transfusion.lightning.preemption import PreemptionCheckpoint

    def callbacks(*extra):
        cli = cli_main(["--config", str(CONFIGS / "transfusion_embedded.yaml"), "--model.init_args.preset", "debug",
                        "--model.init_args.tokenizer", tokenizer_path,
                        "--model.init_args.autoencoder", autoencoder_ckpt,
                        "--trainer.default_root_dir", str(tmp_path), *extra], run=False)
        return [type(c) for c in cli.trainer.callbacks], cli.trainer.checkpoint_callback

    types, first = callbacks()
    assert {LostRankReport, PreemptionCheckpoint} <= set(types) and isinstance(first, ModelCheckpoint)
    # without a ModelCheckpoint in the config, Lightning's default one is still there (and still the first)
    types, first = callbacks("--trainer.callbacks", "[]")
    assert types.count(ModelCheckpoint) == 1 and type(first) is ModelCheckpoint and PreemptionCheckpoint in types
    types, _ = callbacks("--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false")
    assert PreemptionCheckpoint not in types and ModelCheckpoint not in types and LostRankReport in types


def test_ckpt_path_last_finds_a_sharded_checkpoint_folder(tmp_path):
    """FSDP2 writes last.ckpt as a folder of shards: `--ckpt_path last` resumes from it too (a bare folder is no
    checkpoint)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from transfusion.cli import find_last_checkpoint

    trainer = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path)], loggers=[],
                              default_root_dir=str(tmp_path))
    (tmp_path / "last.ckpt").mkdir()
    assert find_last_checkpoint(trainer) is None
    (tmp_path / "last.ckpt" / ".metadata").write_bytes(b"shards")
    assert find_last_checkpoint(trainer) == str(tmp_path / "last.ckpt")
