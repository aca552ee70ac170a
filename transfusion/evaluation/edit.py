"""Edit accuracy on the embedded shapes: did the edited picture change what the instruction asked, and only that?

Each edited picture is read back from its pixels (``transfusion.evaluation.follow.read_shapes``) and compared
with its source's attributes and the edit asked for: ``asked`` (the edited attribute has the new value),
``kept`` (the other three are the source's), ``one_object``, ``one_image`` (the prompt's output was exactly one
image: the model ended its document after the edited picture) and ``all`` (the four at once: a prompt answered with
more than one image, or with text after it, fails); ``asked/<attribute>`` splits ``asked`` by the kind of edit,
``kept/<attribute>`` tells which attribute is lost when it should stay. ``asked``, ``kept`` and ``one_object`` read
the first image whatever came after it.
"""

from __future__ import annotations

import torch

from transfusion.data.embedded.shape_edits import EDITS
from transfusion.data.embedded.shapes import ShapeAttributes
from transfusion.evaluation.follow import ATTRIBUTES, read_shapes


class EditScore:
    """``update(edited, sources, edits, single)``: pictures (N, 3, H, W) in [-1, 1] (each prompt's first image), the
    ``ShapeAttributes`` of their sources, the ``(attribute, value)`` edits asked and whether each prompt's output was
    exactly that one image (None: all were); ``compute()`` gives the rates."""

    def __init__(self):
        self.records: list[dict] = []

    def update(self, edited: torch.Tensor, sources: list[ShapeAttributes], edits: list[tuple[str, str]],
               single: list[bool] | None = None) -> None:
        single = [True] * len(edited) if single is None else list(single)
        if not len(edited) == len(sources) == len(edits) == len(single):
            raise ValueError(f"EditScore.update: {len(edited)} pictures, {len(sources)} sources, {len(edits)} edits, "
                             f"{len(single)} output counts")
        for image, source, (attribute, value), one in zip(edited, sources, edits, single):
            if attribute not in EDITS:
                raise ValueError(f"EditScore: unknown attribute {attribute!r}; edits change one of {list(EDITS)}")
            read = read_shapes(image)
            kept = {a: read[a] == getattr(source, a) for a in ATTRIBUTES if a != attribute}
            self.records.append({"attribute": attribute, "asked": read[attribute] == value, "kept": all(kept.values()),
                                 "kept_each": kept, "one_object": read["objects"] == 1, "one_image": bool(one)})

    def compute(self) -> dict[str, float]:
        n = max(len(self.records), 1)
        rates = {key: sum(r[key] for r in self.records) / n for key in ("asked", "kept", "one_object", "one_image")}
        rates["all"] = sum(r["asked"] and r["kept"] and r["one_object"] and r["one_image"] for r in self.records) / n
        for attribute in EDITS:
            mine = [r for r in self.records if r["attribute"] == attribute]
            if mine:
                rates[f"asked/{attribute}"] = sum(r["asked"] for r in mine) / len(mine)
            others = [r["kept_each"][attribute] for r in self.records if attribute in r["kept_each"]]
            if others:
                rates[f"kept/{attribute}"] = sum(others) / len(others)
        return rates
