"""GenEval's scoring rules (Ghosh et al. 2023, ``evaluation/evaluate_images.py``) with our pixel reader as detector.

A prompt is a GenEval metadata record ``{"tag", "include": [...], "exclude": [...], "prompt"}``; each clause names a
``class`` and a ``count`` and may add a ``color`` or a ``position`` ``[relation, index of an earlier include]``.
A picture is right when every include clause holds and no exclude clause does:

* include: the picture holds at least ``count`` objects of the class; of the first ``count`` of them (largest
  first: our detector's confidence order) at least ``count`` have the clause's colour; and each of them stands in
  the relation to every object matched by the clause it points to (``relative_position``: box centres, GenEval's
  margin of 0.1 times the two boxes' extents). A clause that failed matches nothing, so one pointing to it fails.
* exclude: ``count`` or more objects of the class make the picture wrong (counting is exact: "three" includes 3
  and excludes 4).

Per-task accuracy is the share of right pictures of each tag; the overall score is their mean over the tasks
present, as GenEval's ``summary_scores.py``. The detector (``transfusion.evaluation.follow.read_objects``) finds
objects as connected components; one under ``min_area`` of the picture is not counted (GenEval keeps detections
above a confidence threshold).
"""

from __future__ import annotations

import torch

from transfusion.data.embedded.scenes import POSITION_THRESHOLD, TASKS, relative_position
from transfusion.evaluation.follow import read_objects

MIN_AREA = 8 / 1024  # 8 pixels at 32 px: fragments of generated pictures are not objects; the smallest scene
# object (a triangle of half-width 0.12) covers about 26


def detect(image: torch.Tensor, min_area: float = MIN_AREA) -> dict[str, list[dict]]:
    """Objects of a (3, H, W) picture in [-1, 1] by class (shape), largest first, each with ``colour`` and ``box``."""
    H, W = image.shape[-2:]
    found: dict[str, list[dict]] = {}
    for obj in read_objects(image, min_pixels=max(1, round(min_area * H * W))):
        found.setdefault(obj["shape"], []).append(obj)
    return found


def evaluate(objects: dict[str, list[dict]], metadata: dict,
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """(right, reasons it is not) for detected ``objects`` (class -> objects, each with ``colour`` and ``box``)."""
    correct, reasons, matched = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            right = sum(o["colour"] == clause["color"] for o in found)
            if right < count:
                ok = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found {right} {clause['color']}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not all(relation in relative_position(o["box"], t["box"], position_threshold)
                         for o in found for t in matched[target]):
                ok = False
                reasons.append(f"expected {name} {relation} target")
        correct = correct and ok
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], [])) >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {len(objects[clause['class']])}")
    return correct, reasons


def check_metadata(metadata: dict, where: str = "metadata") -> None:
    """Raise a ValueError naming ``where`` when a record is not in GenEval's format."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tag"), str) or "include" not in metadata:
        raise ValueError(f"{where}: a GenEval record needs 'tag' and 'include', got {metadata!r}")
    for kind in ("include", "exclude"):
        for i, clause in enumerate(metadata.get(kind, [])):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) or \
                    not isinstance(clause.get("count"), int) or clause["count"] < 1:
                raise ValueError(f"{where}: {kind}[{i}] needs a 'class' and a 'count' >= 1, got {clause!r}")
            if "position" in clause:
                relation, target = clause["position"]
                if kind != "include" or not 0 <= target < i:
                    raise ValueError(f"{where}: {kind}[{i}] position {clause['position']!r} must point to an "
                                     "earlier include clause")


class GenEvalScore:
    """Accumulates GenEval-style correctness; ``compute()`` gives per-task accuracy and ``overall``."""

    def __init__(self, min_area: float = MIN_AREA, position_threshold: float = POSITION_THRESHOLD):
        self.min_area, self.position_threshold = min_area, position_threshold
        self.results: list[dict] = []  # {"tag", "prompt", "correct", "reasons"}

    def update(self, images: torch.Tensor, metadata: list[dict]) -> None:
        if len(images) != len(metadata):
            raise ValueError(f"GenEvalScore.update: {len(images)} images for {len(metadata)} metadata records")
        for image, record in zip(images, metadata):
            check_metadata(record, f"GenEval record for {record.get('prompt')!r}" if isinstance(record, dict) else "")
            right, reasons = evaluate(detect(image, self.min_area), record, self.position_threshold)
            self.results.append({"tag": record["tag"], "prompt": record.get("prompt"), "correct": right,
                                 "reasons": reasons})

    def compute(self) -> dict[str, float]:
        """``{<tag>: accuracy, ..., "overall": mean over the tags present}`` (GenEval's tags first, in its order)."""
        tags = [t for t in TASKS if any(r["tag"] == t for r in self.results)]
        tags += sorted({r["tag"] for r in self.results} - set(tags))
        rates = {}
        for tag in tags:
            mine = [r["correct"] for r in self.results if r["tag"] == tag]
            rates[tag] = sum(mine) / len(mine)
        rates["overall"] = sum(rates.values()) / len(rates) if rates else 0.0
        return rates
