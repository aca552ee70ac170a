"""Tokenizer with the special tokens Transfusion needs: BOS, EOS, PAD, BOI, EOI; SentencePiece or Hugging Face.

Two kinds of file, one interface:

* a SentencePiece ``tokenizer.model``: trained here (``transfusion tokenizer``, which reserves unk 0, bos 1, eos 2,
  pad 3, <boi> 4, <eoi> 5) or elsewhere (the Llama 2 layout, which has no PAD, BOI or EOI);
* a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library: Llama 3, Qwen and most recent models), with
  the names of its BOS, EOS and PAD tokens from the ``tokenizer_config.json`` beside it when there is one.

A special token absent from the vocabulary gets a fresh id after the vocabulary's last id, in the order PAD, BOI,
EOI, BOS, EOS, so no existing id changes meaning and no text can produce it. A family without a BOS (Qwen) gets an
appended ``<bos>``: documents start with BOS, which marks where a packed document begins and so must differ from
EOS. A PAD equal to BOS or EOS (Qwen's ``<|endoftext|>``) is not used: PAD positions are left out of the loss.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from transfusion.errors import UserError

BOI_PIECE, EOI_PIECE, PAD_PIECE = "<boi>", "<eoi>", "<pad>"
BOS_PIECE, EOS_PIECE = "<bos>", "<eos>"  # appended only to a tokenizer.json without them
SENTENCEPIECE, HUGGING_FACE, HF_CONFIG = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"


def find_tokenizer(directory: str | os.PathLike) -> Path:
    """The tokenizer file of a model folder: ``tokenizer.model`` (SentencePiece) if present, else ``tokenizer.json``."""
    directory = Path(directory)
    for name in (SENTENCEPIECE, HUGGING_FACE):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{str(directory)!r} has no tokenizer: neither the SentencePiece {SENTENCEPIECE} nor "
                            f"the Hugging Face {HUGGING_FACE}")


def _token_name(value) -> str | None:
    """A token of ``tokenizer_config.json``: a string, or (older files) a dict with its ``content``."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Text <-> ids; ``vocab_size`` counts the appended specials, ``appended_ids`` lists them."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {str(path)!r} does not exist; train one with `transfusion tokenizer --output {path}`"
            )
        self.path = str(path)
        self.kind = HUGGING_FACE if path.suffix == ".json" else SENTENCEPIECE
        if self.kind == HUGGING_FACE:
            self._open_hugging_face(path)
        else:
            self._open_sentencepiece(path)
        self.base_size = next_id = self._size
        ids = {}
        for piece, found in self._specials:  # absent ones appended, in this order
            if found is None:
                found, next_id = next_id, next_id + 1
            ids[piece] = found
        self.pad_id, self.boi_id, self.eoi_id = ids[PAD_PIECE], ids[BOI_PIECE], ids[EOI_PIECE]
        self.bos_id, self.eos_id = ids[BOS_PIECE], ids[EOS_PIECE]
        self.vocab_size = next_id
        self.appended_ids = list(range(self.base_size, next_id))
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id}
        if len(self.special_ids) != 5:
            raise UserError(f"tokenizer {self.path!r}: BOS, EOS, PAD, BOI and EOI must be distinct, got ids "
                             f"{self.bos_id}, {self.eos_id}, {self.pad_id}, {self.boi_id}, {self.eoi_id}")

    def _open_sentencepiece(self, path: Path) -> None:
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError, ValueError) as error:  # INTERNAL errors, a piece that is not UTF-8: unnamed
            reason = " ".join(str(error).split())
            raise UserError(f"tokenizer {self.path!r} is not a SentencePiece model ({reason})") from error
        if self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise UserError(f"tokenizer {self.path!r} has no BOS/EOS pieces; train it with bos_id and eos_id set")
        self._size = self.sp.get_piece_size()

        def lookup(piece: str) -> int | None:
            if piece == PAD_PIECE and self.sp.pad_id() >= 0:
                return self.sp.pad_id()
            found = self.sp.piece_to_id(piece)
            return None if found == self.sp.unk_id() or found < 0 else found

        self._specials = [(p, lookup(p)) for p in (PAD_PIECE, BOI_PIECE, EOI_PIECE)]
        self._specials += [(BOS_PIECE, self.sp.bos_id()), (EOS_PIECE, self.sp.eos_id())]

    def _open_hugging_face(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error says what is wrong, not which file
            reason = " ".join(str(e).split())  # the parser quotes the JSON it met, newlines included
            raise UserError(f"tokenizer {self.path!r} is not a Hugging Face tokenizer.json: {reason}") from e
        config_path = path.with_name(HF_CONFIG)
        try:
            self.hf_config = json.loads(config_path.read_bytes()) if config_path.is_file() else None
        except ValueError as error:  # invalid JSON or UTF-8
            raise UserError(f"{str(config_path)!r} is not valid JSON ({error})") from error
        if self.hf_config is not None and not isinstance(self.hf_config, dict):
            raise UserError(f"{str(config_path)!r} must hold a JSON object, got {type(self.hf_config).__name__}")
        config = self.hf_config or {}
        self._size = max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1

        def lookup(name) -> int | None:
            name = _token_name(name)
            if name is not None and not isinstance(name, str):
                raise UserError(f"{str(config_path)!r}: a special token must be a string, got {name!r}")
            return None if name is None else self.hf.token_to_id(name)

        bos, eos = lookup(config.get("bos_token")), lookup(config.get("eos_token"))
        pad = lookup(config.get("pad_token"))
        if pad is None or pad in (bos, eos):  # no PAD, or PAD is a token the text uses (Qwen: <|endoftext|>)
            pad = lookup(PAD_PIECE)
        self._specials = [(PAD_PIECE, pad), (BOI_PIECE, lookup(BOI_PIECE)), (EOI_PIECE, lookup(EOI_PIECE)),
                          (BOS_PIECE, bos), (EOS_PIECE, eos)]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text`` (a tokenizer.json's own BOS/EOS template is not applied: ``bos``/``eos`` add ours)."""
        ids = self.sp.encode(text) if self.kind == SENTENCEPIECE else self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the non-special ids (specials and appended ids are dropped)."""
        ids = [int(i) for i in ids if int(i) not in self.special_ids and 0 <= int(i) < self.base_size]
        if self.kind == SENTENCEPIECE:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True)  # no clean-up of spaces: decode(encode(t)) == t

    def save(self, directory: str | os.PathLike) -> str:
        """Write the tokenizer file (and, for a ``tokenizer.json``, its ``tokenizer_config.json``) into ``directory``,
        where ``Tokenizer(directory / name)`` reads the same ids; returns the file's name."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == SENTENCEPIECE:
            (directory / SENTENCEPIECE).write_bytes(self.sp.serialized_model_proto())
            return SENTENCEPIECE
        target = directory / HUGGING_FACE
        if not target.exists() or not target.samefile(self.path):
            shutil.copyfile(self.path, target)
            # the names we read; an empty file when there was none (then BOS and EOS are appended again)
            config = self.hf_config if self.hf_config is not None else {"tokenizer_class": "PreTrainedTokenizerFast"}
            (directory / HF_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return HUGGING_FACE

    @staticmethod
    def train(texts: Iterable[str], output: str | os.PathLike, vocab_size: int = 2048, model_type: str = "unigram") -> "Tokenizer":
        """Train a SentencePiece model on ``texts`` (one sentence or paragraph each) and write it to ``output``."""
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        try:
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
        except RuntimeError as error:  # sentencepiece checks vocab_size against the text in an INTERNAL error
            if found := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error)):
                raise UserError(f"vocab_size {found[1]} is smaller than the {found[2]} pieces the text needs (each "
                                f"of its characters, 256 bytes, 6 special tokens); use at least {found[2]}") from error
            if found := re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(error)):
                raise UserError(f"vocab_size {found[1]} is more pieces than this text yields; use at most {found[2]}"
                                ) from error
            reason = " ".join(str(error).split())
            raise UserError(f"sentencepiece cannot train a tokenizer of vocab_size {vocab_size} ({model_type}) on "
                            f"this text: {reason}") from error
        output.write_bytes(buffer.getvalue())
        return Tokenizer(output)
