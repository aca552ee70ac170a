"""Reading local files and Hub datasets through Hugging Face ``datasets``, for every source: split folders,
``metadata.jsonl`` / ``.csv`` tables, shards by glob, text files with invalid UTF-8 (replaced, warned), and a fast
failure when the Hub is unreachable. A file ``datasets`` cannot parse is a ``BadDataError`` naming it."""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import datasets

from transfusion.data.sources.pairs import BadDataError, BadDataWarning

VAL_SPLITS = ("validation", "val", "valid", "test")


def hub_check(name: str) -> None:
    """Fail fast (not after minutes of retries) when the Hub is unreachable and no offline cache is asked for."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname
    try:
        socket.create_connection((host, endpoint.port or (80 if endpoint.scheme == "http" else 443)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(
            f"Hugging Face dataset {name!r} needs network access to {host}, which is unreachable here ({err}). "
            f"Download it on a connected machine (then set HF_DATASETS_OFFLINE=1 to use the cache) or use local "
            f"files (ImageFolderSource, FilesSource, TextFilesSource)") from err


def load_hub(path: str, where: str, **kwargs):
    hub_check(path)
    try:
        return datasets.load_dataset(path, **kwargs)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise type(err)(f"{where}: could not load Hugging Face dataset {path!r}: {err}") from err


def split_folder(data_dir: Path, split: str) -> Path | None:
    """The folder of a split: ``data_dir/train`` (validation: ``validation``, ``val``, ``valid`` or ``test``), or
    ``data_dir`` itself for "train" when it has no split folders."""
    for name in ((split,) if split == "train" else VAL_SPLITS):
        if (data_dir / name).is_dir():
            return data_dir / name
    has_splits = any((data_dir / s).is_dir() for s in ("train",) + VAL_SPLITS)
    return data_dir if split == "train" and not has_splits else None


def load_files(format: str, files: str | list[str] | None) -> tuple[datasets.Dataset, str] | None:
    """(the rows of ``files``, glob patterns, read by the ``datasets`` builder ``format``, a description for
    messages); None without files."""
    if files is None:
        return None
    patterns = [files] if isinstance(files, str) else list(files)
    if not any(glob.glob(p) for p in patterns):
        raise FileNotFoundError(f"no file matches {patterns}")
    return load_dataset(format, f"{format} files {patterns}", data_files=patterns, split="train"), \
        f"{format} files {patterns}"


def load_dataset(builder: str, where: str, **kwargs) -> datasets.Dataset:
    """``datasets.load_dataset`` of local files; a file it cannot parse is a :class:`BadDataError` naming ``where``."""
    try:
        return datasets.load_dataset(builder, **kwargs)
    except Exception as err:  # datasets raises many types for malformed files, the parser's error as the cause
        cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ is not None else ""
        raise BadDataError(f"cannot read {where}: {err}{cause}".replace("\n", " ")) from err


def read_metadata(folder: Path, strict: bool, what: str, rows: str) -> tuple[datasets.Dataset, Path]:
    """A folder's ``metadata.jsonl`` or ``metadata.csv`` as a table, and its path; invalid UTF-8 is replaced (warned;
    an error if ``strict``). ``what`` names the folder and ``rows`` what a row holds, in the error for a missing file."""
    found = [folder / f"metadata.{ext}" for ext in ("jsonl", "csv") if (folder / f"metadata.{ext}").is_file()]
    if not found:
        raise FileNotFoundError(f"{what} has no metadata.jsonl or metadata.csv ({rows})")
    builder = "json" if found[0].suffix == ".jsonl" else "csv"
    errors = check_text_file(str(found[0]), strict)
    data_file = utf8_copy(found[0]) if errors and builder == "json" else str(found[0])
    try:
        meta = load_dataset(builder, repr(str(found[0])), data_files=data_file, split="train",
                            **({"encoding_errors": errors} if errors and builder == "csv" else {}))
    finally:
        if data_file != str(found[0]):
            os.remove(data_file)  # the loaded table lives in the datasets cache
    return meta, found[0]


def check_text_file(path: str, strict: bool) -> str | None:
    """'replace' when the file has invalid UTF-8 (warned), None when clean; raises for empty or (strict) bad files."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise BadDataError(f"{path}: empty text file")
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        message = f"{path}: invalid UTF-8 at byte {err.start}"
        if strict:
            raise BadDataError(message + " (strict mode)") from err
        warnings.warn(message + "; invalid bytes replaced by U+FFFD", BadDataWarning)
        return "replace"


def utf8_copy(path: str | os.PathLike) -> str:
    """A temporary copy of a file with invalid UTF-8 replaced (pyarrow's JSON reader has no error handler)."""
    handle, copy = tempfile.mkstemp(suffix=Path(path).suffix, prefix="transfusion-utf8-")
    with os.fdopen(handle, "w", encoding="utf-8") as out, open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            out.write(line)
    return copy
