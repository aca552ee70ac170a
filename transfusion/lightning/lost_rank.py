"""A data-parallel rank that dies or hangs: the others stop within a bounded time and name it.

* Bounded: a collective waits at most the process group's timeout, the ``timeout`` of Lightning's
  ``DDPStrategy`` / ``ModelParallelStrategy`` (torch's default is 30 minutes; ``trainer_ddp.yaml`` and
  ``trainer_fsdp2.yaml`` set one minute). A killed process is noticed sooner: its sockets close, and gloo
  fails the next collective at once ("Connection closed by peer"); a hung one (stopped, deadlocked, a lost
  node) when the timeout expires.
* Named: :class:`LostRankReport` catches that failure in ``on_exception`` and finds which ranks are gone: the
  process that launched the others (Lightning's launcher) reads their exit status; every other rank holds a
  roll call over torch's rendezvous store (each survivor writes its rank and waits ``wait_s`` for the others);
  a store that does not answer means rank 0, which holds it, is gone. A hung rank that this process launched is
  killed, so that nothing is left running. The message is attached to the
  exception (``LOST_RANKS``), and ``transfusion fit`` prints it as its one-line error (exit status 1).
"""

from __future__ import annotations

import re
import signal
import time
from datetime import timedelta

import lightning as L
import torch.distributed as dist

LOST_RANKS = "lost_ranks_message"  # the attribute of the exception that holds the message
_COLLECTIVE = re.compile(r"Connection (closed|reset) by peer|Timed out waiting|pair closure|gloo|NCCL")


class LostRankReport(L.Callback):
    """On a failed collective, name the ranks that died or stopped answering (see the module docstring)."""

    def __init__(self, wait_s: float = 5.0):
        self.wait_s = wait_s

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.world_size < 2 or not is_collective_failure(exception):
            return
        rank, world = trainer.global_rank, trainer.world_size
        lost = dead_children(trainer) or roll_call(rank, world, self.wait_s)
        for r, process in children(trainer).items():  # launched from here and hung: not left running
            if r in lost and process.poll() is None:
                process.kill()
        named = "; ".join(f"rank {r} of {world} {why}" for r, why in sorted(lost.items())) or \
            f"a collective failed but all {world} ranks answered the roll call"
        message = f"{named}: rank {rank} stops too; rerun with --ckpt_path last to resume from the last checkpoint"
        setattr(exception, LOST_RANKS, message)
        if hasattr(exception, "add_note"):  # shown under the traceback outside the CLI (Python >= 3.11)
            exception.add_note(message)


def is_collective_failure(error: BaseException | None) -> bool:
    """Whether ``error`` (or what it wraps) is a failed collective: torch's ``DistError`` or a gloo/NCCL error."""
    while error is not None:
        if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _COLLECTIVE.search(str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


def children(trainer) -> dict:
    """{rank: subprocess.Popen} of the ranks that Lightning's launcher started from this process (none elsewhere)."""
    first = trainer.node_rank * trainer.num_devices + 1  # the launcher is local rank 0, its children 1, 2, ...
    return {first + i: p for i, p in enumerate(getattr(trainer.strategy.launcher, "procs", None) or [])}


def dead_children(trainer) -> dict[int, str]:
    """{rank: how it ended} for the ranks launched from this process that ended with an error or a signal."""
    lost = {}
    for rank, process in children(trainer).items():
        code = process.poll()
        if code is not None and code != 0:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            lost[rank] = f"is lost ({how}, pid {process.pid})"
    return lost


def roll_call(rank: int, world_size: int, wait_s: float) -> dict[int, str]:
    """{rank: why} for the ranks that do not write their name to the rendezvous store within ``wait_s``."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f"transfusion/roll_call/{rank}", "here")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size) if not store.check([f"transfusion/roll_call/{r}"])]
            if not missing or time.monotonic() > deadline:
                return {r: f"did not answer within {wait_s:g} s (dead or hung)" for r in missing}
            time.sleep(0.1)
    except Exception as error:  # the store lives in rank 0's process (torchrun: in its agent)
        if rank == 0:
            return {}
        return {0: f"cannot be reached (its rendezvous store does not answer: {type(error).__name__})"}
