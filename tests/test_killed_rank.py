"""A rank killed under 2-process DDP (gloo): the other stops within a bounded time naming it, and `--ckpt_path last`
then gives bitwise the losses of an uninterrupted run (docs/reliability.md#a-lost-rank)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_preemption import _all_gone, _wait_for_step
from test_reliability import _env, _finish, _fit_command, _losses

DDP = ["--config", str(Path(__file__).resolve().parents[1] / "lightning_configs" / "trainer_ddp.yaml"),
       "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_stops_the_other_then_resume_is_bitwise(tmp_path, tokenizer_path, autoencoder_ckpt):
    steps = 7

    def command(root, *extra):
        return _fit_command(root, tokenizer_path, autoencoder_ckpt, steps, *DDP, *extra)

    straight = subprocess.Popen(command(tmp_path / "straight"), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    root = tmp_path / "killed"
    run = subprocess.Popen(command(root), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    _wait_for_step(root, 3, run)
    run.send_signal(signal.SIGKILL)  # rank 0, the process that launched rank 1 and holds the rendezvous store
    killed = time.monotonic()
    _, err = _finish(run, 120)  # stderr closes when rank 1 (which shares it) has exited too
    waited = time.monotonic() - killed
    assert waited < 60 and _all_gone(run.pid), waited  # well within the one-minute timeout; no rank or worker left
    lines = err.strip().splitlines()
    assert lines[-1].startswith("transfusion fit: error: rank 0 of 2 cannot be reached"), err[-3000:]
    assert "rank 1 stops too; rerun with --ckpt_path last" in lines[-1]
    saved = torch.load(root / "logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= saved < steps

    resumed = subprocess.run(command(root, "--ckpt_path", "last"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = _finish(straight, 600)
    assert straight.returncode == 0, err[-3000:]
    reference, after = _losses(tmp_path / "straight"), _losses(root)
    assert sorted(reference) == list(range(steps)) and sorted(after) == list(range(steps))
    assert min(_losses(root, "1")) == saved  # continued from the checkpoint, not from step 0
    for step, values in after.items():  # steps run twice (after the last checkpoint, before the kill) agree too
        assert set(values) == set(reference[step]), (step, values, reference[step])


def test_roll_call_names_the_ranks_that_do_not_answer(tmp_path):
    """In-process, one gloo rank of a pretended world of 3: ranks 1 and 2 never write to the store."""
    import torch.distributed as dist

    from transfusion.lightning.lost_rank import is_collective_failure, roll_call

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        start = time.monotonic()
        assert roll_call(0, 1, wait_s=5) == {}  # everyone answered: no wait
        assert time.monotonic() - start < 2
        lost = roll_call(0, 3, wait_s=0.3)
        assert sorted(lost) == [1, 2] and "did not answer within 0.3 s" in lost[1]
    finally:
        dist.destroy_process_group()
    assert roll_call(1, 2, wait_s=0.3) == {0: "cannot be reached (its rendezvous store does not answer: ValueError)"}

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:36748")
    assert is_collective_failure(gloo) and not is_collective_failure(ValueError("bad option"))
    wrapped = RuntimeError("training step failed")
    wrapped.__cause__ = gloo
    assert is_collective_failure(wrapped) and not is_collective_failure(RuntimeError("CUDA out of memory"))
