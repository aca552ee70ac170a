"""Where real editing data comes from (paper section 4.4): (source image, instruction, edited image) triples read
through Hugging Face ``datasets``, checked once and decoded on access like the image-caption pairs.

Edit sources give a ``datasets.Dataset`` with columns ``source`` and ``target`` (``{"path", "bytes"}``, decoded
later by :class:`EditTriples`) and ``instructions`` (a list of strings, several phrasings per edit allowed):

* :class:`EditFilesSource`: an InstructPix2Pix-style table (``input_image``, ``edit_prompt``, ``edited_image``;
  the column names are settings) in Parquet / Arrow / JSON / CSV / WebDataset files (glob patterns);
* :class:`EditFolderSource`: a folder of images with ``metadata.jsonl`` or ``metadata.csv`` naming the two image
  files of each edit (relative to the metadata's folder) and its instruction; ``train/`` and ``validation/``
  subfolders are the splits, as in ``ImageFolderSource``.

:class:`EditTriples` handles bad data as ``transfusion.data.sources.pairs`` does: a row with an empty instruction or a
missing, corrupt, too small or too large source or target image is skipped, counted by reason in ``skipped`` and
warned about with its row and file (``strict=True``: an error instead); no usable row is an error.
``data/prepare_edits.py`` writes the embedded edits in both layouts, so this path runs offline.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from tqdm.auto import tqdm

from transfusion.data.preprocess import BadRecord, clean_caption
from transfusion.data.sources.loading import load_files, read_metadata, split_folder
from transfusion.data.sources.pairs import BadDataError, CheckedRows, describe

IMAGES = ("source", "target")  # the two image columns of an edit
SETTINGS = {"source": "source_column", "instructions": "instruction_column", "target": "target_column"}


def _edit_dataset(sources: list[str | None], instructions: list[list], targets: list[str | None]) -> datasets.Dataset:
    """Image cells by path (None where the metadata names no file: a counted skip later)."""
    features = datasets.Features({"source": datasets.Image(decode=False), "target": datasets.Image(decode=False),
                                  "instructions": datasets.Sequence(datasets.Value("string"))})
    cells = {key: [{"path": p, "bytes": None} if p else None for p in paths]
             for key, paths in (("source", sources), ("target", targets))}
    return datasets.Dataset.from_dict(cells | {"instructions": instructions}, features=features)


def _check_columns(present: list[str], columns: dict[str, str], where: str) -> None:
    missing = [c for c in columns.values() if c not in present]
    if missing:
        settings = " / ".join(SETTINGS[k] for k, c in columns.items() if c in missing)
        raise ValueError(f"{where}: no column {missing} (columns: {present}); set {settings}")


def _normalise(ds: datasets.Dataset, columns: dict[str, str], where: str) -> datasets.Dataset:
    """Rename the configured columns to ``source`` / ``instructions`` / ``target``, keep only them, images undecoded,
    a single instruction per row wrapped in a list."""
    _check_columns(ds.column_names, columns, where)
    ds = ds.select_columns(list(columns.values()))
    for key in IMAGES:
        if isinstance(ds.features[columns[key]], datasets.Image):
            ds = ds.cast_column(columns[key], datasets.Image(decode=False))
    renames = {c: k for k, c in columns.items() if c != k}
    ds = ds.rename_columns(renames) if renames else ds
    single = ds.features["instructions"]
    if isinstance(single, datasets.Value):  # one string per row -> a list of one
        features = ds.features.copy()
        features["instructions"] = datasets.Sequence(single)
        ds = ds.map(lambda batch: {"instructions": [[text] for text in batch["instructions"]]}, batched=True,
                    features=features, desc="instructions as lists")
    return ds


class EditSource:
    """A source of editing triples; subclasses implement ``load``."""

    def load(self, split: str) -> datasets.Dataset | None:
        raise NotImplementedError(type(self).__name__)


class EditFilesSource(EditSource):
    def __init__(self, data_files: str | list[str], format: str = "parquet", source_column: str = "input_image",
                 instruction_column: str = "edit_prompt", target_column: str = "edited_image",
                 val_data_files: str | list[str] | None = None):
        """An InstructPix2Pix-style table in files read by the ``datasets`` builder ``format`` (parquet, arrow, json,
        csv, webdataset); image cells are ``datasets`` Image cells, bytes or paths."""
        self.files = {"train": data_files, "validation": val_data_files}
        self.format = format
        self.columns = {"source": source_column, "instructions": instruction_column, "target": target_column}

    def load(self, split: str) -> datasets.Dataset | None:
        loaded = load_files(self.format, self.files["train" if split == "train" else "validation"])
        return None if loaded is None else _normalise(loaded[0], self.columns, loaded[1])


class EditFolderSource(EditSource):
    def __init__(self, data_dir: str, source_column: str = "source_file", target_column: str = "target_file",
                 instruction_column: str = "instruction", strict: bool = False):
        """``data_dir`` holds ``metadata.jsonl`` or ``metadata.csv`` (a row per instruction, or a list of phrasings
        per edit); ``data_dir/{train,validation}/`` splits if present. Invalid UTF-8 in the metadata is replaced
        (warned; an error if ``strict``)."""
        self.data_dir, self.strict = Path(data_dir), strict
        self.columns = {"source": source_column, "instructions": instruction_column, "target": target_column}
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"edit folder {str(self.data_dir)!r} does not exist")

    def _metadata(self, folder: Path) -> datasets.Dataset:
        meta, path = read_metadata(folder, self.strict, f"edit folder {str(folder)!r}",
                                   f"one row per edit: {', '.join(self.columns.values())}")
        _check_columns(meta.column_names, self.columns, str(path))
        return meta

    def load(self, split: str) -> datasets.Dataset | None:
        folder = split_folder(self.data_dir, split)
        if folder is None:
            return None
        meta, columns = self._metadata(folder), self.columns
        grouped: dict[tuple, list] = {}  # (source, target) -> instructions, in the metadata's order
        for source, instruction, target in zip(meta[columns["source"]], meta[columns["instructions"]],
                                               meta[columns["target"]]):
            files = tuple(str(folder / str(name)) if name not in (None, "") else None for name in (source, target))
            grouped.setdefault(files, []).extend(instruction if isinstance(instruction, list) else [instruction])
        return _edit_dataset([s for s, _ in grouped], list(grouped.values()), [t for _, t in grouped])


class EditTriples(CheckedRows):
    """Item ``i``: ``{"source": (3, S, S), "target": (3, S, S) in [-1, 1], "instructions": [str, ...]}`` of the
    ``i``-th usable row. ``scan``: "header" (files open, sizes), "full" (also decode the pixels), "none"."""

    def __init__(self, rows, image_size: int, name: str = "edits", scan: str = "header", strict: bool = False,
                 min_size: int = 8, max_pixels: int = 64_000_000, max_instruction_chars: int = 1000,
                 progress: bool = True):
        super().__init__(rows, image_size, name, scan, strict, min_size, max_pixels)
        self.max_instruction_chars = max_instruction_chars
        self.instructions = []
        for i in tqdm(range(len(rows)), desc=f"checking {name}", disable=not progress or len(rows) < 1000):
            row = rows[i]
            try:
                instructions = self._clean_instructions(row["instructions"], row)
            except BadRecord as err:
                self._bad(i, f"{describe(row['source'])} -> {describe(row['target'])}", str(err))
                continue
            if scan != "none":
                _, problem = self._each_image(row, lambda image: self._check_image(image, decode=scan == "full"))
                if problem:
                    self._bad(i, *problem)
                    continue
            self.index.append(i)
            self.instructions.append(instructions)
        self._finish()

    def _bad(self, row: int, what: str, reason: str) -> None:
        self._skip(f"row {row}, {what}", reason)

    def _clean_instructions(self, instructions, row: dict) -> list[str]:
        if instructions is None or isinstance(instructions, (str, bytes)):
            instructions = [instructions]
        cleaned = []
        for instruction in instructions:
            text, cut = clean_caption(instruction, self.max_instruction_chars)
            if cut:
                self._note(row["source"], "instruction cut or re-encoded")
            if text:
                cleaned.append(text)
        if not cleaned:
            raise BadRecord("empty instruction")
        return cleaned

    @staticmethod
    def _each_image(row: dict, fn) -> tuple[dict, tuple[str, str] | None]:
        """``fn`` of the source and the target image; the first failure as ("source <file>", reason)."""
        out = {}
        for key in IMAGES:
            try:
                out[key] = fn(row[key])
            except BadRecord as err:
                return out, (f"{key} {describe(row[key])}", str(err))
        return out, None

    def __getitem__(self, i: int) -> dict:
        for attempt in range(len(self.index)):
            j = (i + attempt) % len(self.index)
            pixels, problem = self._each_image(self.rows[self.index[j]], self._pixels)
            if problem:
                self.runtime_skips += 1
                self._bad(self.index[j], *problem)
                continue
            return {"source": pixels["source"], "target": pixels["target"], "instructions": self.instructions[j]}
        raise BadDataError(f"{self.name}: no row could be decoded")
