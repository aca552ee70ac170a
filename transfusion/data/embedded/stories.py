"""The embedded stories: interleaved documents of one shape that changes, 2-3 pictures a story.

A story starts from a caption of the shapes (``transfusion.data.embedded.shapes``) and changes one attribute at a time
(as the embedded edits, ``transfusion.data.embedded.shape_edits``), each change a sentence followed by the new picture::

    "a small red circle in the centre" <image> "then it turns blue" <image> "then it moves to the top left" <image>

The position jitter stays the same through a story. Stories are a pure function of (seed, index, split), like
``ShapesDataset``. Held-out stories: one in ``HELD_OUT`` of the (start, changes) combinations never appears in the
``train`` split; the ``heldout`` split draws only from them, so an evaluation measures stories never shown (made of
shapes and changes that were).
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
from torch.utils.data import Dataset

from transfusion.data.embedded.shape_edits import EDITS
from transfusion.data.embedded.shapes import TEMPLATES, ShapeAttributes, all_attributes, draw
from transfusion.images import to_tensor

CHANGES = {  # one phrasing a change: the story's text names it exactly
    "size": "then it becomes {value}",
    "colour": "then it turns {value}",
    "shape": "then it becomes a {value}",
    "position": "then it moves to the {value}",
}
HELD_OUT = 8


def change_text(attribute: str, value: str) -> str:
    return CHANGES[attribute].format(value=value)


def story_key(start: ShapeAttributes, changes: list[tuple[str, str]]) -> str:
    return "|".join([start.size, start.colour, start.shape, start.position] + [f"{a}={v}" for a, v in changes])


def is_held_out(start: ShapeAttributes, changes: list[tuple[str, str]]) -> bool:
    return zlib.crc32(story_key(start, changes).encode()) % HELD_OUT == 0


class ShapeStories(Dataset):
    """``num_stories`` deterministic stories; item ``i`` is a documents record ``{"key", "segments", "images",
    "attributes", "texts"}``: segments alternate text and image (``transfusion.data.rows.documents``), images (3, H, W)
    in [-1, 1], the attributes each picture shows and each picture's text (the caption, then the changes).

    ``images_per_story``: the range of pictures a story has (inclusive); ``split``: "train" or "heldout".
    """

    def __init__(self, num_stories: int = 10_000, image_size: int = 32, seed: int = 0, split: str = "train",
                 images_per_story: tuple[int, int] = (2, 3), jitter: float = 0.04):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if num_stories <= 0:
            raise ValueError(f"num_stories must be positive, got {num_stories}")
        low, high = images_per_story
        if not 1 <= low <= high:
            raise ValueError(f"images_per_story must be (low, high) with 1 <= low <= high, got {images_per_story}")
        self.num_stories, self.image_size, self.seed, self.split = num_stories, image_size, seed, split
        self.images_per_story, self.jitter = (low, high), jitter
        self._attributes = all_attributes()

    def __len__(self) -> int:
        return self.num_stories

    def story(self, index: int) -> tuple[ShapeAttributes, list[tuple[str, str]], tuple[float, float], int]:
        """(start attributes, changes (attribute, value), jitter, caption template) of story ``index``."""
        rng = np.random.default_rng([self.seed, index, 13])
        low, high = self.images_per_story
        count = int(rng.integers(low, high + 1))
        jitter = tuple(float(v) for v in rng.uniform(-self.jitter, self.jitter, size=2))
        template = int(rng.integers(len(TEMPLATES)))
        while True:  # a draw in the wrong split is redrawn (1 in HELD_OUT is held out)
            start = self._attributes[int(rng.integers(len(self._attributes)))]
            changes, current = [], start
            for _ in range(count - 1):
                attribute = list(EDITS)[int(rng.integers(len(EDITS)))]
                values = [v for v in EDITS[attribute] if v != getattr(current, attribute)]
                value = values[int(rng.integers(len(values)))]
                changes.append((attribute, value))
                current = replace(current, **{attribute: value})
            if count == 1 or is_held_out(start, changes) == (self.split == "heldout"):
                return start, changes, jitter, template

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_stories:
            raise IndexError(f"index {index} out of range for {self.num_stories} stories")
        start, changes, jitter, template = self.story(index)
        attributes, texts = [start], [start.caption(template)]
        for attribute, value in changes:
            attributes.append(replace(attributes[-1], **{attribute: value}))
            texts.append(change_text(attribute, value))
        segments = [s for k, text in enumerate(texts) for s in ({"text": text}, {"image": k})]
        return {"key": f"{self.split}-{self.seed}-{index}", "segments": segments,
                "images": [to_tensor(draw(a, self.image_size, jitter)) for a in attributes],
                "attributes": attributes, "texts": texts}
