"""Prompt following on the embedded shapes (GenEval's idea on our data): read a picture back from its pixels.

``read_shapes(image)`` finds the objects of a generated (3, H, W) picture and returns, for the largest one,
its size, colour, shape and position, and the number of objects; ``read_objects(image)`` reads every object
(with its bounding box), the detector of the GenEval-style score (``transfusion.evaluation.geneval``). ``FollowScore`` compares those readings
with the attributes a caption asked for: per-attribute accuracy, "all four right" and "exactly one object".

The reader works on what the renderer draws (``transfusion.data.embedded.shapes``): one shape on a dark background.

* objects: 8-connected components of the foreground (pixels farther than ``threshold`` from the background
  colour), counting those of at least ``min_pixels`` pixels; fragments and stray blobs count as objects;
* colour: the palette entry nearest to the mean of the object's core (its pixels at least 60% as far from the
  background as its farthest one: anti-aliased edges mix with the background);
* shape: a triangle (point up) has its mass centre below its box's centre (by 1/6 of its height); else the
  fill ratio, the object's area over the area of its box (sub-pixel, from the coverage of each pixel),
  tells a square (about 1) from a circle (pi/4);
* size: the box's larger side, against the midpoint of the small and large shapes' extents;
* position: the anchor nearest to the bounding box's centre.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from transfusion.data.embedded.shapes import BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, parse_caption

ATTRIBUTES = ("size", "colour", "shape", "position")


def _components(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean (H, W) mask, as lists of (y, x), largest first."""
    H, W = mask.shape
    todo = {(int(y), int(x)) for y, x in mask.nonzero().tolist()}
    parts = []
    while todo:
        stack, part = [todo.pop()], []
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (y + dy, x + dx) in todo:
                        todo.remove((y + dy, x + dx))
                        stack.append((y + dy, x + dx))
        parts.append(part)
    return sorted(parts, key=len, reverse=True)


# Thresholds halfway between the classes as rendered (1,500 jittered renders at 32 px): a triangle's mass
# centre lies 0.09-0.18 of its height below its box's centre (1/6 ideally), a circle's or a square's within
# 0.04 of it; the fill ratio (area / box area) is 0.76-0.79 for circles (pi/4) and 0.97-0.99 for squares.
# Blur (an autoencoder's reconstruction) moves fill ratios toward each other but keeps the mass centre.
TRIANGLE_OFFSET = 0.065
SQUARE_FILL = 0.88


def read_objects(image: torch.Tensor, threshold: float = 60.0, min_pixels: int = 4) -> list[dict]:
    """Every object of a (3, H, W) image in [-1, 1], largest first: ``{"size", "colour", "shape", "position",
    "box": (x0, y0, x1, y1) in pixels, "pixels": its pixel count}``."""
    pixels = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # (3, H, W)
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None]
    distance = (pixels - background).norm(dim=0)  # (H, W)
    parts = [p for p in _components(distance > threshold) if len(p) >= min_pixels]
    return [_read_object(part, pixels, distance) for part in parts]


def _read_object(part: list[tuple[int, int]], pixels: torch.Tensor, distance: torch.Tensor) -> dict:
    H, W = distance.shape
    ys, xs = torch.tensor(part).T
    far = distance[ys, xs]
    core = far >= 0.6 * far.max()
    mean = pixels[:, ys[core], xs[core]].mean(dim=1)
    reading = {"colour": min(COLOURS, key=lambda c: float((mean - torch.tensor(COLOURS[c], dtype=torch.float32)).norm()))}

    # coverage in [0, 1] of the object and the pixel ring around it (anti-aliased edges count partly)
    mask = torch.zeros(H, W)
    mask[ys, xs] = 1.0
    ring = F.max_pool2d(mask[None, None], 3, stride=1, padding=1)[0, 0] > 0
    coverage = (distance / far[core].mean()).clamp(0, 1) * ring
    width, height = coverage.amax(0).sum(), coverage.amax(1).sum()  # sub-pixel extents
    fill = float(coverage.sum() / (width * height))
    y0, y1 = float(ys.min()), float(ys.max()) + 1
    rows = torch.arange(H, dtype=torch.float32) + 0.5
    offset = (float((coverage.sum(1) * rows).sum() / coverage.sum()) - (y0 + y1) / 2) / (y1 - y0)
    reading["shape"] = "triangle" if offset > TRIANGLE_OFFSET else "square" if fill > SQUARE_FILL else "circle"
    # the larger side: small shapes span at most 2 * 0.14 of the side (circles), large ones at least
    # 2 * 0.85 * 0.24 (squares); the threshold is halfway
    extent = float(max(width, height)) / W
    reading["size"] = "large" if extent > SIZES["small"] + 0.85 * SIZES["large"] else "small"

    x0, x1 = float(xs.min()), float(xs.max()) + 1
    cx, cy = (x0 + x1) / 2 / W, (y0 + y1) / 2 / H  # box centre
    reading["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    reading["box"], reading["pixels"] = (x0, y0, x1, y1), len(part)
    return reading


def read_shapes(image: torch.Tensor, threshold: float = 60.0, min_pixels: int = 4) -> dict:
    """``{"objects": int, "size", "colour", "shape", "position"}`` read from a (3, H, W) image in [-1, 1].

    The four attributes describe the largest object; they are None when the picture holds none.
    """
    objects = read_objects(image, threshold, min_pixels)
    reading = {"objects": len(objects), **{a: None for a in ATTRIBUTES}}
    if objects:
        reading.update({a: objects[0][a] for a in ATTRIBUTES})
    return reading


class FollowScore:
    """Accumulates how generated pictures follow their captions; ``compute()`` gives the rates.

    ``update(images, captions, single)``: images (N, 3, H, W) in [-1, 1] (each prompt's first image), the captions
    they were generated from and whether each prompt's output was exactly that one image (None: all were).
    Rates: each attribute, ``all`` (all four right, whatever else the picture holds, and exactly one image out),
    ``one_object`` (exactly one object), ``blank`` (no object) and ``one_image``. ``confusion(attribute)`` counts
    (asked, read) pairs.
    """

    def __init__(self):
        self.records: list[tuple[dict, dict]] = []  # (asked, read)
        self.single: list[bool] = []  # per record: the prompt's output was exactly one image

    def update(self, images: torch.Tensor, captions: list[str], single: list[bool] | None = None) -> None:
        single = [True] * len(images) if single is None else list(single)
        if not len(images) == len(captions) == len(single):
            raise ValueError(f"FollowScore.update: {len(images)} images for {len(captions)} captions "
                             f"({len(single)} output counts)")
        for image, caption, one in zip(images, captions, single):
            asked = parse_caption(caption)
            missing = [a for a in ATTRIBUTES if a not in asked]
            if missing:
                raise ValueError(f"FollowScore: caption {caption!r} names no {', '.join(missing)}; "
                                 "prompt following needs captions of the embedded shapes")
            self.records.append((asked, read_shapes(image)))
            self.single.append(bool(one))

    def compute(self) -> dict[str, float]:
        n = max(len(self.records), 1)
        rates = {a: sum(read[a] == asked[a] for asked, read in self.records) / n for a in ATTRIBUTES}
        rates["all"] = sum(all(read[a] == asked[a] for a in ATTRIBUTES) and one
                           for (asked, read), one in zip(self.records, self.single)) / n
        rates["one_image"] = sum(self.single) / n
        rates["one_object"] = sum(read["objects"] == 1 for _, read in self.records) / n
        rates["blank"] = sum(read["objects"] == 0 for _, read in self.records) / n
        return rates

    def confusion(self, attribute: str) -> Counter:
        """Counts of (asked value, read value) for one attribute; read is None for a blank picture."""
        return Counter((asked[attribute], read[attribute]) for asked, read in self.records)


def caption_scores(generated: list[str], references: list[str]) -> dict[str, float]:
    """Share of generated captions naming each attribute of their reference caption, and all four (``all``)."""
    if len(generated) != len(references):
        raise ValueError(f"caption_scores: {len(generated)} generated captions for {len(references)} references")
    n, pairs = max(len(generated), 1), [(parse_caption(g), parse_caption(r)) for g, r in zip(generated, references)]
    right = [{a: r.get(a) is not None and g.get(a) == r.get(a) for a in ATTRIBUTES} for g, r in pairs]
    rates = {a: sum(x[a] for x in right) / n for a in ATTRIBUTES}  # a reference without the attribute: never right
    rates["all"] = sum(all(x.values()) for x in right) / n
    return rates


def confusion_markdown(score: FollowScore, attribute: str) -> str:
    """A Markdown confusion table: rows are the asked values, columns the read ones (``-``: blank)."""
    vocab = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}[attribute]
    counts, columns = score.confusion(attribute), [*vocab, None]
    lines = [f"| asked \\ read | " + " | ".join(c or "-" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for asked in vocab:
        lines.append(f"| {asked} | " + " | ".join(str(counts.get((asked, c), 0) or "") for c in columns) + " |")
    return "\n".join(lines)
