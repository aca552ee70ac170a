"""Real images with honest captions, as an ``imagefolder`` (``train/`` and ``validation/``, each with a
``metadata.jsonl``), from files that registry packages ship:

* ``digits``: the 1,797 handwritten digits (8x8 pixels, 17 grey levels) of scikit-learn's
  ``sklearn/datasets/data/digits.csv.gz`` (the UCI "Optical Recognition of Handwritten Digits" test set,
  Alpaydin & Kaynak 1998, CC BY 4.0; scikit-learn is BSD-3-Clause). Captions state only what the label says:
  "a handwritten digit 7", "the digit seven, handwritten", "a handwritten 7".
* ``photos``: the photographs and scientific images in scikit-image's ``skimage/data/`` (scikit-image is
  BSD-3-Clause; the images are CC0 or without known copyright restrictions, as scikit-image documents per
  image). Captions are written from scikit-image's own description of each image, nothing more.

Every 10th image is held out in ``validation/``. Images are stored as shipped (the digits as 8x8 greyscale
PNGs): resizing, RGB conversion and cropping happen in the data pipeline::

    python data/prepare_images.py --output outputs/data     # writes outputs/data/{digits,photos}; PyPI access only

then ``ImageFolderSource(data_dir: outputs/data/digits)`` (see ``lightning_configs/transfusion_real_cpu.yaml``).
"""

import argparse
import csv
import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from wheels import read_from_wheel  # noqa: E402

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS = "sklearn/datasets/data/digits.csv.gz"
PHOTOS = {  # file -> captions, from scikit-image's description of each image
    "astronaut.png": ["a colour photograph of the astronaut Eileen Collins", "a portrait of a NASA astronaut"],
    "brick.png": ["a brick wall", "a close-up of a wall of bricks"],
    "camera.png": ["a black and white photograph of a man with a camera", "a grey-level photograph of a cameraman"],
    "cell.png": ["a microscope image of a cell floating in saline"],
    "chelsea.png": ["a photograph of Chelsea the cat", "a cat"],
    "coffee.png": ["a cup of coffee", "a photograph of a coffee cup"],
    "coins.png": ["Greek coins from Pompeii", "a grey-level photograph of many old coins"],
    "grass.png": ["grass", "a close-up of grass"],
    "gravel.png": ["gravel", "a close-up of gravel"],
    "horse.png": ["a black and white silhouette of a horse"],
    "hubble_deep_field.jpg": ["the Hubble eXtreme Deep Field", "a telescope image of distant galaxies"],
    "ihc.png": ["a microscope image of immunohistochemical staining with hematoxylin counterstaining"],
    "logo.png": ["the scikit-image logo"],
    "microaneurysms.png": ["a grey-level medical image of microaneurysms in a retina"],
    "moon.png": ["the surface of the moon"],
    "motorcycle_left.png": ["a photograph of a motorcycle"],
    "page.png": ["a scanned page of text"],
    "phantom.png": ["the Shepp-Logan phantom, a test image of a head cross-section"],
    "retina.jpg": ["a photograph of a human retina"],
    "rocket.jpg": ["the launch of the DSCOVR satellite on a Falcon 9 rocket", "a rocket launch"],
    "text.png": ["a grey-level photograph of printed text"],
    "clock_motion.png": ["a motion-blurred photograph of a clock"],
}


def write(folder: Path, items: list[tuple[str, bytes, list[str]]]) -> None:
    """items: (file name, encoded image, captions); every 10th goes to validation/."""
    for split in ("train", "validation"):
        part = [it for i, it in enumerate(items) if (i % 10 == 9) == (split == "validation")]
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name, data, _ in part:
            (folder / split / name).write_bytes(data)
        lines = [json.dumps({"file_name": name, "text": captions}) for name, _, captions in part]
        (folder / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {folder}: {len(items)} images ({sum(i % 10 == 9 for i in range(len(items)))} in validation/)")


def digits(data: bytes) -> list[tuple[str, bytes, list[str]]]:
    items = []
    for i, row in enumerate(csv.reader(io.StringIO(gzip.decompress(data).decode()))):
        pixels, label = np.array(row[:64], dtype=np.float64).reshape(8, 8), int(float(row[64]))
        buffer = io.BytesIO()
        Image.fromarray((pixels / 16 * 255).round().astype(np.uint8), "L").save(buffer, format="PNG")
        items.append((f"{i:04d}.png", buffer.getvalue(),
                      [f"a handwritten digit {label}", f"the digit {NUMBERS[label]}, handwritten", f"a handwritten {label}"]))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/data")
    parser.add_argument("--sklearn_wheel", default=None, help="an already downloaded scikit-learn wheel")
    parser.add_argument("--skimage_wheel", default=None, help="an already downloaded scikit-image wheel")
    args = parser.parse_args()
    out = Path(args.output)
    write(out / "digits", digits(read_from_wheel("scikit-learn==1.9.1", [DIGITS], args.sklearn_wheel)[DIGITS]))
    members = {f"skimage/data/{name}": name for name in PHOTOS}
    files = read_from_wheel("scikit-image==0.26.0", list(members), args.skimage_wheel)
    write(out / "photos", [(name, files[m], PHOTOS[name]) for m, name in members.items()])


if __name__ == "__main__":
    main()
