"""Training rows for image editing (paper section 4.4): a source image, an instruction, the edited image.

An edit becomes one document::

    BOS BOI <source> EOI instruction BOI <target> EOI EOS

The source image enters clean (``max_t`` -1: t = 0, no diffusion loss), bidirectional within itself and
seen by everything after it; the target image is noised and trained with the diffusion loss; the text loss
covers the instruction (and BOI, so a model learns to answer an instruction with an image). For
classifier-free guidance in both conditions (InstructPix2Pix), the instruction, the source image, or both
are dropped, each with its own probability::

    instruction dropped:  BOS BOI <source> EOI BOI <target> EOI
    source dropped:       BOS instruction BOI <target> EOI EOS
    both dropped:         BOS BOI <target> EOI

With ``instruction_first`` the instruction comes before the source image (``BOS instruction BOI <source> EOI
BOI <target> EOI EOS``): then each target patch sits at the same distance from its source patch whatever the
instruction's length. Documents are packed into rows as image-caption documents are (``transfusion.data.sequences``); with
``mix`` rows of another dataset (image-caption rows, to keep generation alive) are interleaved.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from transfusion.data.documents import CLEAN, Picture, Text, document_tokens
from transfusion.data.sequences import SequenceLayout


class EditRows(Dataset):
    """Item ``i``: one row ``{"tokens", "doc_ids", "image_ids", "images", "max_t", "index"}`` of length ``seq_len``.

    ``edits[j]`` must return ``{"source": (3, H, W), "target": (3, H, W), "instructions": [str, ...]}``.
    ``mix``: another row dataset (``TransfusionRows``) whose row i replaces this one's with probability
    ``mix_ratio``.
    """

    def __init__(self, edits, layout: SequenceLayout, seq_len: int = 96, num_rows: int = 10_000,
                 p_drop_instruction: float = 0.05, p_drop_source: float = 0.05, p_drop_both: float = 0.05,
                 mix: Dataset | None = None, mix_ratio: float = 0.0, instruction_first: bool = False, seed: int = 0):
        drops = (p_drop_instruction, p_drop_source, p_drop_both)
        if any(p < 0 for p in drops) or sum(drops) >= 1:
            raise ValueError(f"the dropout probabilities must be >= 0 and sum to < 1, got {list(drops)}")
        if not 0.0 <= mix_ratio <= 1.0 or (mix_ratio > 0 and mix is None):
            raise ValueError(f"mix_ratio must be in [0, 1] (and > 0 only with rows to mix), got {mix_ratio}")
        self.edits, self.layout, self.tok = edits, layout, layout.tokenizer
        self.seq_len, self.num_rows, self.seed = seq_len, num_rows, seed
        self.drops, self.mix, self.mix_ratio = np.cumsum(drops), mix, mix_ratio
        self.instruction_first = instruction_first

    def __len__(self) -> int:
        return self.num_rows

    def document(self, instruction: list[int], keep_source: bool, keep_instruction: bool) -> list[int]:
        """Token ids of one edit document; -1 marks image positions (the source's first, if kept)."""
        source = [Picture(0, loss=False)] if keep_source else []  # enters clean
        text = [Text(instruction)] if keep_instruction else []  # none: ends at EOI, as a dropped caption
        pieces = (text + source if self.instruction_first else source + text) + [Picture(1)]
        return document_tokens(pieces, self.tok, self.layout.patches_per_image).tokens

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 11])
        if self.mix is not None and rng.random() < self.mix_ratio:
            return {**self.mix[index % len(self.mix)], "index": index}
        L, n = self.seq_len, self.layout.patches_per_image
        tokens, doc_ids, images, max_t, docs = [], [], [], [], 0
        while True:
            edit = self.edits[int(rng.integers(len(self.edits)))]
            instruction = edit["instructions"][int(rng.integers(len(edit["instructions"])))]
            u = rng.random()  # below drops[0]: instruction dropped; then source dropped; then both; else neither
            keep_instruction = not (u < self.drops[0] or self.drops[1] <= u < self.drops[2])
            keep_source = not self.drops[0] <= u < self.drops[2]
            doc = self.document(self.tok.encode(instruction), keep_source, keep_instruction)
            if len(tokens) + len(doc) > L:
                if not tokens:
                    raise ValueError(f"seq_len={L} is too short for one edit document of {len(doc)} tokens "
                                     f"(2 x {n} image positions + instruction + specials); raise seq_len")
                break
            doc_ids += [docs] * len(doc)
            docs += 1
            tokens += doc
            if keep_source:
                images.append(edit["source"])
                max_t.append(CLEAN)
            images.append(edit["target"])
            max_t.append(0)  # the full schedule
        tokens = torch.tensor(tokens + [self.tok.pad_id] * (L - len(tokens)))
        doc_ids = torch.tensor(doc_ids + [L] * (L - len(doc_ids)))  # padding: a document id of its own
        is_image = tokens == -1
        image_ids = torch.full((L,), -1, dtype=torch.long)
        image_ids[is_image] = torch.arange(len(images)).repeat_interleave(n)
        tokens[is_image] = self.tok.pad_id
        return {"tokens": tokens, "doc_ids": doc_ids, "image_ids": image_ids, "images": torch.stack(images),
                "max_t": torch.tensor(max_t, dtype=torch.long), "index": index}
