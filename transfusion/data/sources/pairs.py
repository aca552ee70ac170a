"""Image-caption pairs from a Hugging Face dataset, checked once and decoded on access.

The dataset's rows are ``{"image": {"path", "bytes"} | path | bytes | PIL, "captions": [str, ...]}``
(see ``transfusion.data.sources``). At construction every row is checked (``scan="header"``: the
file exists and its header opens, the size is within bounds, a caption is left after cleaning;
``scan="full"`` also decodes the pixels, catching truncated files; ``scan="none"`` skips checks).
Bad rows are skipped, counted by reason and warned about by file name (mode conversions are only
counted); ``strict=True`` raises on the
first one instead, and a dataset with no usable row is an error. An image that still fails when it
is decoded later (only possible without a full scan) is replaced by the next usable row, warned about
and counted in ``runtime_skips`` of that process.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

from tqdm.auto import tqdm

from transfusion.data.preprocess import BadRecord, check_size, clean_caption, open_image, preprocess_image
from transfusion.errors import UserError

MAX_WARNINGS = 20  # per dataset; the summary counts the rest
log = logging.getLogger(__name__)


class BadDataWarning(UserWarning):
    """A record was skipped or converted."""


class BadDataError(UserError):
    """Strict mode met a bad record, or no record was usable."""


def describe(image) -> str:
    """The file name of an image cell, for messages."""
    if isinstance(image, dict):
        return image.get("path") or f"<{len(image.get('bytes') or b'')} bytes>"
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return str(getattr(image, "filename", None) or image)


class CheckedRows:
    """The bookkeeping of a dataset checked row by row: rows skipped by reason, conversions, warnings (at most
    ``MAX_WARNINGS``), strict mode, and the image checks. Subclasses check their rows and call ``_finish``."""

    def __init__(self, rows, image_size: int, name: str, scan: str, strict: bool, min_size: int, max_pixels: int):
        if scan not in ("none", "header", "full"):
            raise ValueError(f"scan must be 'none', 'header' or 'full', got {scan!r}")
        self.rows, self.image_size, self.name, self.strict = rows, image_size, name, strict
        self.min_size, self.max_pixels = min_size, max_pixels
        self.skipped: Counter = Counter()  # reason -> rows skipped
        self.converted: Counter = Counter()  # what -> rows converted
        self.runtime_skips = 0
        self._warned = 0
        self.index: list[int] = []

    def _finish(self) -> None:
        """After the checks: an error if no row is usable, else a warning summing up what was skipped."""
        name, total = self.name, len(self.rows)
        if not self.index:
            raise BadDataError(f"{name}: none of its {total} rows is usable ({self.summary()}); "
                               "see the warnings above for the files")
        if self.skipped:
            warnings.warn(f"{name}: {len(self.index)} of {total} rows usable; {self.summary()}", BadDataWarning)
        elif self.converted:
            log.info("%s: all %d rows usable; %s", name, total, self.summary())

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        converted = ", ".join(f"{n} {what}" for what, n in sorted(self.converted.items())) or "none"
        return f"skipped: {skipped}; converted: {converted}"

    def _skip(self, where: str, reason: str) -> None:
        """Count (and warn about) a bad row; in strict mode, stop at it."""
        message = f"{self.name}: {where}: {reason}"
        if self.strict:
            raise BadDataError(message + " (strict mode; strict=False skips such rows)")
        self.skipped[reason.split(" (")[0]] += 1
        if self._warned < MAX_WARNINGS:
            warnings.warn(f"skipping {message}", BadDataWarning)
        self._warned += 1

    def _note(self, image, what: str, warn: bool = True) -> None:
        self.converted[what] += 1
        if warn and self._warned < MAX_WARNINGS:
            warnings.warn(f"{self.name}: {describe(image)}: {what}", BadDataWarning)
        self._warned += 1

    def _check_image(self, image, decode: bool) -> None:
        opened = open_image(image)
        check_size(opened, self.min_size, self.max_pixels)
        if opened.mode != "RGB":
            self._note(image, f"mode {opened.mode} converted to RGB", warn=False)  # routine: counted only
        if decode:
            preprocess_image(opened, self.image_size, self.min_size, self.max_pixels)

    def _pixels(self, image):
        return preprocess_image(image, self.image_size, self.min_size, self.max_pixels)

    def __len__(self) -> int:
        return len(self.index)


class ImageCaptionPairs(CheckedRows):
    """Item ``i``: ``{"image": (3, S, S) in [-1, 1], "captions": [str, ...]}`` of the ``i``-th usable row."""

    def __init__(self, rows, image_size: int, name: str = "dataset", scan: str = "header", strict: bool = False,
                 min_size: int = 8, max_pixels: int = 64_000_000, max_caption_chars: int = 1000,
                 tokenizer=None, max_caption_tokens: int | None = None, progress: bool = True):
        super().__init__(rows, image_size, name, scan, strict, min_size, max_pixels)
        self.max_caption_chars = max_caption_chars
        self.tokenizer, self.max_caption_tokens = tokenizer, max_caption_tokens
        self.captions = []
        for i in tqdm(range(len(rows)), desc=f"checking {name}", disable=not progress or len(rows) < 1000):
            row = rows[i]
            try:
                captions = self._clean_captions(row["captions"], row["image"])
                if scan != "none":
                    self._check_image(row["image"], decode=scan == "full")
            except BadRecord as err:
                self._bad(row["image"], str(err))
                continue
            self.index.append(i)
            self.captions.append(captions)
        self._finish()

    def _bad(self, image, reason: str) -> None:
        self._skip(describe(image), reason)

    def _clean_captions(self, captions, image) -> list[str]:
        if captions is None or isinstance(captions, (str, bytes)):
            captions = [captions]
        cleaned = []
        for caption in captions:
            text, cut = clean_caption(caption, self.max_caption_chars)
            if text and self.tokenizer is not None and self.max_caption_tokens is not None:
                ids = self.tokenizer.encode(text)
                if len(ids) > self.max_caption_tokens:
                    text, cut = self.tokenizer.decode(ids[:self.max_caption_tokens]).strip(), True
            if cut:
                self._note(image, "caption cut or re-encoded")
            if text:
                cleaned.append(text)
        if not cleaned:
            raise BadRecord("empty caption")
        return cleaned

    def __getitem__(self, i: int) -> dict:
        for attempt in range(len(self.index)):
            j = (i + attempt) % len(self.index)
            image = self.rows[self.index[j]]["image"]
            try:
                pixels = self._pixels(image)
            except BadRecord as err:
                self.runtime_skips += 1
                self._bad(image, str(err))
                continue
            return {"image": pixels, "captions": self.captions[j]}
        raise BadDataError(f"{self.name}: no row could be decoded")
