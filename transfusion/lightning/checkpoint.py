"""Safe checkpoints: atomic writes, plain contents, and a clear error when the config does not match.

* :class:`AtomicCheckpointIO` writes ``name.ckpt`` to a hidden temporary file in the same folder,
  flushes it to disk and renames it over the old file: a kill at any moment leaves either the old or
  the new checkpoint, never half of one. ``transfusion fit`` uses it unless another CheckpointIO is set.
* Checkpoints hold only tensors and plain Python values, so ``torch.load(path, weights_only=True)``
  loads them without running pickled code.
* :func:`check_config` compares the architecture stored in a checkpoint with the one being built and
  names every field that differs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from transfusion.errors import UserError, check_checkpoint_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partly written checkpoint behind (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # not "*.ckpt": ModelCheckpoint and `--ckpt_path last` never mistake it for a checkpoint
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint_file(path)  # a truncated copy: an error naming the file, not torch's zip reader
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
