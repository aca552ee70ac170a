"""SentencePiece tokenizer with the special tokens Transfusion needs: BOS, EOS, PAD, BOI, EOI.

Models trained here reserve them explicitly (unk 0, bos 1, eos 2, pad 3, <boi> 4, <eoi> 5). A model
trained elsewhere (e.g. the Llama 2 layout, which has no PAD, BOI or EOI) is loaded as it is and the
missing specials get fresh ids after its last piece, so no existing piece changes meaning.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

BOI_PIECE, EOI_PIECE, PAD_PIECE = "<boi>", "<eoi>", "<pad>"


class Tokenizer:
    """Text <-> ids; ``vocab_size`` counts the added specials."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {str(path)!r} does not exist; train one with `transfusion tokenizer --output {path}`"
            )
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path!r} has no BOS/EOS pieces; train it with bos_id and eos_id set")
        next_id = self.sp.get_piece_size()
        ids = {}
        for piece in (PAD_PIECE, BOI_PIECE, EOI_PIECE):
            found = self.sp.piece_to_id(piece)
            if piece == PAD_PIECE and self.sp.pad_id() >= 0:
                found = self.sp.pad_id()
            if found == self.sp.unk_id() or found < 0:  # absent from this model: append
                found, next_id = next_id, next_id + 1
            ids[piece] = found
        self.pad_id, self.boi_id, self.eoi_id = ids[PAD_PIECE], ids[BOI_PIECE], ids[EOI_PIECE]
        self.vocab_size = next_id
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the non-special ids (specials and added ids are dropped)."""
        size = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if int(i) not in self.special_ids and 0 <= int(i) < size])

    @staticmethod
    def train(texts: Iterable[str], output: str | os.PathLike, vocab_size: int = 2048, model_type: str = "unigram") -> "Tokenizer":
        """Train a model on ``texts`` (one sentence or paragraph each) and write it to ``output``."""
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=[BOI_PIECE, EOI_PIECE],
            byte_fallback=True,
            max_sentence_length=16384,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        output.write_bytes(buffer.getvalue())
        return Tokenizer(output)
