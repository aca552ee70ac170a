"""Extract the embedded English text corpus from the gensim wheel.

Source: ``gensim/test/test_data/lee_background.cor`` inside the ``gensim==4.4.0`` wheel on PyPI: the Lee
news corpus (300 Australian Broadcasting Corporation news articles collected by Lee, Pincombe & Welsh,
"An empirical evaluation of models of text document similarity", CogSci 2005), redistributed as test
data with gensim (code LGPL-2.1). One document per line, plain English prose. The extracted file is
committed as ``data/embedded/lee_background.txt``; this script re-creates it:

    python data/prepare_text.py            # needs pip access to PyPI, nothing else
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEMBER = "gensim/test/test_data/lee_background.cor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(Path(__file__).parent / "embedded" / "lee_background.txt"))
    parser.add_argument("--wheel", default=None, help="an already downloaded gensim wheel (skips pip download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                            "-d", tmp, "gensim==4.4.0"], check=True)
            wheel = next(Path(tmp).glob("gensim-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            text = archive.read(MEMBER).decode("utf-8")
    documents = [line.strip() for line in text.splitlines() if line.strip()]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(documents) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(documents)} documents, {sum(len(d.split()) for d in documents)} words")


if __name__ == "__main__":
    main()
