"""Training rows (``transfusion.data.rows.sequences``): over many documents, the caption comes first, is dropped and
comes after the image at the rates the options say, and only image-first documents carry the noise limit.

A row ends at the first document that does not fit, which is dropped: a draw more often long than short. With ~100
documents a row, that shifts a rate by at most 1% of itself (~0.001 here), a fraction of the tolerance."""

import inspect
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from transfusion.data.modules.embedded import TransfusionDataModule
from transfusion.data.rows.sequences import SequenceLayout, TransfusionRows

BOS, EOS, PAD, BOI, EOI = 1, 2, 3, 4, 5
N_PATCHES = 4


def _rows(**options) -> TransfusionRows:
    """Image-caption rows only (no text stream), a stand-in tokenizer (one id per character), long rows."""
    tok = SimpleNamespace(bos_id=BOS, eos_id=EOS, pad_id=PAD, boi_id=BOI, eoi_id=EOI,
                          encode=lambda s: [10 + (ord(c) % 50) for c in s])
    layout = SequenceLayout(tokenizer=tok, patches_per_image=N_PATCHES, image_size=8)
    pairs = [{"image": torch.zeros(3, 8, 8), "captions": ["a red dot", "one big blue square on the left"]},
             {"image": torch.ones(3, 8, 8), "captions": ["green"]}]
    return TransfusionRows(pairs, None, layout, seq_len=2048, num_rows=300, text_ratio=0.0, **options)


def _documents(rows: TransfusionRows) -> list[tuple[str, int]]:
    """(kind, max_t) of every document of every row; kind: caption_first, image_first or dropped."""
    out = []
    for i in range(len(rows)):
        row = rows[i]
        tokens, doc_ids = row["tokens"], row["doc_ids"]
        for k, max_t in enumerate(row["max_t"].tolist()):  # document k holds image k
            doc = tokens[doc_ids == k].tolist()
            is_patch = (row["image_ids"][doc_ids == k] >= 0).tolist()
            assert doc[0] == BOS and sum(is_patch) == N_PATCHES
            if doc[1] != BOI:
                kind = "caption_first"  # BOS caption BOI patches EOI EOS
                assert doc[-3:] == [PAD, EOI, EOS] and doc[-3 - N_PATCHES] == BOI and len(doc) > N_PATCHES + 4
            elif len(doc) == N_PATCHES + 3:
                kind = "dropped"  # BOS BOI patches EOI
                assert doc[-1] == EOI
            else:
                kind = "image_first"  # BOS BOI patches EOI caption EOS
                assert doc[N_PATCHES + 2] == EOI and doc[-1] == EOS and len(doc) > N_PATCHES + 4
            out.append((kind, max_t))
    return out


def _assert_rate(count: int, n: int, p: float, what: str) -> None:
    """count ~ Binomial(n, p): within 4.5 standard deviations (a correct sampler fails this with probability
    < 1e-5 for another seed; the seed is fixed, so the test is deterministic)."""
    tolerance = 4.5 * math.sqrt(p * (1 - p) / n)
    assert abs(count / n - p) <= tolerance, f"{what}: {count}/{n} = {count / n:.4f}, expected {p:.4f} +- {tolerance:.4f}"


def test_datamodule_defaults_are_the_papers():
    defaults = {k: v.default for k, v in inspect.signature(TransfusionDataModule).parameters.items()}
    assert defaults["p_caption_first"] == 0.8 and defaults["caption_dropout"] == 0.1
    assert defaults["image_first_max_t"] == 500


@pytest.mark.parametrize("options", [
    {},  # TransfusionRows' defaults
    {k: v.default for k, v in inspect.signature(TransfusionDataModule).parameters.items()
     if k in ("p_caption_first", "caption_dropout", "image_first_max_t")},  # what `transfusion fit` passes
    {"p_caption_first": 0.5, "caption_dropout": 0.3, "image_first_max_t": 120},
    {"p_caption_first": 1.0, "caption_dropout": 0.0, "image_first_max_t": None},
], ids=["rows-defaults", "datamodule-defaults", "other", "caption-first-only"])
def test_caption_first_dropout_and_image_first_rates(options):
    rows = _rows(**options)
    p_first = options.get("p_caption_first", 0.8)
    dropout = options.get("caption_dropout", 0.1)
    limit = options.get("image_first_max_t", 500)
    documents = _documents(rows)
    n = len(documents)
    assert n > 25_000  # ~100 documents a row
    kinds = Counter(kind for kind, _ in documents)
    expected = {"caption_first": p_first * (1 - dropout), "dropped": p_first * dropout, "image_first": 1 - p_first}
    for kind, p in expected.items():
        if p in (0.0, 1.0):
            assert kinds[kind] == n * p, (kind, kinds)
        else:
            _assert_rate(kinds[kind], n, p, kind)
    # the caption is dropped only from caption-first documents: image-first ones always have one
    if dropout > 0:
        _assert_rate(kinds["dropped"], kinds["dropped"] + kinds["caption_first"], dropout, "dropout | caption first")
    # image-first images are noised to t <= limit (max_t = limit); the others over the full schedule (max_t 0)
    for kind, max_t in documents:
        assert max_t == (limit if kind == "image_first" and limit is not None else 0), (kind, max_t)
