"""A small local example of real-format editing data, made from the embedded shape edits, in the two layouts the
editing sources read (``transfusion.data.sources.edits``), so the real-data path runs offline:

* ``parquet/{train,validation}.parquet``: an InstructPix2Pix-style table; ``input_image`` and ``edited_image`` are
  PNG bytes in the ``datasets`` Image format, ``edit_prompt`` one phrasing of the edit;
* ``folder/{train,validation}/``: the PNG files and a ``metadata.jsonl`` (``source_file``, ``target_file``,
  ``instruction``), paths relative to the metadata's folder.

Train edits are ``ShapeEdits(split="train", seed=0)``; validation edits ``ShapeEdits(split="heldout", seed=1)``
(attribute combinations never trained on). Edit ``i`` is worded by its phrasing ``i mod 4``::

    python data/prepare_edits.py --output outputs/data/edits     # no network

then ``EditFilesSource(data_files: outputs/data/edits/parquet/train.parquet,
val_data_files: outputs/data/edits/parquet/validation.parquet)`` or
``EditFolderSource(data_dir: outputs/data/edits/folder)``.
"""

import argparse
import io
import json
from pathlib import Path

import datasets

from transfusion.data.embedded.shape_edits import ShapeEdits
from transfusion.images import to_pil


def png(image) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def edits(dataset: ShapeEdits) -> list[dict]:
    """Per edit: file names, PNG bytes and one phrasing, picked by index."""
    items = []
    for i in range(len(dataset)):
        edit = dataset[i]
        items.append({"source_file": f"{i:04d}_source.png", "target_file": f"{i:04d}_target.png",
                      "source": png(edit["source"]), "target": png(edit["target"]),
                      "instruction": edit["instructions"][i % len(edit["instructions"])]})
    return items


def write_parquet(path: Path, items: list[dict]) -> None:
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    table = {"input_image": [{"bytes": it["source"], "path": it["source_file"]} for it in items],
             "edit_prompt": [it["instruction"] for it in items],
             "edited_image": [{"bytes": it["target"], "path": it["target_file"]} for it in items]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    print(f"wrote {path}: {len(items)} edits")


def write_folder(folder: Path, items: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for it in items:
        (folder / it["source_file"]).write_bytes(it["source"])
        (folder / it["target_file"]).write_bytes(it["target"])
    lines = [json.dumps({k: it[k] for k in ("source_file", "target_file", "instruction")}) for it in items]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {folder}: {len(items)} edits ({2 * len(items)} images + metadata.jsonl)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/data/edits")
    parser.add_argument("--train", type=int, default=256, help="train edits")
    parser.add_argument("--validation", type=int, default=64, help="validation edits (held-out combinations)")
    parser.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args(argv)
    out = Path(args.output)
    for split, dataset in (("train", ShapeEdits(args.train, args.image_size, seed=0, split="train")),
                           ("validation", ShapeEdits(args.validation, args.image_size, seed=1, split="heldout"))):
        items = edits(dataset)
        write_parquet(out / "parquet" / f"{split}.parquet", items)
        write_folder(out / "folder" / split, items)


if __name__ == "__main__":
    main()
