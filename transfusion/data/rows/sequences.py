"""Training rows for Transfusion: image-caption documents and text-only windows, packed to length L.

An image-caption pair becomes one document, caption first with probability ``p_caption_first`` (0.8 in
the paper: the image is conditioned on the caption) and image first otherwise (captioning)::

    caption first:  BOS caption BOI <n patches> EOI EOS
    image first:    BOS BOI <n patches> EOI caption EOS      (noise limited to t <= image_first_max_t)
    caption drop:   BOS BOI <n patches> EOI                   (the unconditional branch for CFG)

A dropped caption ends the document at EOI, so "EOI then EOS" is never taught to image-first
documents, where a caption must follow. Several documents are packed into one row with distinct
document ids; the rest of the row is padding with a document id of its own. Text rows are windows of
the BOS...EOS text stream. Rows are a pure function of (seed, index): reproducible in any worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from transfusion.data.rows.documents import FULL, Picture, Text, document_tokens
from transfusion.data.tokenizer import Tokenizer


@dataclass
class SequenceLayout:
    """What the data must know of the model: its tokenizer and the image geometry.

    ``patches_per_image`` is the number of sequence positions an image takes: latent patches for
    Transfusion, VQ codes for the Chameleon baseline (which writes the codes into those positions).
    """

    tokenizer: Tokenizer
    patches_per_image: int
    image_size: int
    autoencoder_fingerprint: str | None = None  # identifies the autoencoder, for checking cached latents


class TransfusionRows(Dataset):
    """Item ``i``: one row ``{"tokens", "doc_ids", "image_ids", "images", "max_t", "index"}`` of length ``seq_len``.

    ``pairs[j]`` must return ``{"image": (3, H, W) in [-1, 1], "captions": [str, ...]}``; ``text`` is the
    (S,) BOS...EOS token stream (may be None or empty for image-caption rows only).
    """

    def __init__(self, pairs, text: torch.Tensor | None, layout: SequenceLayout, seq_len: int = 128,
                 num_rows: int = 10_000, text_ratio: float = 1.0, p_caption_first: float = 0.8,
                 image_first_max_t: int | None = 500, caption_dropout: float = 0.1, seed: int = 0):
        if not 0.0 <= p_caption_first <= 1.0:
            raise ValueError(f"p_caption_first must be in [0, 1], got {p_caption_first}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if text_ratio < 0:
            raise ValueError(f"text_ratio must be >= 0, got {text_ratio}")
        has_text = text is not None and len(text) > seq_len
        if text_ratio > 0 and not has_text:
            raise ValueError(f"text_ratio={text_ratio} needs a text stream longer than seq_len={seq_len}")
        if len(pairs) == 0 and text_ratio == 0:
            raise ValueError("no image-caption pairs and text_ratio=0: there is nothing to train on")
        self.pairs, self.text, self.layout = pairs, text, layout
        self.seq_len, self.num_rows, self.seed = seq_len, num_rows, seed
        self.p_caption_first, self.image_first_max_t, self.caption_dropout = p_caption_first, image_first_max_t, caption_dropout
        self.tok = layout.tokenizer
        H = layout.image_size  # pairs give pixels (3, H, H) or cached latents (C, h, h): text rows match them
        # (cached VQ codes: (n,) long)
        self.image_shape = tuple(pairs[0]["image"].shape) if len(pairs) else (3, H, H)
        self.image_dtype = pairs[0]["image"].dtype if len(pairs) else torch.float32
        self.p_text = 0.0
        if text_ratio > 0:
            self.p_text = 1.0 if len(pairs) == 0 else self._p_text_for(text_ratio)

    def _p_text_for(self, ratio: float) -> float:
        """Share of text rows that gives ``ratio`` text tokens per image-caption token (pair rows are not full)."""
        fill = np.mean([int((self._pair_row(np.random.default_rng([self.seed, 2**32 - 1, i]))["doc_ids"]
                             < self._pad_doc).sum()) for i in range(32)]) / self.seq_len
        return ratio * fill / (1.0 + ratio * fill)

    @property
    def _pad_doc(self) -> int:
        return self.seq_len  # larger than any real document id in a row

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        row = self._text_row(rng) if rng.random() < self.p_text else self._pair_row(rng)
        return {**row, "index": index}  # the model seeds this row's diffusion noise with it

    def _text_row(self, rng) -> dict:
        start = int(rng.integers(0, len(self.text) - self.seq_len))
        tokens = self.text[start:start + self.seq_len].clone()
        doc_ids = torch.cumsum((tokens == self.tok.bos_id).long(), 0)
        return {"tokens": tokens, "doc_ids": doc_ids, "image_ids": torch.full_like(tokens, -1),
                "images": torch.zeros(0, *self.image_shape, dtype=self.image_dtype),
                "max_t": torch.zeros(0, dtype=torch.long)}

    def document(self, caption: list[int], image_first: bool) -> list[int]:
        """Token ids of one pair document; -1 marks the n patch positions."""
        return pair_document(self.tok, self.layout.patches_per_image, caption, image_first)

    def _pair_row(self, rng) -> dict:
        L, n = self.seq_len, self.layout.patches_per_image
        tokens, doc_ids, images, max_t = [], [], [], []
        while True:
            example = self.pairs[int(rng.integers(len(self.pairs)))]
            image_first = bool(rng.random() >= self.p_caption_first)
            caption = example["captions"][int(rng.integers(len(example["captions"])))]
            if not image_first and rng.random() < self.caption_dropout:
                caption = ""
            doc = self.document(self.tok.encode(caption) if caption else [], image_first)
            if len(tokens) + len(doc) > L:
                if not tokens:
                    raise ValueError(
                        f"seq_len={L} is too short for one image-caption document of {len(doc)} tokens "
                        f"({n} patches + caption + 4 specials); raise seq_len"
                    )
                break
            doc_ids += [len(images)] * len(doc)
            tokens += doc
            images.append(example["image"])
            limit = self.image_first_max_t if image_first else None
            max_t.append(limit if limit is not None else FULL)
        return pair_row(tokens, doc_ids, images, max_t, L, n, self.tok.pad_id)


def pair_document(tok: Tokenizer, patches_per_image: int, caption: list[int], image_first: bool) -> list[int]:
    """Token ids of one pair document (caption ids already encoded, [] when dropped); -1 marks the patches.
    An interleaved document (``transfusion.data.rows.documents``) of one picture and its caption."""
    if image_first:
        pieces = [Picture(0), Text(caption)]
    else:  # caption dropped: no text, so the document ends with the image
        pieces = [Text(caption), Picture(0)] if caption else [Picture(0)]
    return document_tokens(pieces, tok, patches_per_image).tokens


def pair_row(tokens: list[int], doc_ids: list[int], images: list[torch.Tensor], max_t: list[int], seq_len: int,
             patches_per_image: int, pad_id: int) -> dict:
    """A row of packed pair documents (``tokens`` with -1 at patches, fewer than ``seq_len``) padded to ``seq_len``."""
    L, n = seq_len, patches_per_image
    tokens = torch.tensor(tokens + [pad_id] * (L - len(tokens)))
    doc_ids = torch.tensor(doc_ids + [L] * (L - len(doc_ids)))  # padding: a document id of its own
    is_patch = tokens == -1
    image_ids = torch.full((L,), -1, dtype=torch.long)
    image_ids[is_patch] = torch.arange(len(images)).repeat_interleave(n)
    tokens[is_patch] = pad_id
    return {"tokens": tokens, "doc_ids": doc_ids, "image_ids": image_ids,
            "images": torch.stack(images), "max_t": torch.tensor(max_t, dtype=torch.long)}


def collate_rows(rows: list[dict]) -> dict:
    """Stack rows; image ids become indices into the batch's concatenated image list."""
    image_ids, offset = [], 0
    for row in rows:
        ids = row["image_ids"].clone()
        ids[ids >= 0] += offset
        offset += row["images"].shape[0]
        image_ids.append(ids)
    batch = {
        "tokens": torch.stack([r["tokens"] for r in rows]),
        "doc_ids": torch.stack([r["doc_ids"] for r in rows]),
        "image_ids": torch.stack(image_ids),
        "images": torch.cat([r["images"] for r in rows]),
        "max_t": torch.cat([r["max_t"] for r in rows]),
    }
    if any("text_loss" in r for r in rows):  # interleaved documents with loss-off segments; absent: all targets
        batch["text_loss"] = torch.stack([r.get("text_loss", torch.ones_like(r["tokens"], dtype=torch.bool))
                                          for r in rows])
    if all("index" in r for r in rows):
        batch["row_index"] = torch.tensor([r["index"] for r in rows])
    return batch
