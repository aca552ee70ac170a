"""Errors that mean "bad input" (an option, a file, a record), which the ``transfusion`` command reports in one line.

``transfusion.cli.main`` prints ``transfusion <subcommand>: error: <message>`` and exits with status 2 for a
:func:`user_error`; any other exception is an internal error and keeps its traceback. ``--debug`` (or
``TRANSFUSION_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path


class UserError(ValueError):
    """Bad input: an option, a file or a record the user gave; the message names it."""


class DiskFullError(OSError):
    """An output not written for lack of space (``transfusion.atomic``); the message names the file, the free space
    and what was kept."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# besides UserError (BadDataError is one): a named input file that is missing or would be overwritten; a full disk
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, DiskFullError)


def user_error(error: BaseException) -> BaseException | None:
    """The user error that ``error`` is or explicitly wraps (``raise ... from``), else None (an internal error)."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__
    return None


def one_line(error: BaseException) -> str:
    """The message of ``error`` without the worker traceback that DataLoader workers put in front of it."""
    message = str(error)
    if message.startswith("Caught ") and "Original Traceback" in message:  # torch's ExceptionWrapper.reraise
        found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(error).__name__)}: ", message, re.M))
        if found:
            message = message[found[-1].end():]
    return message.strip()


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise a UserError naming ``path`` if it is a file that torch cannot load (a truncated copy, another format).

    Folders (sharded checkpoints) and remote paths are left to their loaders.
    """
    if "://" in str(path) or not Path(path).is_file() or zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # the pre-zip torch.save format: a pickle
        return
    reason = "a zip archive cut short" if head.startswith(b"PK") else "not a zip archive"
    raise UserError(f"{what} {path} cannot be read (truncated or not a torch checkpoint: {reason}, "
                    f"{Path(path).stat().st_size} bytes)")
