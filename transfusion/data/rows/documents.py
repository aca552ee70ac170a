"""Interleaved documents: text and images in any order, one document of a training row.

A record of the shard format's "documents" content (``transfusion.data.shards.format``) is ``{"segments": [...],
"images": [...]}``: an ordered list of ``{"text": str}`` and ``{"image": i}`` (``i`` indexes ``images``: (3, H, W)
pixels in [-1, 1], or cached latents), each with an optional ``"loss": false``. It becomes one document::

    BOS text BOI <n patches> EOI text BOI <n patches> EOI ... EOS

* text: its tokens, next-token targets unless ``loss: false`` (context only: ``text_loss`` False there);
* an image: BOI, its n patch positions, EOI; trained with the diffusion loss unless ``loss: false``: then it
  enters clean (``max_t`` CLEAN, t = 0), as an edit's source image. BOI and EOS stay targets in every case
  (where an image or the end comes is the document's structure);
* a document without a text segment ends at its last EOI, without EOS (the unconditional branch of
  classifier-free guidance: a dropped caption);
* the image-first limit: an image with no text before it in its document but text after it (an image being
  captioned) draws its timestep from t <= ``image_first_max_t`` (the paper's 500), so the text reads a
  recognisable picture.

Image-caption pairs (``TransfusionRows.document``) and edits (``EditRows.document``) are special cases built by
``document_tokens``. Attention needs nothing more than ``doc_ids`` and ``image_ids`` (``transfusion.models.attention``):
causal inside a document, bidirectional inside each image, so each image sees all of its document before it (text
and earlier images) and nothing of another document. Documents are packed into rows of length L with distinct
document ids, padding after them with an id of its own, as pair rows are (``collate_rows`` stacks both).

A row's ``text_loss`` (L,) bool marks the positions whose token is a next-token target (False on loss-off text, and
on the code positions of loss-off images, which the Chameleon baseline would otherwise predict); rows without it
train every target, so existing rows are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from transfusion.schedules import CLEAN, FULL  # max_t codes: enters clean (t = 0, no image loss); the full schedule

if TYPE_CHECKING:  # sequences builds its pair documents here
    from transfusion.data.rows.sequences import SequenceLayout


class Text(NamedTuple):
    ids: list[int]
    loss: bool = True


class Picture(NamedTuple):
    """An image segment: ``index`` into the document's images."""

    index: int
    loss: bool = True


@dataclass
class Document:
    """One document: ``tokens`` (-1 at patch positions), ``text_loss`` per position, its images in order of
    appearance and each one's ``max_t`` (0: the full schedule, CLEAN: clean, else the limit)."""

    tokens: list[int] = field(default_factory=list)
    text_loss: list[bool] = field(default_factory=list)
    images: list = field(default_factory=list)
    max_t: list[int] = field(default_factory=list)


def document_tokens(pieces: list, tok, patches_per_image: int, images: list | None = None,
                    image_first_max_t: int | None = None) -> Document:
    """A document from ``Text`` and ``Picture`` pieces, by the rules of the module docstring."""
    doc = Document([tok.bos_id], [True])
    has_text = [isinstance(p, Text) for p in pieces]
    for k, piece in enumerate(pieces):
        if isinstance(piece, Text):
            doc.tokens += piece.ids
            doc.text_loss += [piece.loss] * len(piece.ids)
            continue
        doc.tokens += [tok.boi_id] + [-1] * patches_per_image + [tok.eoi_id]
        doc.text_loss += [True] + [piece.loss] * patches_per_image + [True]
        doc.images.append(None if images is None else images[piece.index])
        if not piece.loss:
            doc.max_t.append(CLEAN)
        elif image_first_max_t is not None and not any(has_text[:k]) and any(has_text[k + 1:]):
            doc.max_t.append(image_first_max_t)
        else:
            doc.max_t.append(FULL)
    if any(has_text):  # a document without text ends at its last EOI
        doc.tokens.append(tok.eos_id)
        doc.text_loss.append(True)
    return doc


def parse_segments(segments, num_images: int, where: str) -> list:
    """A record's ``segments`` (the shard format's JSON list) as ``Text`` (ids not yet encoded: the string) and
    ``Picture`` pieces; a ValueError naming ``where`` for anything malformed."""
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"{where}: segments must be a non-empty list of {{'text': str}} and {{'image': i}}, "
                         f"got {segments!r}")
    pieces = []
    for j, segment in enumerate(segments):
        kind = set(segment) - {"loss"} if isinstance(segment, dict) else None
        loss = segment.get("loss", True) if isinstance(segment, dict) else None
        if kind not in ({"text"}, {"image"}) or not isinstance(loss, bool):
            raise ValueError(f"{where}: segment {j} must be {{'text': str}} or {{'image': i}} with an optional "
                             f"boolean 'loss', got {segment!r}")
        if kind == {"text"}:
            if not isinstance(segment["text"], str):
                raise ValueError(f"{where}: segment {j}: text must be a string, got {segment['text']!r}")
            pieces.append(Text(segment["text"], loss))
        else:
            i = segment["image"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_images:
                raise ValueError(f"{where}: segment {j}: image index {i!r} is not one of the record's "
                                 f"{num_images} images")
            pieces.append(Picture(i, loss))
    return pieces


def record_document(record: dict, tok, patches_per_image: int, image_first_max_t: int | None = None,
                    where: str = "document") -> Document:
    """The document of one record ``{"segments", "images"}`` (text encoded with ``tok``)."""
    images = list(record.get("images", []))
    pieces = parse_segments(record.get("segments"), len(images), where)
    pieces = [Text(tok.encode(p.ids) if p.ids else [], p.loss) if isinstance(p, Text) else p for p in pieces]
    return document_tokens(pieces, tok, patches_per_image, images, image_first_max_t)


def pack(documents: list[Document], seq_len: int, patches_per_image: int, pad_id: int, image_shape=None,
         image_dtype=torch.float32) -> dict:
    """One row ``{"tokens", "doc_ids", "image_ids", "images", "max_t"}`` (and ``text_loss`` when some target is
    off) from documents that fit in ``seq_len``; padding after them has a document id of its own (L)."""
    L, n = seq_len, patches_per_image
    tokens = [t for d in documents for t in d.tokens]
    if len(tokens) > L:
        raise ValueError(f"{len(tokens)} positions of documents do not fit a row of seq_len={L}")
    doc_ids = [k for k, d in enumerate(documents) for _ in d.tokens] + [L] * (L - len(tokens))
    text_loss = [x for d in documents for x in d.text_loss] + [True] * (L - len(tokens))
    images = [x for d in documents for x in d.images]
    tokens = torch.tensor(tokens + [pad_id] * (L - len(tokens)))
    is_patch = tokens == -1
    image_ids = torch.full((L,), -1, dtype=torch.long)
    image_ids[is_patch] = torch.arange(len(images)).repeat_interleave(n)
    tokens[is_patch] = pad_id
    row = {"tokens": tokens, "doc_ids": torch.tensor(doc_ids), "image_ids": image_ids,
           "images": torch.stack(images) if images else torch.zeros(0, *image_shape, dtype=image_dtype),
           "max_t": torch.tensor([m for d in documents for m in d.max_t], dtype=torch.long)}
    if not all(text_loss):
        row["text_loss"] = torch.tensor(text_loss)
    return row


class DocumentRows(Dataset):
    """Item ``i``: one row of documents packed to ``seq_len``, a pure function of (seed, i).

    ``records[j]`` returns ``{"segments": [...], "images": [(3, H, W) or latents, ...]}`` (and optionally ``key``,
    named in errors). ``mix``: another row dataset (``TransfusionRows``) whose row i replaces this one's with
    probability ``mix_ratio``.
    """

    def __init__(self, records, layout: SequenceLayout, seq_len: int = 128, num_rows: int = 10_000,
                 image_first_max_t: int | None = 500, mix: Dataset | None = None, mix_ratio: float = 0.0,
                 seed: int = 0):
        if len(records) == 0:
            raise ValueError("DocumentRows: no documents")
        if not 0.0 <= mix_ratio <= 1.0 or (mix_ratio > 0 and mix is None):
            raise ValueError(f"mix_ratio must be in [0, 1] (and > 0 only with rows to mix), got {mix_ratio}")
        self.records, self.layout, self.tok = records, layout, layout.tokenizer
        self.seq_len, self.num_rows, self.seed = seq_len, num_rows, seed
        self.image_first_max_t, self.mix, self.mix_ratio = image_first_max_t, mix, mix_ratio

    def __len__(self) -> int:
        return self.num_rows

    def document(self, j: int) -> Document:
        record = self.records[j]
        where = f"document {record.get('key', j)!r}"
        return record_document(record, self.tok, self.layout.patches_per_image, self.image_first_max_t, where)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 17])
        if self.mix is not None and rng.random() < self.mix_ratio:
            return {**self.mix[index % len(self.mix)], "index": index}
        documents, used = [], 0
        while True:
            j = int(rng.integers(len(self.records)))
            doc = self.document(j)
            if used + len(doc.tokens) > self.seq_len:
                if not documents:
                    raise ValueError(f"seq_len={self.seq_len} is too short for document "
                                     f"{self.records[j].get('key', j)!r} of {len(doc.tokens)} positions; raise seq_len")
                break
            documents.append(doc)
            used += len(doc.tokens)
        return {**pack(documents, self.seq_len, self.layout.patches_per_image, self.tok.pad_id), "index": index}
