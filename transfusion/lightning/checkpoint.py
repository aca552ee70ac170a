"""Safe checkpoints: atomic writes, plain contents, and a clear error when the config does not match.

* :class:`AtomicCheckpointIO` writes ``name.ckpt`` to a hidden temporary file in the same folder,
  flushes it to disk and renames it over the old file (``transfusion.atomic``): a kill or a full disk at any
  moment leaves either the old or the new checkpoint, never half of one; a full disk stops training with one
  line (or is retried, as configured). ``transfusion fit`` uses it unless another CheckpointIO is set.
* Checkpoints hold only tensors and plain Python values, so ``torch.load(path, weights_only=True)``
  loads them without running pickled code.
* :func:`check_config` compares the architecture stored in a checkpoint with the one being built and
  names every field that differs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from transfusion.atomic import atomic_write, full_disk_error
from transfusion.errors import DiskFullError, UserError, check_checkpoint_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partly written checkpoint behind (local paths).

    A write that fails for lack of space keeps the previous checkpoint and raises a ``DiskFullError`` naming the
    file and the free space, which stops training (one line from ``transfusion fit``); with ``retries`` it first
    waits ``retry_wait`` seconds and writes again, up to ``retries`` more times (space freed meanwhile: training
    goes on).
    """

    def __init__(self, retries: int = 0, retry_wait: float = 60.0):
        super().__init__()
        if retries < 0 or retry_wait < 0:
            raise UserError(f"AtomicCheckpointIO: retries ({retries}) and retry_wait ({retry_wait}) must be >= 0")
        self.retries, self.retry_wait = retries, retry_wait

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        for attempt in range(self.retries + 1):
            try:
                return self._save(checkpoint, path, storage_options)
            except DiskFullError as error:
                if attempt == self.retries:
                    raise
                rank_zero_warn(f"{error}; writing it again in {self.retry_wait:g} s "
                               f"(retry {attempt + 1} of {self.retries})")
                time.sleep(self.retry_wait)

    def _save(self, checkpoint: dict[str, Any], path, storage_options: Any | None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            try:
                return super().save_checkpoint(checkpoint, path, storage_options)
            except Exception as error:
                if full := full_disk_error(error):
                    raise DiskFullError(full.errno, f"checkpoint {path} not written: {full}") from error
                raise
        # the previous checkpoint is replaced only once the new one is whole on disk
        with atomic_write(path, "checkpoint", kept=kept(Path(path))) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint_file(path)  # a truncated copy: an error naming the file, not torch's zip reader
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def kept(path: Path) -> str:
    """What a reader still finds after a failed write of ``path``: the previous file and the checkpoints beside it."""
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name)
    beside = f"; {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} beside it unchanged" if others else ""
    return (f"the previous {path.name} there is unchanged" if path.exists() else "nothing was written there") + beside


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) config dataclass or dict as {"transformer.dim": 64, ...}; tuples become lists."""
    if is_dataclass(config):
        config = asdict(config)
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def check_config(stored: dict, current: Any, what: str, fields: tuple[str, ...] | None = None) -> None:
    """Raise a ValueError naming every field whose value differs between ``stored`` and ``current``.

    ``fields``: the prefixes that define the weights (None: all); other differences are allowed. A field the
    stored config lacks (saved before the field existed) counts as its default, which is always the old behaviour.
    """
    old, new = flatten_config(stored), flatten_config(current)
    if is_dataclass(current):  # fields renamed since (the dataclass's RENAMED: old name -> new) under their new names
        renamed = getattr(type(current), "RENAMED", {})
        old = {**flatten_config(type(current)()), **{renamed.get(k, k): v for k, v in old.items()}}
    names = sorted(set(old) | set(new))
    if fields is not None:
        names = [n for n in names if n.split(".")[0] in fields]
    missing = object()
    diff = [f"{n}: checkpoint {old.get(n, missing)!r} != config {new.get(n, missing)!r}"
            for n in names if old.get(n, missing) != new.get(n, missing)]
    if diff:
        diff = [d.replace(repr(missing), "(absent)") for d in diff]
        raise UserError(f"{what} was saved with a different configuration; mismatched fields:\n  "
                         + "\n  ".join(diff))
