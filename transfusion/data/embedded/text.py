"""The embedded English text corpus for the text-only stream.

``data/embedded/lee_background.txt`` is the Lee news corpus (300 Australian Broadcasting Corporation
news articles, Lee, Pincombe & Welsh 2005) as distributed in the test data of the ``gensim`` wheel;
``data/prepare_text.py`` extracts it. One document per line. The last ``val_fraction`` of the
documents are held out for validation perplexity.
"""

from __future__ import annotations

import os
from pathlib import Path

from transfusion.errors import UserError

EMBEDDED_TEXT = Path(__file__).resolve().parents[3] / "data" / "embedded" / "lee_background.txt"


def read_documents(path: str | os.PathLike | None = None) -> list[str]:
    """Non-empty lines of a one-document-per-line text file."""
    path = Path(path or EMBEDDED_TEXT)
    if not path.is_file():
        raise FileNotFoundError(
            f"text corpus {str(path)!r} not found; run `python data/prepare_text.py` or pass another file"
        )
    try:
        documents = [line.strip() for line in path.read_bytes().decode("utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise UserError(f"text corpus {str(path)!r}: invalid UTF-8 at byte {error.start}") from error
    documents = [d for d in documents if d]
    if not documents:
        raise UserError(f"text corpus {str(path)!r} contains no non-empty line")
    return documents


def split_documents(documents: list[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, validation): the last ``val_fraction`` of the documents, at least one, are held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(documents) < 2:
        raise UserError(f"the text corpus needs at least two documents to hold one out, got {len(documents)}")
    n_val = max(1, round(len(documents) * val_fraction))
    return documents[:-n_val], documents[-n_val:]


def sentences(documents: list[str]) -> list[str]:
    """Documents cut at full stops: shorter lines for tokenizer training."""
    return [s.strip() + "." for d in documents for s in d.split(". ") if s.strip()]
