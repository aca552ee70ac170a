"""CIDEr-D (Vedantam et al. 2015) as used for MS-COCO captioning.

Each sentence becomes four TF-IDF vectors (n = 1..4); document frequencies count, for each n-gram, the
images whose references contain it. A candidate scores, per n, the mean over its references of the cosine
similarity with the candidate's counts clipped to the reference's, times a Gaussian length penalty
exp(-(l_c - l_r)^2 / (2 sigma^2)), sigma = 6; CIDEr-D is 10 x the mean over n. As in the COCO evaluation
code, the "length" in the penalty is the number of bigrams (it checks ``n == 1`` on 0-based n), and IDF
is log(number of images) - log(max(1, df)).

``tokenize`` is the PTB-like normalisation we apply first (lower case, punctuation dropped); the COCO code
uses the Stanford PTB tokenizer (Java) for that step.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
import torch.distributed as dist
from torchmetrics import Metric

SIGMA = 6.0
MAX_N = 4

_PUNCT = re.compile(r"[^\w\s']|''|``|'(?=\s|$)")


def tokenize(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (the captions' words, as the PTB step leaves them)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def ngrams(sentence: str, max_n: int = MAX_N) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _tfidf(counts: Counter, df: Counter, log_images: float):
    """Per-n TF-IDF vectors, their norms, and the sentence "length" (bigram count, as the reference code)."""
    vec = [{} for _ in range(MAX_N)]
    norm = [0.0] * MAX_N
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = w = tf * (log_images - math.log(max(1.0, df[gram])))
        norm[n] += w * w
    return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)


def _similarity(cand, ref, sigma: float) -> list[float]:
    (cv, cn, cl), (rv, rn, rl) = cand, ref
    penalty = math.exp(-((cl - rl) ** 2) / (2 * sigma ** 2))
    out = []
    for n in range(MAX_N):
        dot = sum(min(w, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, w in cv[n].items())
        if cn[n] != 0 and rn[n] != 0:
            dot /= cn[n] * rn[n]
        out.append(dot * penalty)
    return out


def cider_d(candidates: list[str], references: list[list[str]], sigma: float = SIGMA) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised ``candidates`` against their ``references`` (a list per candidate).

    Returns the corpus score (mean over candidates) and the per-candidate scores.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D needs at least one candidate")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"candidate {i} ({candidates[i]!r}) has no references")
    ref_counts = [[ngrams(r) for r in refs] for refs in references]
    df = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_images = math.log(float(len(candidates)))
    scores = []
    for cand, refs in zip(candidates, ref_counts):
        c = _tfidf(ngrams(cand), df, log_images)
        per_n = [0.0] * MAX_N
        for r in refs:
            per_n = [a + b for a, b in zip(per_n, _similarity(c, _tfidf(r, df, log_images), sigma))]
        scores.append(10.0 * sum(per_n) / MAX_N / len(refs))
    return sum(scores) / len(scores), scores


class CIDErD(Metric):
    """torchmetrics wrapper: ``update(candidates, references)``, ``compute()`` over all ranks.

    CIDEr-D is not a sum over samples (document frequencies come from the whole reference set), so the
    states are the sentences themselves, gathered from every rank before scoring; the score is then the
    same as on one process.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, sigma: float = SIGMA, **kwargs):
        kwargs.setdefault("sync_on_compute", False)  # strings: gathered in compute()
        super().__init__(**kwargs)
        self.sigma = sigma
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.candidates: list[str] = []
        self.references: list[list[str]] = []

    def update(self, candidates: list[str], references: list[list[str]], index: list[int] | None = None) -> None:
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        start = len(self.candidates)
        index = list(range(start, start + len(candidates))) if index is None else list(index)
        self.index.append(torch.tensor(index, dtype=torch.long))
        self.candidates += [tokenize(c) for c in candidates]
        self.references += [[tokenize(r) for r in refs] for refs in references]

    def _gathered(self) -> list[tuple[int, str, list[str]]]:
        index = torch.cat(self.index).tolist() if self.index else []
        mine = list(zip(index, self.candidates, self.references))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            mine = [x for part in parts for x in part]
        return sorted(mine, key=lambda x: x[0])  # a rank-independent order

    def compute(self) -> torch.Tensor:
        items = self._gathered()
        score, _ = cider_d([c for _, c, _ in items], [r for _, _, r in items], self.sigma)
        return torch.tensor(score, dtype=torch.float64)

    def reset(self) -> None:
        super().reset()
        self.candidates, self.references = [], []
