"""Interleaved documents to write as shards (``transfusion shards``, ``write.py``): records ``{"segments",
"pictures": [(H, W, 3) uint8, ...]}`` of the shard format's "documents" content, from a dataset of documents (the
embedded stories) or a user's JSONL file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transfusion.data.preprocess import BadRecord, preprocess_image
from transfusion.data.rows.documents import parse_segments
from transfusion.data.shards.write import to_uint8


class DocumentRecords:
    """Interleaved documents (``ShapeStories``, any dataset of ``{"segments", "images"}`` items, images (3, H, W) in
    [-1, 1]) as records ``{"segments", "pictures": [(H, W, 3) uint8, ...]}``; segments are checked here."""

    content = "documents"

    def __init__(self, documents):
        self.documents = documents
        self.skipped = Counter(getattr(documents, "skipped", {}))

    def __len__(self) -> int:
        return len(self.documents)

    def get(self, i: int) -> dict:
        """Record ``i``; raises ``BadRecord`` when its segments do not match its images."""
        item = self.documents[i]
        images = list(item.get("images", []))
        try:
            parse_segments(item.get("segments"), len(images), f"document {item.get('key', i)!r}")
        except ValueError as error:
            raise BadRecord(f"bad segments ({error})") from None
        segments = [dict(s) for s in item["segments"]]
        return {"segments": segments, "pictures": [to_uint8(image) for image in images]}


class JsonlDocuments:
    """A user's interleaved documents: a JSONL file of ``{"segments": [...], "images": [paths]}`` (paths relative to
    the file), images preprocessed to ``image_size`` as pairs are; a record with a missing or unreadable image or bad
    segments is skipped (counted, warned with its line)."""

    content = "documents"

    def __init__(self, path: str, image_size: int):
        self.path, self.folder, self.image_size = path, Path(path).parent, image_size
        self.rows, self.skipped = [], Counter()
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: not valid JSON ({error})") from None
                if not isinstance(row, dict) or not isinstance(row.get("images", []), list):
                    raise ValueError(f"{path} line {number}: a record is {{\"segments\": [...], \"images\": "
                                     f"[paths]}}, got {line.strip()[:80]!r}")
                self.rows.append((number, row))
        if not self.rows:
            raise ValueError(f"{path}: no documents")

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> dict:
        number, row = self.rows[i]
        where = f"{self.path} line {number}"
        try:
            parse_segments(row.get("segments"), len(row.get("images", [])), where)
            pictures = []
            for image in row.get("images", []):
                try:
                    pictures.append(to_uint8(preprocess_image(str(self.folder / str(image)), self.image_size)))
                except BadRecord as error:
                    raise BadRecord(f"{error} ({image})") from None
        except (ValueError, BadRecord) as error:
            bad = error if isinstance(error, BadRecord) else BadRecord(f"bad segments ({error})")
            bad.where = where
            raise bad from None
        return {"segments": [dict(s) for s in row["segments"]], "pictures": pictures}
