"""The embedded editing data (paper section 4.4, at the scale of the shapes): an image, an instruction that
changes one of its attributes, and the edited image.

An edit changes exactly one of size, colour, shape or position and keeps the rest, the position jitter
included; each edit has several phrasings ("make it red", "turn the circle into a square", "move it to the
top left", ...). Examples are a pure function of (seed, index, split), like ``ShapesDataset``.

Held-out combinations: one in ``HELD_OUT`` of the (source attributes, edited attribute, new value)
combinations never appears in the ``train`` split; the ``heldout`` split draws only from them, so an
evaluation on it measures edits the model was never shown (of shapes and instructions it has seen).
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
from torch.utils.data import Dataset

from transfusion.data.embedded.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapeAttributes, all_attributes, draw
from transfusion.images import to_tensor

EDITS = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS)}
INSTRUCTIONS = {
    "size": ("make it {value}", "make the {shape} {value}", "change the size to {value}", "resize the {shape} to {value}"),
    "colour": ("make it {value}", "paint the {shape} {value}", "change the colour to {value}", "turn it {value}"),
    "shape": ("turn the {shape} into a {value}", "make it a {value}", "replace the {shape} with a {value}",
              "change the shape to a {value}"),
    "position": ("move it to the {value}", "put the {shape} in the {value}", "shift it to the {value}",
                 "place the {shape} at the {value}"),
}
HELD_OUT = 8  # one combination in HELD_OUT is held out of training


def edit_combinations() -> list[tuple[ShapeAttributes, str, str]]:
    """Every (source attributes, edited attribute, new value) with a new value different from the old."""
    return [(source, attribute, value) for source in all_attributes() for attribute, values in EDITS.items()
            for value in values if value != getattr(source, attribute)]


def is_held_out(source: ShapeAttributes, attribute: str, value: str) -> bool:
    key = f"{source.size}|{source.colour}|{source.shape}|{source.position}|{attribute}|{value}"
    return zlib.crc32(key.encode()) % HELD_OUT == 0


def instructions(source: ShapeAttributes, attribute: str, value: str) -> list[str]:
    """Every phrasing of the edit."""
    return [t.format(value=value, shape=source.shape) for t in INSTRUCTIONS[attribute]]


class ShapeEdits(Dataset):
    """``num_examples`` deterministic edits; item ``i`` is ``{"source", "target", "instructions", "source_attributes",
    "target_attributes", "edit"}``: images (3, H, W) in [-1, 1], every phrasing of the instruction, the attributes
    of both images and the edit ``(attribute, value)``. ``split``: "train" (combinations not held out) or
    "heldout" (only those); seeds tell splits of the same kind apart (train 0, validation 1, test 2).
    """

    def __init__(self, num_examples: int = 10_000, image_size: int = 32, seed: int = 0, split: str = "train",
                 jitter: float = 0.04):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.num_examples, self.image_size, self.seed, self.split, self.jitter = num_examples, image_size, seed, split, jitter
        self.combinations = [c for c in edit_combinations() if is_held_out(*c) == (split == "heldout")]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} edits")
        rng = np.random.default_rng([self.seed, index, 7])
        source, attribute, value = self.combinations[int(rng.integers(len(self.combinations)))]
        target = replace(source, **{attribute: value})
        jitter = tuple(float(v) for v in rng.uniform(-self.jitter, self.jitter, size=2))
        return {"source": to_tensor(draw(source, self.image_size, jitter)),
                "target": to_tensor(draw(target, self.image_size, jitter)),
                "instructions": instructions(source, attribute, value),
                "source_attributes": source, "target_attributes": target, "edit": (attribute, value)}
