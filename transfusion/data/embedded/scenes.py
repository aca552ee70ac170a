"""Embedded scenes: 1-4 coloured shapes a picture, captioned for GenEval's six tasks (Ghosh et al. 2023).

Each example is a GenEval metadata record (``{"tag", "include", "exclude", "prompt"}``, the format of GenEval's
``prompts/evaluation_metadata.jsonl``) and a picture drawn to satisfy it under GenEval's own rules
(``transfusion.evaluation.geneval``): exactly the objects the prompt names, in random colours, sizes and places
where it names none, without overlaps (a gap of at least ``GAP`` between boxes). The tasks and their phrasing:

    single_object  a photo of a circle                    colors      a photo of a red circle
    two_object     a photo of a circle and a square       position    a photo of a circle left of a square
    counting       a photo of three triangles             color_attr  a photo of a red circle and a blue square

Held-out combinations are never drawn in training: six colour-shape bindings (no training picture holds a red
triangle), three (count, shape) pairs, three ordered shape pairs and eight (shape, relation, shape) triples.
The evaluation prompts (``split="heldout"``) are those combinations; single objects have none to hold out.
Examples are a pure function of (seed, index), like ``ShapesDataset``; nothing is stored on disk.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from transfusion.data.embedded.shapes import BACKGROUND, COLOURS, SHAPES, draw_shape, shape_box
from transfusion.images import to_tensor

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's tags
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's default margin (its option position_threshold)

NUMBERS = {2: "two", 3: "three", 4: "four"}
RADIUS = (0.12, 0.16)  # half-width of an object as a fraction of the side (4-5 px at 32 px: readable)
GAP = 0.06  # least distance between two objects' boxes (2 px at 32 px: separate components for the reader)
MARGIN = 0.02  # least distance from a box to the border
_SUPERSAMPLE = 4

HELDOUT_BINDINGS = {("red", "triangle"), ("white", "triangle"), ("green", "circle"), ("yellow", "circle"),
                    ("blue", "square"), ("purple", "square")}  # every colour and shape is still seen twice
HELDOUT_COUNTS = {(2, "triangle"), (3, "circle"), (4, "square")}
HELDOUT_PAIRS = {("circle", "square"), ("square", "triangle"), ("triangle", "circle")}  # the reverse orders are seen
HELDOUT_POSITIONS = {("circle", "left of", "square"), ("triangle", "left of", "circle"),
                     ("square", "right of", "circle"), ("circle", "right of", "triangle"),
                     ("triangle", "above", "square"), ("square", "above", "circle"),
                     ("circle", "below", "triangle"), ("square", "below", "triangle")}


def _object(shape: str, count: int = 1, colour: str | None = None, position: list | None = None) -> dict:
    clause = {"class": shape, "count": count}
    if colour is not None:
        clause["color"] = colour
    if position is not None:
        clause["position"] = position
    return clause


def task_records(task: str) -> list[dict]:
    """Every GenEval metadata record of ``task`` the scenes can ask for, in a fixed order."""
    pairs = [(a, b) for a, b in itertools.product(SHAPES, SHAPES) if a != b]
    if task == "single_object":
        return [{"tag": task, "include": [_object(s)], "prompt": f"a photo of a {s}"} for s in SHAPES]
    if task == "two_object":
        return [{"tag": task, "include": [_object(a), _object(b)], "prompt": f"a photo of a {a} and a {b}"}
                for a, b in pairs]
    if task == "counting":
        return [{"tag": task, "include": [_object(s, n)], "exclude": [_object(s, n + 1)],
                 "prompt": f"a photo of {NUMBERS[n]} {s}s"} for n in NUMBERS for s in SHAPES]
    if task == "colors":
        return [{"tag": task, "include": [_object(s, colour=c)], "prompt": f"a photo of a {c} {s}"}
                for c in COLOURS for s in SHAPES]
    if task == "position":  # GenEval: the reference object first, the placed one second, pointing back to it
        return [{"tag": task, "include": [_object(b), _object(a, position=[rel, 0])],
                 "prompt": f"a photo of a {a} {rel} a {b}"} for a, b in pairs for rel in RELATIONS]
    if task == "color_attr":
        return [{"tag": task, "include": [_object(a, colour=ca), _object(b, colour=cb)],
                 "prompt": f"a photo of a {ca} {a} and a {cb} {b}"}
                for a, b in pairs for ca, cb in itertools.product(COLOURS, COLOURS) if ca != cb]
    raise ValueError(f"unknown GenEval task {task!r}; choose from {list(TASKS)}")


def is_heldout(record: dict) -> bool:
    """The record asks for a combination that training never shows."""
    inc, tag = record["include"], record["tag"]
    if tag == "counting":
        return (inc[0]["count"], inc[0]["class"]) in HELDOUT_COUNTS
    if tag == "two_object":
        return (inc[0]["class"], inc[1]["class"]) in HELDOUT_PAIRS
    if tag == "position":
        return (inc[1]["class"], inc[1]["position"][0], inc[0]["class"]) in HELDOUT_POSITIONS
    return any((c.get("color"), c["class"]) in HELDOUT_BINDINGS for c in inc)


def _split_of(record: dict) -> str | None:
    """``train``, ``heldout``, or None for a colour-attribution record mixing a held-out and a seen binding (kept
    out of training, which never draws a held-out binding, and out of evaluation, where both are held out)."""
    if record["tag"] == "color_attr":
        held = [(c["color"], c["class"]) in HELDOUT_BINDINGS for c in record["include"]]
        return "heldout" if all(held) else "train" if not any(held) else None
    return "heldout" if is_heldout(record) else "train"


def records(split: str) -> dict[str, list[dict]]:
    """Task -> its records of ``split``: ``train`` (no held-out combination) or ``heldout`` (only those; every
    single-object record, which has none)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"scenes split must be 'train' or 'heldout', got {split!r}")
    out = {}
    for task in TASKS:
        every = task_records(task)
        out[task] = every if task == "single_object" else [r for r in every if _split_of(r) == split]
    return out


def evaluation_metadata() -> list[dict]:
    """The evaluation prompts as GenEval metadata records, task by task."""
    return [r for task in TASKS for r in records("heldout")[task]]


def write_metadata(path: str | Path) -> Path:
    """Write the evaluation prompts as GenEval's ``evaluation_metadata.jsonl`` (one JSON object a line)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in evaluation_metadata()))
    return path


def all_captions() -> list[str]:
    """Every caption the scenes can produce (for tokenizer training)."""
    return [r["prompt"] for task in TASKS for r in task_records(task)]


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of box A to box B ((x0, y0, x1, y1), y down): the offset of the box centres, each axis
    shrunk by ``threshold`` times the sum of the two boxes' extents on it; a relation holds where the shrunk
    offset over the full offset's length passes 0.5 on its axis (none when both axes shrink to zero)."""
    a, b = np.asarray(box_a, dtype=float)[:4].reshape(2, 2), np.asarray(box_b, dtype=float)[:4].reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    revised = np.maximum(np.abs(offset) - threshold * ((a[1] - a[0]) + (b[1] - b[0])), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


class _NoRoom(Exception):
    pass


def _place(rng, shape: str, boxes: list, near: tuple | None = None, tries: int = 200) -> tuple[float, float, float]:
    """(cx, cy, r) of a new object clear of ``boxes``; with ``near = (relation, box)`` also in that relation to it."""
    for _ in range(tries):
        r = rng.uniform(*RADIUS)
        cx, cy = rng.uniform(MARGIN + r, 1 - MARGIN - r, size=2)
        box = shape_box(shape, cx, cy, r)
        if any(box[0] - GAP < b[2] and b[0] - GAP < box[2] and box[1] - GAP < b[3] and b[1] - GAP < box[3]
               for b in boxes):
            continue
        if near is not None and relative_position(box, near[1]) != {near[0]}:  # unambiguous: no second relation
            continue
        return float(cx), float(cy), float(r)
    raise _NoRoom


def layout(record: dict, rng, colours: dict[str, list[str]]) -> list[dict]:
    """Objects ``{"shape", "colour", "cx", "cy", "r"}`` (fractions of the side) satisfying a metadata record;
    ``colours[shape]``: the colours an object may take where the record names none."""
    for _ in range(50):
        objects, boxes, groups = [], [], []
        try:
            for clause in record["include"]:
                group = []
                for _ in range(clause["count"]):
                    near = None
                    if "position" in clause:
                        relation, target = clause["position"]
                        near = (relation, boxes[groups[target][0]])
                    cx, cy, r = _place(rng, clause["class"], boxes, near)
                    colour = clause.get("color") or colours[clause["class"]][int(rng.integers(len(colours[clause["class"]])))]
                    group.append(len(objects))
                    objects.append({"shape": clause["class"], "colour": colour, "cx": cx, "cy": cy, "r": r})
                    boxes.append(shape_box(clause["class"], cx, cy, r))
                groups.append(group)
        except _NoRoom:
            continue
        return objects
    raise RuntimeError(f"scenes: no layout found for {record['prompt']!r}")


def draw_scene(objects: list[dict], image_size: int) -> Image.Image:
    """Render objects (fractions of the side) as an RGB picture of side ``image_size``."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for o in objects:
        draw_shape(pen, o["shape"], COLOURS[o["colour"]], o["cx"] * side, o["cy"] * side, o["r"] * side)
    return image.resize((image_size, image_size), Image.LANCZOS)


class ScenesDataset(Dataset):
    """``num_examples`` deterministic scenes; item ``i`` is ``{"image", "captions", "metadata", "objects"}``.

    ``split="train"``: a task drawn uniformly, then one of its training records, objects in seen bindings only.
    ``split="heldout"``: the evaluation prompts in rotation (task ``i % 6``, then its records in turn), drawn as
    real pictures of them (for FID and captioning). ``image`` is (3, H, W) in [-1, 1]; ``captions`` the prompt.
    """

    def __init__(self, num_examples: int = 10_000, image_size: int = 32, seed: int = 0, split: str = "train"):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if image_size < 16:
            raise ValueError(f"scenes need image_size >= 16 pixels, got {image_size}")
        self.num_examples, self.image_size, self.seed, self.split = num_examples, image_size, seed, split
        self.records = records(split)
        seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_BINDINGS]
        self.colours = {s: [c for c, t in seen if t == s] for s in SHAPES}  # unnamed colours: seen bindings only

    def __len__(self) -> int:
        return self.num_examples

    def record(self, index: int) -> dict:
        if self.split == "heldout":
            task = TASKS[index % len(TASKS)]
            return self.records[task][(index // len(TASKS)) % len(self.records[task])]
        rng = np.random.default_rng([self.seed, index, 1])
        task = TASKS[int(rng.integers(len(TASKS)))]
        return self.records[task][int(rng.integers(len(self.records[task])))]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        record = self.record(index)
        objects = layout(record, np.random.default_rng([self.seed, index]), self.colours)
        image = to_tensor(draw_scene(objects, self.image_size))
        return {"image": image, "captions": [record["prompt"]], "metadata": record, "objects": objects}
