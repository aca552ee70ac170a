"""Where real data comes from: image-caption and text sources, read through Hugging Face ``datasets``.

Image-caption sources give a ``datasets.Dataset`` with columns ``image`` (``{"path", "bytes"}``, decoded
later by ``transfusion.data.pairs``) and ``captions`` (a list of strings, several per image allowed):

* :class:`ImageFolderSource`: a folder of images with ``metadata.jsonl`` or ``metadata.csv``
  (``file_name`` + caption column, the ``imagefolder`` layout); a row per caption or a list per image;
* :class:`CocoSource`: MS-COCO ``captions_*.json`` + image folder, or the Karpathy split file;
* :class:`FilesSource`: Parquet / WebDataset / Arrow / JSON / CSV shards (glob patterns);
* :class:`HubSource`: a Hub dataset by name (needs network, or a cache with ``HF_DATASETS_OFFLINE=1``).

Text sources (:class:`TextFilesSource`, :class:`HubTextSource`) give documents (strings) for a split;
without a validation split of their own the last ``val_fraction`` of the documents (streaming: the
first ``val_documents``) are held out. ``load(split)`` returns None when a source has no such split.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

import datasets

from transfusion.data.pairs import BadDataError, BadDataWarning
from transfusion.errors import UserError

VAL_SPLITS = ("validation", "val", "valid", "test")


def _image_dataset(paths: list[str], captions: list[list[str]]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "captions": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths], "captions": captions},
                                      features=features)


def _normalise(ds: datasets.Dataset, image_column: str, caption_column: str, where: str) -> datasets.Dataset:
    """Rename the configured columns to ``image`` / ``captions`` and keep only them, undecoded."""
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: no column {missing} (columns: {ds.column_names}); set image_column / caption_column")
    ds = ds.select_columns([image_column, caption_column])
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    renames = {k: v for k, v in ((image_column, "image"), (caption_column, "captions")) if k != v}
    return ds.rename_columns(renames) if renames else ds


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


def _load_hub(path: str, where: str, **kwargs):
    hub_check(path)
    try:
        return datasets.load_dataset(path, **kwargs)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise type(err)(f"{where}: could not load Hugging Face dataset {path!r}: {err}") from err


class ImageCaptionSource:
    """A source of image-caption pairs; subclasses implement ``load``."""

    def load(self, split: str) -> datasets.Dataset | None:
        raise NotImplementedError(type(self).__name__)


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


class ImageFolderSource(ImageCaptionSource):
    def __init__(self, data_dir: str, caption_column: str = "text", image_column: str = "file_name",
                 strict: bool = False):
        """``data_dir`` holds ``metadata.jsonl`` or ``metadata.csv``; ``data_dir/{train,validation}/`` splits if present.
        Invalid UTF-8 in the metadata is replaced (warned; an error if ``strict``)."""
        self.data_dir, self.caption_column, self.image_column = Path(data_dir), caption_column, image_column
        self.strict = strict
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"image folder {str(self.data_dir)!r} does not exist")

    def load(self, split: str) -> datasets.Dataset | None:
        folder = split_folder(self.data_dir, split)
        if folder is None:
            return None
        meta, path = read_metadata(folder, self.strict, f"image folder {str(folder)!r}",
                                   f"one row per image or caption: {self.image_column}, {self.caption_column}")
        for column in (self.image_column, self.caption_column):
            if column not in meta.column_names:
                raise UserError(f"{str(path)!r} has no column {column!r} (columns: {meta.column_names})")
        grouped: dict[str, list[str]] = defaultdict(list)  # one row per caption, or a list per image
        for row, (file_name, caption) in enumerate(zip(meta[self.image_column], meta[self.caption_column]), 1):
            captions = caption if isinstance(caption, list) else [caption]
            if not isinstance(file_name, str) or not all(c is None or isinstance(c, str) for c in captions):
                raise UserError(f"{str(path)!r} row {row}: {self.image_column} must be a string and "
                                f"{self.caption_column} a string or a list of strings, got {file_name!r}, {caption!r}")
            grouped[str(folder / str(file_name))].extend(caption if isinstance(caption, list) else [caption])
        return _image_dataset(list(grouped), list(grouped.values()))


class CocoSource(ImageCaptionSource):
    def __init__(self, images: str, annotations: str | None = None, val_images: str | None = None,
                 val_annotations: str | None = None, karpathy_split: str | None = None):
        """MS-COCO captions. Either ``annotations`` (``captions_train2017.json``) with ``images`` (its folder), and
        optionally ``val_annotations`` + ``val_images``; or ``karpathy_split`` (``dataset_coco.json``) with ``images``
        the COCO root holding its ``filepath`` folders (train = train + restval, validation = val, test = test)."""
        if annotations is None and karpathy_split is None:
            raise ValueError("CocoSource needs annotations (captions_*.json) or karpathy_split (dataset_coco.json)")
        self.images, self.annotations, self.karpathy_split = images, annotations, karpathy_split
        self.val_images, self.val_annotations = val_images, val_annotations

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"COCO annotation file {path!r} does not exist") from err
        except ValueError as err:  # invalid JSON or UTF-8
            raise UserError(f"COCO annotation file {path!r} is not valid JSON: {err}") from err

    def load(self, split: str) -> datasets.Dataset | None:
        path = self.karpathy_split or (self.annotations if split == "train" else self.val_annotations)
        try:
            return self._load(split)
        except (KeyError, TypeError, AttributeError) as err:  # valid JSON of another shape
            raise UserError(f"COCO annotation file {path!r} is not in the COCO captions layout "
                            f"({type(err).__name__}: {err})") from err

    def _load(self, split: str) -> datasets.Dataset | None:
        if self.karpathy_split:
            wanted = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}[split]
            paths, captions = [], []
            for image in self._read(self.karpathy_split)["images"]:
                if image["split"] in wanted:
                    paths.append(os.path.join(self.images, image.get("filepath", ""), image["filename"]))
                    captions.append([s["raw"] for s in image["sentences"]])
            return _image_dataset(paths, captions)
        annotations, images = ((self.annotations, self.images) if split == "train"
                               else (self.val_annotations, self.val_images or self.images))
        if annotations is None:
            return None
        data = self._read(annotations)
        by_image: dict[int, list[str]] = defaultdict(list)
        for annotation in data["annotations"]:
            by_image[annotation["image_id"]].append(annotation["caption"])
        files = {image["id"]: image["file_name"] for image in data["images"]}
        unknown = set(by_image) - set(files)
        if unknown:
            warnings.warn(f"{annotations}: skipping {len(unknown)} captions of image ids not in 'images', "
                          f"e.g. {sorted(unknown)[:3]}", BadDataWarning)
        ids = [i for i in files if i in by_image]  # images without captions cannot be trained on
        return _image_dataset([os.path.join(images, files[i]) for i in ids], [by_image[i] for i in ids])


class FilesSource(ImageCaptionSource):
    def __init__(self, data_files: str | list[str], format: str = "parquet", image_column: str = "image",
                 caption_column: str = "text", val_files: str | list[str] | None = None):
        """Shards read by the ``datasets`` builder ``format`` (parquet, webdataset, arrow, json, csv).
        WebDataset columns are named by extension (e.g. ``image_column="jpg"``, ``caption_column="txt"``)."""
        self.files = {"train": data_files, "validation": val_files}
        self.format, self.image_column, self.caption_column = format, image_column, caption_column

    def load(self, split: str) -> datasets.Dataset | None:
        loaded = load_files(self.format, self.files["train" if split == "train" else "validation"])
        return None if loaded is None else _normalise(loaded[0], self.image_column, self.caption_column, loaded[1])


class HubSource(ImageCaptionSource):
    def __init__(self, name: str, config: str | None = None, split: str = "train", val_split: str | None = None,
                 image_column: str = "image", caption_column: str = "text", revision: str | None = None):
        """A Hub dataset (downloaded to the ``datasets`` cache, memory-mapped, so it need not fit in RAM)."""
        self.name, self.config, self.revision = name, config, revision
        self.splits = {"train": split, "validation": val_split}
        self.image_column, self.caption_column = image_column, caption_column

    def load(self, split: str) -> datasets.Dataset | None:
        name = self.splits["train" if split == "train" else "validation"]
        if name is None:
            return None
        ds = _load_hub(self.name, f"HubSource({self.name!r})", name=self.config, split=name, revision=self.revision)
        return _normalise(ds, self.image_column, self.caption_column, f"Hub dataset {self.name!r}")


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
        return _load_hub(self.name, repr(self), name=self.config, split=name, streaming=self.streaming,
                         revision=self.revision)
