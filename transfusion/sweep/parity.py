"""Compute parity (paper section 4.1, Table 3): how many FLOPs Transfusion needs to match Chameleon.

parity FLOP ratio = FLOPs at which Transfusion first reaches Chameleon's final value / FLOPs Chameleon used.

Transfusion's curve is the running best of its evaluations sorted by FLOPs (the best any run had reached
at that compute), so it is monotone and the first crossing is well defined. Between the last evaluation
that misses the target and the first that reaches it, the value is interpolated linearly in log FLOPs.
If the very first evaluation already reaches it, the ratio is an upper bound (``<=``); if none does,
there is no ratio and the table says so with the best value reached. The higher-is-better metrics (CLIP
score, CIDEr-D, prompt following) are never below 0, so a target of 0 is reached by any model: no ratio either
(``at_floor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# metric key prefix -> (name in tables, higher is better)
METRIC_INFO = {"fid": ("FID", False), "clip_score": ("CLIP score", True), "cider_d": ("CIDEr-D", True),
               "ppl": ("perplexity", False), "follow": ("prompt following", True),
               "captions": ("caption attributes", True), "geneval": ("GenEval", True)}


def metric_info(key: str) -> tuple[str, bool]:
    """(display name, higher is better) of a metric key such as ``fid`` or ``clip_score@shapes-clip``."""
    base, _, tag = key.partition("@")
    if base not in METRIC_INFO:
        raise KeyError(f"unknown metric {key!r}; known: {sorted(METRIC_INFO)}")
    name, higher = METRIC_INFO[base]
    tag, _, part = tag.partition("/")  # follow@shapes/colour: one attribute of prompt following
    name = f"{name}: {part.replace('_', ' ')}" if part else name
    return (f"{name} ({tag})" if tag else name), higher


@dataclass
class Parity:
    flops: float | None  # FLOPs at which the target is reached (None: never)
    status: str  # "interpolated", "at_first" (reached by the first evaluation: an upper bound), "not_reached",
    # "at_floor" (a higher-is-better target <= 0, the metric's floor: reached by any model, no ratio)
    best: float  # best value the curve reached
    best_flops: float


def running_best(flops: list[float], values: list[float], higher_is_better: bool) -> tuple[list[float], list[float]]:
    """Points sorted by FLOPs with each value replaced by the best value at or below that compute."""
    points = sorted((f, v) for f, v in zip(flops, values) if f > 0 and math.isfinite(v))
    best, out = None, []
    for f, v in points:
        best = v if best is None else (max(best, v) if higher_is_better else min(best, v))
        out.append((f, best))
    return [f for f, _ in out], [v for _, v in out]


def parity_flops(flops: list[float], values: list[float], target: float, higher_is_better: bool) -> Parity:
    """FLOPs at which the curve (``flops``, ``values``) first reaches ``target``, interpolated in log FLOPs."""
    xs, ys = running_best(flops, values, higher_is_better)
    if not xs:
        raise ValueError("no finite evaluations with positive FLOPs to compare")
    reached = [(y >= target) if higher_is_better else (y <= target) for y in ys]
    best_at = max(range(len(ys)), key=lambda i: ys[i] if higher_is_better else -ys[i])
    best, best_flops = ys[-1], xs[best_at]
    if higher_is_better and target <= 0:
        return Parity(None, "at_floor", best, best_flops)
    if not any(reached):
        return Parity(None, "not_reached", best, best_flops)
    i = reached.index(True)
    if i == 0:
        return Parity(xs[0], "at_first", best, best_flops)
    x0, x1, y0, y1 = math.log(xs[i - 1]), math.log(xs[i]), ys[i - 1], ys[i]
    fraction = (target - y0) / (y1 - y0)  # y0 misses and y1 reaches the target, so y1 != y0
    return Parity(math.exp(x0 + fraction * (x1 - x0)), "interpolated", best, best_flops)


def parity_ratio_text(parity: Parity, chameleon_flops: float, target: str = "Chameleon") -> str:
    """The table cell: ratio, ``<= ratio`` or why there is none (``target``: the model whose value is the target)."""
    if parity.status == "at_floor":
        return f"n/a ({target} at 0, the metric's floor)"
    if parity.status == "not_reached":
        return f"not reached (best {parity.best:.4g} at {parity.best_flops:.2e} FLOPs)"
    ratio = parity.flops / chameleon_flops
    return f"<= {ratio:.3g}" if parity.status == "at_first" else f"{ratio:.3g}"
