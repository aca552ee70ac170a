"""Outputs written whole or not at all, and a full disk reported in one line.

Every file the package writes for later runs to read (checkpoints, ``save_pretrained`` folders, shards and their
``index.json``, the sweep's records and results) goes through here: it is written under a hidden temporary name in
the same folder, flushed and fsync'ed (a network file system may report a full disk only then), and renamed over
the final name, so a reader finds the previous version or the whole new one, never a part of one. A write that
fails removes its temporary file; one that fails for lack of space (``ENOSPC``, a quota's ``EDQUOT``, or ``EFBIG``
past a file-size limit) raises :class:`transfusion.errors.DiskFullError` naming the file, the free space and what
was kept: ``transfusion`` commands print it in one line (exit status 2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
from pathlib import Path

from transfusion.errors import DiskFullError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def full_disk_error(error: BaseException | None) -> OSError | None:
    """The out-of-space ``OSError`` that ``error`` is or arose from (``torch.save`` hides it behind the zip
    writer's own ``RuntimeError``, safetensors and distributed checkpoints in their messages), else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in FULL:
            return error
        # in a message: Rust's io::Error (safetensors), another process's OSError (distributed checkpoints)
        code = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(error))
        if code and int(code[1] or code[2]) in FULL:
            return OSError(int(code[1] or code[2]), os.strerror(int(code[1] or code[2])))
        error = error.__cause__ or error.__context__
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def free_space(path: str | os.PathLike) -> str:
    """``"1.2 GiB free on FOLDER"`` for the folder of ``path`` (or its nearest existing parent)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{_size(shutil.disk_usage(folder).free)} free on {folder}"
    except OSError:
        return f"free space on {folder} unknown"


def disk_full(path: str | os.PathLike, error: OSError, what: str, kept: str) -> DiskFullError:
    """The one-line error for ``what`` (e.g. "checkpoint") at ``path`` that ``error`` stopped; ``kept``: what the
    reader still finds there."""
    reason = error.strerror or os.strerror(error.errno)
    return DiskFullError(error.errno, f"{what} {path} not written: {reason} ({free_space(path)}); {kept}")


def _kept(path: Path) -> str:
    return f"the previous {path.name} there is unchanged" if path.exists() else "nothing was written there"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str = "file", mode: str = "wb", kept: str | None = None,
                 **open_args):
    """``with atomic_write(path) as f: ...``: ``f`` writes ``.NAME.PID.tmp`` beside ``path``, which replaces
    ``path`` when the block ends without an error (then fsync'ed); on an error it is removed. ``kept``: what a
    reader finds instead, for the message of a full disk (default: the previous file, or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden, and no ".ckpt" / ".json" ending
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
        _fsync_dir(path.parent)
    except Exception as error:
        tmp.unlink(missing_ok=True)  # first: the message gives the free space without it
        if full := full_disk_error(error):
            raise disk_full(path, full, what, kept or _kept(path)) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, what: str = "file", kept: str | None = None) -> None:
    with atomic_write(path, what, "w", kept, encoding="utf-8", newline="") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "file", kept: str | None = None) -> None:
    with atomic_write(path, what, kept=kept) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, what: str = "folder", last: str = "config.json"):
    """``with atomic_folder(path) as tmp: ...``: fill the empty folder ``tmp`` (``.NAME.PID.tmp`` beside ``path``);
    when the block ends without an error its files are fsync'ed and moved into ``path`` by renames (no space
    needed), ``last`` (the file a reader opens first) removed first and renamed last: a crash in between leaves a
    folder without ``last``, which readers refuse, never a mix taken for whole. A new ``path`` is ``tmp`` renamed;
    files of ``path`` that the new folder lacks stay (a ``.git``, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        if not path.exists():
            os.replace(tmp, path)
        else:
            (path / last).unlink(missing_ok=True)  # from here until the end the folder reads as incomplete
            _fsync_dir(path)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == last):
                target = path / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
        _fsync_dir(path)
        _fsync_dir(path.parent)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)  # first: the message gives the free space without it
        if full := full_disk_error(error):
            raise disk_full(path, full, what, _kept(path)) from error
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local one (then :func:`atomic_write` applies)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def write_all(f, data: bytes) -> None:
    """``f.write(data)`` until every byte is written: a file object may write part of it and return the count."""
    view = memoryview(data)
    while view:
        written = f.write(view)
        if written is None:  # a file object that does not count: it wrote everything or raised
            return
        if written <= 0:
            raise OSError(errno.EIO, f"wrote {written} bytes of {len(view)}")
        view = view[written:]


def put(fs, path: str, data: bytes, what: str = "file", kept: str | None = None) -> None:
    """Write ``data`` to ``path`` of the fsspec file system ``fs`` whole or not at all: locally with
    :func:`atomic_write`, elsewhere to ``path.partial``, renamed when written (removed when not)."""
    if is_local(fs):
        return write_bytes(path, data, what, kept)  # a local path, as url_to_fs gives it
    partial = path + ".partial"
    try:
        with fs.open(partial, "wb") as f:
            write_all(f, data)
        fs.mv(partial, path)
    except Exception as error:
        with contextlib.suppress(Exception):
            fs.rm(partial)
        if full := full_disk_error(error):
            reason = full.strerror or os.strerror(full.errno)
            kept = kept or (f"the previous {posixpath.basename(path)} there is unchanged" if fs.exists(path)
                            else "nothing was written there")
            raise DiskFullError(error.errno, f"{what} {fs.unstrip_protocol(path)} not written: {reason}; "
                                             f"{kept}") from error
        raise
