"""GenEval's prompts for ``transfusion predict``: its ``evaluation_metadata.jsonl`` in, its folder layout out.

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) scores text-to-image models with an object detector.
Its prompt file holds one JSON object a line (``include`` ANDed, ``exclude`` ORed; ``position`` names an earlier
``include`` entry)::

    {"tag": "position", "include": [{"class": "bench", "count": 1},
     {"class": "dog", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a dog left of a bench"}

and its evaluator (``evaluation/evaluate_images.py``) reads the folder its generator
(``generation/diffusers_generate.py``) writes::

    <output_dir>/00000/metadata.jsonl       line 1's object, as json.dump writes it
                      /samples/00000.png    N images of the prompt (GenEval's default N = 4), numbered as its
                      /samples/00001.png    generator numbers them (the evaluator reads any ``\\d+.png``)
                      /grid.png             optional
    <output_dir>/00001/...                  line 2

``GenEvalPrompts`` (``transfusion.data.modules.geneval``) gives ``predict`` a batch of whole lines, each expanded to N
text-to-image prompt records (image k of line i seeded ``generation_seed + i N + k``: the same images alone, in any
batch, on any rank), and ``transfusion.lightning.callbacks.GenEvalWriter`` writes each line's folder. A folder is
complete when its ``metadata.jsonl`` (written last) holds its line and ``samples`` holds exactly images 0..N-1: a rerun
skips it, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transfusion.errors import UserError
from transfusion.images import IMAGE

SAMPLE_FILE = re.compile(r"\d+\.png")  # the evaluator's pattern for sample files


def folder_name(index: int) -> str:
    """The folder of line ``index`` (from 0), zero-padded to 5 digits as GenEval's generator writes it."""
    return f"{index:05d}"


def sample_name(k: int) -> str:
    return f"{k:05d}.png"


def _check_entry(entry, where: str, key: str, i: int) -> None:
    what = f"{where}: {key}[{i}]"
    if not isinstance(entry, dict):
        raise UserError(f"{what} must be an object with class and count, got {entry!r}")
    unknown = set(entry) - ({"class", "count", "color", "position"} if key == "include" else {"class", "count"})
    if unknown:
        raise UserError(f"{what}: unknown keys {sorted(unknown)}")
    if not isinstance(entry.get("class"), str) or not entry["class"]:
        raise UserError(f"{what}: class must be a non-empty string, got {entry.get('class')!r}")
    if type(entry.get("count")) is not int or entry["count"] < 1:
        raise UserError(f"{what}: count must be an integer >= 1, got {entry.get('count')!r}")
    if "color" in entry and not isinstance(entry["color"], str):
        raise UserError(f"{what}: color must be a string, got {entry['color']!r}")
    if "position" in entry:
        position = entry["position"]
        if not (isinstance(position, list) and len(position) == 2 and isinstance(position[0], str)
                and type(position[1]) is int and 0 <= position[1] < i):
            raise UserError(f"{what}: position must be [relation, index of an earlier include entry], got {position!r}")


def read_metadata(path: str | Path) -> list[dict]:
    """The objects of a GenEval ``evaluation_metadata.jsonl``, line i (from 0) at index i; a bad line is a
    ``UserError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines shift no folder number
    records = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise UserError(f"{where}: blank line (GenEval numbers its folders by line: remove it)")
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = [key for key in ("prompt", "tag", "include") if key not in item]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} (a GenEval line has prompt, tag, include "
                            "and optionally exclude)")
        unknown = set(item) - {"prompt", "tag", "include", "exclude"}
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise UserError(f"{where}: prompt must be a non-empty string, got {item['prompt']!r}")
        if not isinstance(item["tag"], str) or not item["tag"]:
            raise UserError(f"{where}: tag must be a non-empty string, got {item['tag']!r}")
        for key in ("include", "exclude"):
            entries = item.get(key, [])
            if not isinstance(entries, list) or (key == "include" and not entries):
                raise UserError(f"{where}: {key} must be a {'non-empty ' if key == 'include' else ''}list, "
                                f"got {entries!r}")
            for i, entry in enumerate(entries):
                _check_entry(entry, where, key, i)
        records.append(item)
    if not records:
        raise UserError(f"GenEval metadata file {str(path)!r} contains no line")
    return records


def is_complete(folder: Path, metadata: dict, samples: int) -> bool:
    """Whether ``folder`` holds ``metadata`` (the completion marker, written last) and exactly images 0..samples-1."""
    try:
        if json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8")) != metadata:
            return False
        found = {p.name for p in (folder / "samples").iterdir() if SAMPLE_FILE.fullmatch(p.name)}
    except (OSError, ValueError):
        return False
    return found == {sample_name(k) for k in range(samples)}


class ExpandLines:
    """Collate: each line -> ``samples`` text-to-image prompt records (``transfusion.data.rows.prompts``), with the
    line's ``geneval`` entry for the writer."""

    def __init__(self, samples: int):
        self.samples = samples

    def __call__(self, lines: list[dict]) -> list[dict]:
        n = self.samples
        return [{"prompt": [line["metadata"]["prompt"], IMAGE], "reference": line["metadata"]["prompt"],
                 "kind": "text-to-image", "max_new_tokens": 0, "index": line["index"] * n + k,
                 "geneval": {**line, "sample": k, "samples": n}}
                for line in lines for k in range(n)]
