"""Where image-caption pairs come from, read through Hugging Face ``datasets``.

A source gives a ``datasets.Dataset`` with columns ``image`` (``{"path", "bytes"}``, decoded later by
``transfusion.data.sources.pairs``) and ``captions`` (a list of strings, several per image allowed):

* :class:`ImageFolderSource`: a folder of images with ``metadata.jsonl`` or ``metadata.csv``
  (``file_name`` + caption column, the ``imagefolder`` layout); a row per caption or a list per image;
* :class:`CocoSource`: MS-COCO ``captions_*.json`` + image folder, or the Karpathy split file;
* :class:`FilesSource`: Parquet / WebDataset / Arrow / JSON / CSV shards (glob patterns);
* :class:`HubSource`: a Hub dataset by name (needs network, or a cache with ``HF_DATASETS_OFFLINE=1``).

``load(split)`` returns None when a source has no such split.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path

import datasets

from transfusion.data.sources.loading import load_files, load_hub, read_metadata, split_folder
from transfusion.data.sources.pairs import BadDataWarning
from transfusion.errors import UserError


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


class ImageCaptionSource:
    """A source of image-caption pairs; subclasses implement ``load``."""

    def load(self, split: str) -> datasets.Dataset | None:
        raise NotImplementedError(type(self).__name__)


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
        ds = load_hub(self.name, f"HubSource({self.name!r})", name=self.config, split=name, revision=self.revision)
        return _normalise(ds, self.image_column, self.caption_column, f"Hub dataset {self.name!r}")
