"""Training rows for image editing (paper section 4.4): a source image, an instruction, the edited image.

An edit becomes one document::

    BOS BOI <source> EOI instruction BOI <target> EOI EOS

The source image enters clean (``max_t`` -1: t = 0, no diffusion loss), bidirectional within itself and
seen by everything after it; the target image is noised and trained with the diffusion loss; the text loss
covers the instruction, the BOI after it (a model learns to answer an instruction with an image; not after an
EOI, below) and the EOS after the target's EOI. For
classifier-free guidance in both conditions (InstructPix2Pix), the instruction, the source image, or both
are dropped, each with its own probability::

    instruction dropped:  BOS BOI <source> EOI BOI <target> EOI
    source dropped:       BOS instruction BOI <target> EOI EOS
    both dropped:         BOS BOI <target> EOI

With ``instruction_first`` the instruction comes before the source image (``BOS instruction BOI <source> EOI
BOI <target> EOI EOS``): then each target patch sits at the same distance from its source patch whatever the
instruction's length.

Ending after the edited image: the BOI right after the source's EOI is not a next-token target (``text_loss``
False): an edit prompt always gives it, and learning it teaches "a clean image's EOI -> BOI", which generation then
follows after every image it commits clean (the edited one, a prompt's picture to caption), so a fine-tuned model
drew images until its budget and stopped captioning. With ``p_clean_target`` a share of targets also enters clean
(no diffusion loss), so EOI -> EOS is learnt after a clean edited image, as generation shows it to the model.

Documents are packed into rows as image-caption documents are (``transfusion.data.rows.sequences``); with
``mix`` rows of another dataset (image-caption rows, to keep generation alive) are interleaved.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from transfusion.data.rows.documents import CLEAN, FULL, Document, Picture, Text, document_tokens, pack
from transfusion.data.rows.sequences import SequenceLayout


class EditRows(Dataset):
    """Item ``i``: one row ``{"tokens", "doc_ids", "image_ids", "images", "max_t", "index"}`` of length ``seq_len``.

    ``edits[j]`` must return ``{"source": (3, H, W), "target": (3, H, W), "instructions": [str, ...]}``.
    ``mix``: another row dataset (``TransfusionRows``) whose row i replaces this one's with probability
    ``mix_ratio``. ``p_clean_target``: share of targets that enter clean (no diffusion loss; their EOI -> EOS is
    still learnt). ``prompted_boi_loss``: keep the BOI after the source's EOI a next-token target (before the fix).
    """

    def __init__(self, edits, layout: SequenceLayout, seq_len: int = 96, num_rows: int = 10_000,
                 p_drop_instruction: float = 0.05, p_drop_source: float = 0.05, p_drop_both: float = 0.05,
                 mix: Dataset | None = None, mix_ratio: float = 0.0, instruction_first: bool = False, seed: int = 0,
                 p_clean_target: float = 0.0, prompted_boi_loss: bool = False):
        drops = (p_drop_instruction, p_drop_source, p_drop_both)
        if any(p < 0 for p in drops) or sum(drops) >= 1:
            raise ValueError(f"the dropout probabilities must be >= 0 and sum to < 1, got {list(drops)}")
        if not 0.0 <= mix_ratio <= 1.0 or (mix_ratio > 0 and mix is None):
            raise ValueError(f"mix_ratio must be in [0, 1] (and > 0 only with rows to mix), got {mix_ratio}")
        if not 0.0 <= p_clean_target < 1.0:
            raise ValueError(f"p_clean_target must be in [0, 1), got {p_clean_target}")
        self.edits, self.layout, self.tok = edits, layout, layout.tokenizer
        self.seq_len, self.num_rows, self.seed = seq_len, num_rows, seed
        self.drops, self.mix, self.mix_ratio = np.cumsum(drops), mix, mix_ratio
        self.instruction_first = instruction_first
        self.p_clean_target, self.prompted_boi_loss = p_clean_target, prompted_boi_loss

    def __len__(self) -> int:
        return self.num_rows

    def document(self, instruction: list[int], keep_source: bool, keep_instruction: bool) -> list[int]:
        """Token ids of one edit document; -1 marks image positions (the source's first, if kept)."""
        return self.edit_document(instruction, keep_source, keep_instruction).tokens

    def edit_document(self, instruction: list[int], keep_source: bool, keep_instruction: bool,
                      clean_target: bool = False) -> Document:
        """One edit document: its tokens and next-token targets (``text_loss``); images and max_t are the caller's."""
        source = [Picture(0, loss=False)] if keep_source else []  # enters clean
        text = [Text(instruction)] if keep_instruction else []  # none: ends at EOI, as a dropped caption
        pieces = (text + source if self.instruction_first else source + text) + [Picture(1, loss=not clean_target)]
        doc = document_tokens(pieces, self.tok, self.layout.patches_per_image)
        if clean_target:  # a clean target is still the edited image: its patches are no code targets either way
            doc.text_loss = [x or t == -1 for x, t in zip(doc.text_loss, doc.tokens)]
        if not self.prompted_boi_loss:  # EOI BOI: the prompt gives that BOI; never learn "EOI -> BOI"
            for k in range(1, len(doc.tokens)):
                if doc.tokens[k] == self.tok.boi_id and doc.tokens[k - 1] == self.tok.eoi_id:
                    doc.text_loss[k] = False
        return doc

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 11])
        if self.mix is not None and rng.random() < self.mix_ratio:
            return {**self.mix[index % len(self.mix)], "index": index}
        L, n = self.seq_len, self.layout.patches_per_image
        documents, used = [], 0
        while True:
            edit = self.edits[int(rng.integers(len(self.edits)))]
            instruction = edit["instructions"][int(rng.integers(len(edit["instructions"])))]
            u = rng.random()  # below drops[0]: instruction dropped; then source dropped; then both; else neither
            keep_instruction = not (u < self.drops[0] or self.drops[1] <= u < self.drops[2])
            keep_source = not self.drops[0] <= u < self.drops[2]
            clean_target = self.p_clean_target > 0 and rng.random() < self.p_clean_target
            doc = self.edit_document(self.tok.encode(instruction), keep_source, keep_instruction, clean_target)
            if used + len(doc.tokens) > L:
                if not documents:
                    raise ValueError(f"seq_len={L} is too short for one edit document of {len(doc.tokens)} tokens "
                                     f"(2 x {n} image positions + instruction + specials); raise seq_len")
                break
            doc.images = ([edit["source"]] if keep_source else []) + [edit["target"]]
            doc.max_t = ([CLEAN] if keep_source else []) + [CLEAN if clean_target else FULL]
            documents.append(doc)
            used += len(doc.tokens)
        return {**pack(documents, L, n, self.tok.pad_id), "index": index}
