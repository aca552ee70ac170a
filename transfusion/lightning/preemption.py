"""Preemption: on SIGTERM, save ``last.ckpt`` at the end of the current training step, then stop.

What Lightning 2.6 does on SIGTERM outside SLURM (``_SignalConnector``): it sets ``trainer.received_sigterm``,
forwards the signal to the processes it launched, broadcasts a flag from inside the signal handler (under DDP),
and raises ``SIGTERMException`` (exit status 0) at the end of the step or in the middle of a validation,
without saving anything; each rank raises when its own signal arrives.

:class:`PreemptionCheckpoint` takes SIGTERM over while training runs: its handler only records the signal;
after every training step the ranks agree on whether any of them received one (one tiny all-reduce), and if
so every rank calls ``trainer.save_checkpoint`` on the ``last.ckpt`` that ``--ckpt_path last`` resumes from
and, once the step's metrics are logged, stops with exit status 143 (128 + SIGTERM: "ended by a signal", for
schedulers that restart failed jobs). A SIGTERM during a validation lets it finish; the next step ends the run.
Data workers, forked before training starts, inherit a blocked SIGTERM and never see it (a run that fails leaves
none behind: at exit they are killed before ``multiprocessing`` joins them).

The checkpoint is taken where ``ModelCheckpoint`` takes its own (this is a ``Checkpoint``, which Lightning
runs after the other callbacks), so the resumed run is bitwise the uninterrupted one. It costs up to one
training step (plus a validation) and one checkpoint write: the grace period before SIGKILL must be longer.
``transfusion fit`` adds it unless checkpointing is disabled; Lightning's handler is back after training.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

EXIT_STATUS = 128 + signal.SIGTERM


class PreemptionCheckpoint(Checkpoint):
    """Save ``last.ckpt`` and stop (exit status 143) at the first step end after a SIGTERM on any rank."""

    def __init__(self):
        self.received = self.saved = self._blocked = False
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # data workers are forked before training starts, with Lightning's handler (which, under DDP, would
        # broadcast over their copy of the process group): they inherit a blocked SIGTERM and never see it
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._blocked = signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = self.saved = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._record)  # after Lightning registered its own
        if self._blocked:  # SIGTERM cannot stop these workers: at exit, before multiprocessing joins them, SIGKILL
            atexit.register(_kill, multiprocessing.active_children())
        self._unblock()  # a SIGTERM held back since setup is recorded now

    def _record(self, signum, frame) -> None:
        self.received = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or \
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # not inside a gradient accumulation window
        # the signal reaches the ranks at different moments (or only one): all decide together, at the same step
        if self.saved or not stepped or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank: a collective under DDP / FSDP2
        self.saved = True
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; stopping with exit status "
                       f"{EXIT_STATUS}; resume with --ckpt_path last")

    # stop once the step's metrics are logged: before a validation (a resumed run skips it) or the next step
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.saved:
            raise SIGTERMException(EXIT_STATUS)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved:
            raise SIGTERMException(EXIT_STATUS)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        self._unblock()

    def _unblock(self) -> None:
        if self._blocked:
            self._blocked = False
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _kill(workers: list) -> None:
    """Kill data workers that a failed run left running (normally they have exited by now)."""
    alive = [w for w in workers if w.is_alive()]
    if alive:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed" for each
        for worker in alive:
            worker.kill()
            worker.join(5)


def last_checkpoint_path(trainer) -> Path:
    """The ``last.ckpt`` of the trainer's first ``ModelCheckpoint`` (else ``default_root_dir/checkpoints``)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
