"""Prompts for ``transfusion predict``: a file of them, or held-out examples of the embedded data.

A prompt file is either plain text (``.txt``: one caption per line, each generating an image) or JSON
Lines (``.jsonl``), one object per line::

    {"prompt": "a small red circle in the top left", "generate": "image"}
    {"image": "photos/cat.png"}                                   # caption an image
    {"segments": ["Describe:", {"image": "a.png"}, "<image>"], "max_new_tokens": 32}

``segments`` is the general form: strings are text, ``{"image": path}`` an input image (paths relative
to the prompt file), and the string ``"<image>"`` generates an image there (last, or between texts: a
story). ``"generate": "image"`` appends it; ``reference`` (optional) is kept for evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from transfusion.errors import UserError
from torch.utils.data import Dataset

from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.images import IMAGE

IMAGE_MARKER = "<image>"


def _segment(value, base: Path, where: str):
    if isinstance(value, str):
        return IMAGE if value == IMAGE_MARKER else value
    if isinstance(value, dict) and set(value) == {"image"} and isinstance(value["image"], str):
        path = base / value["image"]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's ways of failing
            raise UserError(f"{where}: cannot read image {str(path)!r}: {err}") from err
    raise UserError(f"{where}: a segment must be a string or {{\"image\": path}}, got {value!r}")


def read_prompts(path: str | Path) -> list[dict]:
    """Records ``{"prompt": [segments], "reference", "max_new_tokens", "kind"}`` from a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {str(path)!r}: invalid UTF-8 at byte {err.start}") from err
    records = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": [line.strip(), IMAGE], "reference": line.strip(), "max_new_tokens": 0,
                            "kind": "text-to-image"})
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
        unknown = set(item) - {"prompt", "image", "segments", "generate", "reference", "max_new_tokens"}
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(item.get("segments", []), list):
            raise UserError(f"{where}: segments must be a list, got {item['segments']!r}")
        segments = list(item.get("segments", []))
        if "prompt" in item:
            segments.append(item["prompt"])
        if "image" in item:
            segments.append({"image": item["image"]})
        if item.get("generate") not in (None, "image", "text"):
            raise UserError(f"{where}: generate must be 'image' or 'text', got {item['generate']!r}")
        if item.get("generate") == "image":
            segments.append(IMAGE_MARKER)
        if not segments:
            raise UserError(f"{where}: empty prompt (give prompt, image or segments)")
        tokens, reference = item.get("max_new_tokens"), item.get("reference")
        if tokens is not None and (type(tokens) is not int or tokens < 0):
            raise UserError(f"{where}: max_new_tokens must be a non-negative integer, got {tokens!r}")
        if reference is not None and not isinstance(reference, str):
            raise UserError(f"{where}: reference must be a string, got {reference!r}")
        prompt = [_segment(s, path.parent, where) for s in segments]
        has_image = any(isinstance(s, Image.Image) for s in prompt)
        kind = ("edit" if has_image else "text-to-image") if prompt[-1] is IMAGE else "to-text"
        records.append({"prompt": prompt, "reference": item.get("reference"), "kind": kind,
                        "max_new_tokens": item.get("max_new_tokens", None if kind == "to-text" else 0)})
    if not records:
        raise UserError(f"prompt file {str(path)!r} contains no prompt")
    return records


def shapes_prompts(num_examples: int, image_size: int, seed: int, dataset=None) -> list[dict]:
    """Held-out embedded examples (of ``dataset``, default the shapes) as prompts: each caption -> an image, each
    image -> a caption."""
    examples = ShapesDataset(num_examples, image_size, seed=seed) if dataset is None else dataset
    records = []
    for i in range(num_examples):
        example = examples[i]
        caption = example["captions"][0]
        records.append({"prompt": [caption, IMAGE], "reference": caption, "max_new_tokens": 0,
                        "kind": "text-to-image"})
        records.append({"prompt": [example["image"]], "reference": caption, "max_new_tokens": None,
                        "kind": "image-to-text"})
    return records


class PromptDataset(Dataset):
    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {**self.records[index], "index": index}


def collate_prompts(items: list[dict]) -> list[dict]:
    return items


def prompt_text(prompt: list) -> str:
    """A readable one-line form of a prompt's segments."""
    return " ".join(s if isinstance(s, str) else IMAGE_MARKER if s is IMAGE else "[image]" for s in prompt)

