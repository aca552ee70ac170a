"""Text documents as one token stream, each wrapped in BOS ... EOS: in memory, or written once to a raw int32
file and memory-mapped (corpora larger than RAM), for the text-only rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from transfusion.data.tokenizer import Tokenizer


def token_stream(documents: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All documents as one (S,) long tensor, each wrapped in BOS ... EOS."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document, bos=True, eos=True))
    return torch.tensor(ids, dtype=torch.long)


class TokenArray:
    """A (S,) token stream held as int32 numpy (in memory or memory-mapped from disk); slices come out as long tensors."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        return torch.from_numpy(np.asarray(self.array[index], dtype=np.int64))


def tokens_file(path: str | os.PathLike | None) -> TokenArray | None:
    """The complete token stream ``tokenize_documents`` wrote to ``path`` earlier, memory-mapped; None if none."""
    if path is None or not Path(path).is_file():
        return None
    return TokenArray(np.memmap(path, dtype=np.int32, mode="r"))


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer, path: str | os.PathLike | None = None,
                       max_tokens: int | None = None, desc: str = "tokenizing") -> TokenArray:
    """Documents (an iterable, e.g. a streamed corpus) as one BOS ... EOS stream, at most ``max_tokens`` long.

    With ``path`` the stream is written there (raw int32) as it is made and memory-mapped (corpora larger than RAM); a
    complete file from an earlier run is reused (``path`` should name the source and tokenizer)."""
    cached = tokens_file(path)
    if cached is not None:
        return cached
    path = Path(path) if path is not None else None
    chunks, total, count = [], 0, 0
    spill = path.with_name(path.name + ".partial") if path is not None else None
    if spill is not None:
        spill.parent.mkdir(parents=True, exist_ok=True)
    out = open(spill, "wb") if spill is not None else None
    try:
        for document in tqdm(documents, desc=desc, unit=" docs", mininterval=2.0, disable=None):
            ids = np.asarray(tokenizer.encode(document, bos=True, eos=True), dtype=np.int32)
            if max_tokens is not None:
                ids = ids[:max_tokens - total]
            total, count = total + len(ids), count + 1
            (ids.tofile(out) if out is not None else chunks.append(ids))
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        if out is not None:
            out.close()
    if count == 0:
        raise ValueError(f"{desc}: the text source yielded no non-empty document")
    if spill is None:
        return TokenArray(np.concatenate(chunks))
    os.replace(spill, path)  # complete files only: a killed run leaves a .partial, never a short stream
    return TokenArray(np.memmap(path, dtype=np.int32, mode="r"))
