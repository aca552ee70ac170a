"""The embedded image-caption dataset: coloured shapes whose captions fully determine them.

Each example is one shape drawn on a dark background, described by four attributes (size, colour,
shape, position) and captioned with one of several phrasings. Captions determine images (up to a
small position jitter) and images determine captions (up to phrasing), so both directions of the
Transfusion objective are learnable in minutes on a CPU. Examples are a pure function of
(seed, index): nothing is stored on disk.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from transfusion.images import to_tensor

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
POSITIONS = {  # centre of the shape as a fraction of the image side
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "centre": (0.5, 0.5),
}
SIZES = {"small": 0.14, "large": 0.24}  # half-width as a fraction of the image side
TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "{size} {colour} {shape}, {position}",
    "there is a {size} {colour} {shape} at the {position}",
    "the {position} has a {size} {colour} {shape}",
)
BACKGROUND = (25, 25, 30)
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges


@dataclass(frozen=True)
class ShapeAttributes:
    size: str
    colour: str
    shape: str
    position: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(**self.__dict__)


def all_attributes() -> list[ShapeAttributes]:
    return [ShapeAttributes(*combo) for combo in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS)]


def all_captions() -> list[str]:
    """Every caption the dataset can produce (for tokenizer training)."""
    return [a.caption(t) for a in all_attributes() for t in range(len(TEMPLATES))]


def draw(attrs: ShapeAttributes, image_size: int, jitter: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Render one example as an RGB PIL image of side ``image_size``."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    cx, cy = (POSITIONS[attrs.position][0] + jitter[0]) * side, (POSITIONS[attrs.position][1] + jitter[1]) * side
    r = SIZES[attrs.size] * side
    draw_shape(ImageDraw.Draw(image), attrs.shape, COLOURS[attrs.colour], cx, cy, r)
    return image.resize((image_size, image_size), Image.LANCZOS)


def shape_box(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a shape of half-width ``r`` centred on its anchor (cx, cy)."""
    if shape == "circle":
        return cx - r, cy - r, cx + r, cy + r
    if shape == "square":
        return cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r
    return cx - r, cy - r, cx + r, cy + 0.8 * r  # triangle, point up


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, fill: tuple, cx: float, cy: float, r: float) -> None:
    """Draw one filled shape of half-width ``r`` at (cx, cy) in the pen's pixel units."""
    x0, y0, x1, y1 = shape_box(shape, cx, cy, r)
    if shape == "circle":
        pen.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        pen.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        pen.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)


class ShapesDataset(Dataset):
    """``num_examples`` deterministic examples; item ``i`` is ``{"image", "captions", "attributes"}``.

    ``image`` is a float tensor (3, H, W) in [-1, 1]; ``captions`` lists every phrasing of the example.
    Different ``seed`` values give disjoint-looking splits (train 0, validation 1, test 2 by convention).
    """

    def __init__(self, num_examples: int = 10_000, image_size: int = 32, seed: int = 0, jitter: float = 0.04):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.num_examples, self.image_size, self.seed, self.jitter = num_examples, image_size, seed, jitter
        self._attributes = all_attributes()

    def __len__(self) -> int:
        return self.num_examples

    def attributes(self, index: int) -> tuple[ShapeAttributes, tuple[float, float]]:
        rng = np.random.default_rng([self.seed, index])
        attrs = self._attributes[int(rng.integers(len(self._attributes)))]
        jitter = tuple(float(v) for v in rng.uniform(-self.jitter, self.jitter, size=2))
        return attrs, jitter

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        attrs, jitter = self.attributes(index)
        image = to_tensor(draw(attrs, self.image_size, jitter))
        captions = [attrs.caption(t) for t in range(len(TEMPLATES))]
        return {"image": image, "captions": captions, "attributes": attrs}


def describe(image: torch.Tensor, threshold: float = 60.0) -> dict[str, str] | None:
    """Read colour and position back from a (3, H, W) image in [-1, 1] by its pixels (None: no shape drawn).

    Foreground = pixels farther than ``threshold`` (0-255 units) from the background colour; the colour
    is the nearest palette entry to their mean, the position the nearest anchor to their centroid.
    Used to measure whether generated images follow their captions.
    """
    pixels = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # (3, H, W)
    distance = (pixels - torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None]).norm(dim=0)
    foreground = distance > threshold
    if foreground.float().mean() < 0.005:
        return None
    mean = pixels[:, foreground].mean(dim=1)
    colour = min(COLOURS, key=lambda c: float((mean - torch.tensor(COLOURS[c], dtype=torch.float32)).norm()))
    H, W = foreground.shape
    ys, xs = foreground.nonzero(as_tuple=True)
    cx, cy = float(xs.float().mean() + 0.5) / W, float(ys.float().mean() + 0.5) / H
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return {"colour": colour, "position": position}


def parse_caption(caption: str) -> dict[str, str]:
    """The attribute words found in a caption, e.g. {"colour": "red", "position": "top left", ...}."""
    found = {}
    for key, vocabulary in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
        for word in sorted(vocabulary, key=len, reverse=True):  # "top left" before "left"
            if word in caption:
                found[key] = word
                break
    return found
