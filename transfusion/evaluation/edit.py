"""Edit accuracy on the embedded shapes: did the edited picture change what the instruction asked, and only that?

Each edited picture is read back from its pixels (``transfusion.evaluation.follow.read_shapes``) and compared
with its source's attributes and the edit asked for: ``asked`` (the edited attribute has the new value),
``kept`` (the other three are the source's), ``one_object``, and ``all`` (the three at once); ``asked/<attribute>``
splits ``asked`` by the kind of edit, ``kept/<attribute>`` tells which attribute is lost when it should stay.
"""

from __future__ import annotations

import torch

from transfusion.data.shape_edits import EDITS
from transfusion.data.shapes import ShapeAttributes
from transfusion.evaluation.follow import ATTRIBUTES, read_shapes


class EditScore:
    """``update(edited, sources, edits)``: pictures (N, 3, H, W) in [-1, 1], the ``ShapeAttributes`` of their sources
    and the ``(attribute, value)`` edits asked; ``compute()`` gives the rates."""

    def __init__(self):
        self.records: list[dict] = []

    def update(self, edited: torch.Tensor, sources: list[ShapeAttributes], edits: list[tuple[str, str]]) -> None:
        if not len(edited) == len(sources) == len(edits):
            raise ValueError(f"EditScore.update: {len(edited)} pictures, {len(sources)} sources, {len(edits)} edits")
        for image, source, (attribute, value) in zip(edited, sources, edits):
            if attribute not in EDITS:
                raise ValueError(f"EditScore: unknown attribute {attribute!r}; edits change one of {list(EDITS)}")
            read = read_shapes(image)
            kept = {a: read[a] == getattr(source, a) for a in ATTRIBUTES if a != attribute}
            self.records.append({"attribute": attribute, "asked": read[attribute] == value, "kept": all(kept.values()),
                                 "kept_each": kept, "one_object": read["objects"] == 1})

    def compute(self) -> dict[str, float]:
        n = max(len(self.records), 1)
        rates = {key: sum(r[key] for r in self.records) / n for key in ("asked", "kept", "one_object")}
        rates["all"] = sum(r["asked"] and r["kept"] and r["one_object"] for r in self.records) / n
        for attribute in EDITS:
            mine = [r for r in self.records if r["attribute"] == attribute]
            if mine:
                rates[f"asked/{attribute}"] = sum(r["asked"] for r in mine) / len(mine)
            others = [r["kept_each"][attribute] for r in self.records if attribute in r["kept_each"]]
            if others:
                rates[f"kept/{attribute}"] = sum(others) / len(others)
        return rates
