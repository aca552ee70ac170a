"""Where text comes from: documents for a split, from local files or a Hub corpus, through Hugging Face ``datasets``.

A text source without a validation split of its own holds out the last ``val_fraction`` of its documents
(streaming: the first ``val_documents``); ``documents(split)`` gives the non-empty ones."""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import datasets

from transfusion.data.sources.loading import check_text_file, load_dataset, load_hub, utf8_copy
from transfusion.data.sources.pairs import BadDataError, BadDataWarning
from transfusion.errors import UserError


class TextSource:
    """Documents for a split; a held-out split is made when the source has none."""

    val_fraction: float = 0.1
    val_documents: int = 1000
    streaming: bool = False

    def _load_split(self, split: str) -> datasets.Dataset | datasets.IterableDataset | None:
        raise NotImplementedError(type(self).__name__)

    def _split(self, split: str):
        cache = self.__dict__.setdefault("_cache", {})
        if split not in cache:
            cache[split] = self._load_split(split)
        return cache[split]

    def documents(self, split: str) -> Iterable[str]:
        """Non-empty documents of ``train`` or the held-out ``validation`` split."""
        if self._split("validation") is not None:
            return _texts(self._split("train" if split == "train" else "validation"), self.text_column, repr(self))
        train = self._split("train")
        if self.streaming:
            part = train.skip(self.val_documents) if split == "train" else train.take(self.val_documents)
        else:
            if len(train) < 2:
                raise BadDataError(f"{self!r}: needs at least two documents to hold one out, got {len(train)}")
            n_train = len(train) - max(1, round(len(train) * self.val_fraction))
            part = train.select(range(n_train) if split == "train" else range(n_train, len(train)))
        return _texts(part, self.text_column, repr(self))


def _texts(ds, column: str, where: str) -> Iterator[str]:
    if column not in (ds.column_names or [column]):
        raise UserError(f"{where}: no text column {column!r} (columns: {ds.column_names}); set text_column")
    for row in ds:
        text = row[column]
        if isinstance(text, str) and text.strip():
            yield text.strip()


class TextFilesSource(TextSource):
    def __init__(self, paths: str | list[str], format: str | None = None, text_column: str = "text",
                 val_paths: str | list[str] | None = None, val_fraction: float = 0.1, sample_by: str = "line",
                 strict: bool = False):
        """Local ``.txt`` (one document per line, or ``sample_by="paragraph"|"document"``), ``.jsonl`` or ``.parquet``
        files (glob patterns). Empty files are skipped with a warning; invalid UTF-8 is replaced (warned)."""
        self.paths, self.val_paths = paths, val_paths
        self.format, self.text_column, self.sample_by, self.strict = format, text_column, sample_by, strict
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction

    def __repr__(self) -> str:
        return f"TextFilesSource({self.paths!r})"

    def _load_split(self, split: str):
        patterns = self.paths if split == "train" else self.val_paths
        if patterns is None:
            return None
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        files = sorted(f for p in patterns for f in glob.glob(p))
        if not files:
            raise FileNotFoundError(f"no text file matches {patterns}")
        fmt = self.format or {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(
            Path(files[0]).suffix, "text")
        usable, errors = [], None
        for f in files:
            if fmt in ("text", "json"):
                try:
                    bad = check_text_file(f, self.strict)
                except BadDataError as err:
                    if self.strict or "empty" not in str(err):
                        raise
                    warnings.warn(f"skipping {err}", BadDataWarning)
                    continue
                errors = bad or errors
                f = utf8_copy(f) if bad and fmt == "json" else f
            usable.append(f)
        if not usable:
            raise BadDataError(f"no usable text file among {files} (all empty)")
        kwargs = {"encoding_errors": errors} if errors and fmt == "text" else {}
        if fmt == "text":
            kwargs["sample_by"] = self.sample_by
        try:
            ds = load_dataset(fmt, f"{fmt} files {files}", data_files=usable, split="train", **kwargs)
        finally:
            for f in set(usable) - set(files):
                os.remove(f)  # UTF-8 repaired copies; the loaded table lives in the datasets cache
        if fmt == "text" and self.text_column != "text":
            ds = ds.rename_column("text", self.text_column)
        return ds


class HubTextSource(TextSource):
    def __init__(self, name: str, config: str | None = None, split: str = "train", val_split: str | None = None,
                 text_column: str = "text", streaming: bool = False, val_fraction: float = 0.1,
                 val_documents: int = 1000, revision: str | None = None):
        """A Hub text corpus, e.g. ``allenai/c4`` (config ``en``, val_split ``validation``, streaming) or
        ``wikimedia/wikipedia`` (config ``20231101.en``). Streaming reads documents as they are needed."""
        self.name, self.config, self.revision, self.streaming = name, config, revision, streaming
        self.splits = {"train": split, "validation": val_split}
        self.text_column, self.val_fraction, self.val_documents = text_column, val_fraction, val_documents

    def __repr__(self) -> str:
        return f"HubTextSource({self.name!r})"

    def _load_split(self, split: str):
        name = self.splits["train" if split == "train" else "validation"]
        if name is None:
            return None
        return load_hub(self.name, repr(self), name=self.config, split=name, streaming=self.streaming,
                         revision=self.revision)
