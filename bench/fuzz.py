"""Fuzz every input the package reads (issue 27): property-based with ``hypothesis``, one target per input.

    python bench/fuzz.py                                   # every target, 10,000 inputs each
    python bench/fuzz.py --n 1000 --targets image prompts_jsonl --limit 10 --out outputs/fuzz

Each input ends in one of:

* ``ok``: accepted (and what was read is well-formed: records, tensors, a loadable output file);
* ``skip``: a counted skip (``BadRecord`` of an image, a row or shard record counted as skipped);
* ``error``: a user error (``transfusion.errors.UserError``, ``FileNotFoundError``, ``FileExistsError``) whose
  message names the file, record or option; from the CLI, exit status 2 and no traceback;

or in a FAILURE: any other exception (a library's traceback), a user error naming nothing, a hang (over
``--limit`` seconds), or a half-written output. Failure classes are keyed by exception type and the line that
raised it; one example input of each class is written to ``--out``. The exit status is 1 if any input failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

from transfusion.errors import user_error  # noqa: E402


class Hang(BaseException):
    """An input ran over its time limit (a BaseException: no ``except Exception`` in the package swallows it)."""


class Invalid(Exception):
    """The package accepted an input but gave something malformed back (or left a half-written output)."""


class TimeUp(BaseException):
    """The target's time budget (``--seconds``) is spent: no more inputs."""


# ----------------------------------------------------------------------------------------------------------------
# input strategies: mutated valid files, and structured values

SPECIAL_INTS = [0, 1, 2, 7, 255, 256, 65535, 65536, 2 ** 24, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]


def apply_mutations(data: bytes, ops: list) -> bytes:
    """Byte-level mutations: flip a bit, set a byte, cut, insert, repeat a chunk, write a special 32-bit integer."""
    data = bytearray(data)
    for op, where, extra in ops:
        pos = where % (len(data) + 1)
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << (where % 8)
        elif op == "byte" and pos < len(data):
            data[pos] = (extra or b"\xff")[0]
        elif op == "cut":
            data = data[:pos]
        elif op == "insert":
            data[pos:pos] = extra
        elif op == "repeat":
            data[pos:pos] = bytes(data[pos:pos + 64]) * (1 + where % 50)
        elif op == "int" and pos + 4 <= len(data):
            data[pos:pos + 4] = SPECIAL_INTS[where % len(SPECIAL_INTS)].to_bytes(4, "big")
    return bytes(data)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "byte", "cut", "insert", "repeat", "int"]),
                               st.integers(0, 2 ** 32 - 1), st.binary(max_size=16)), max_size=6)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(apply_mutations, st.sampled_from(seeds), MUTATIONS)


TEXT = st.text(st.characters(codec="utf-8"), max_size=200) | st.sampled_from(
    ["", " ", "\x00", "\ufeff", "\u202e", "a" * 100_000, "é" * 5000, "\r\n", "\t\v\f", "<image>", "\ud7ff"])
SCALAR = (st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.sampled_from(SPECIAL_INTS)
          | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


def encoded(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Text in an encoding a user might have (or a broken one)."""
    return st.builds(lambda t, enc: t.encode(enc, errors="replace"), text,
                     st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1", "cp1252", "utf-8-sig", "utf-32"]))


# ----------------------------------------------------------------------------------------------------------------
# seed files

def _image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (CRC fixed) over a tiny body: a huge-dimension header."""
    data = bytearray(_image_bytes(Image.new("RGB", (4, 4), (200, 30, 30)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: ``side`` x ``side`` 1-bit black pixels, a few kilobytes compressed."""
    return _image_bytes(Image.new("1", (side, side)), "PNG", optimize=True)


def image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return [
        _image_bytes(rgb, "PNG"), _image_bytes(rgb, "JPEG", quality=90), _image_bytes(rgb, "JPEG", exif=exif),
        _image_bytes(rgb, "WEBP", lossless=True), _image_bytes(rgb, "WEBP", quality=80), _image_bytes(rgb, "BMP"),
        _image_bytes(rgb, "TIFF"), _image_bytes(rgb.convert("RGBA"), "PNG"), _image_bytes(rgb.convert("L"), "PNG"),
        _image_bytes(rgb.convert("P"), "PNG", transparency=0), _image_bytes(rgb.convert("CMYK"), "JPEG"),
        _image_bytes(Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)), "PNG"),
        _image_bytes(Image.fromarray(rng.random((24, 24), dtype=np.float32), "F"), "TIFF"), gif.getvalue(),
        _image_bytes(Image.new("RGB", (3, 3)), "PNG"), _image_bytes(Image.new("RGB", (4000, 2)), "PNG"),
    ]


IMAGE_SEEDS = image_seeds()
IMAGES = (mutated(IMAGE_SEEDS)
          | st.builds(png_with_size, st.sampled_from(SPECIAL_INTS) | st.integers(0, 100_000),
                      st.sampled_from(SPECIAL_INTS) | st.integers(0, 100_000))
          | st.sampled_from([bomb_png(9000), bomb_png(7000)]))


# ----------------------------------------------------------------------------------------------------------------
# what the targets read: assets made once (a tokenizer, a tiny autoencoder, a checkpoint, a saved folder)

@dataclass
class Assets:
    root: Path
    _made: dict = field(default_factory=dict)

    def _once(self, name: str, make: Callable[[], object]):
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    @property
    def tokenizer(self) -> str:
        def make():
            from transfusion.data.embedded.shapes import all_captions
            from transfusion.data.embedded.text import read_documents, sentences
            from transfusion.data.tokenizer import Tokenizer

            path = self.root / "tokenizer.model"
            Tokenizer.train(sentences(read_documents()[:60]) + all_captions(), path, vocab_size=600)
            return str(path)
        return self._once("tokenizer", make)

    @property
    def autoencoder(self) -> str:
        def make():
            from transfusion.cli import cli_main

            root = self.root / "autoencoder"
            cli = cli_main(["fit", "--config", str(ROOT / "lightning_configs/autoencoder_embedded.yaml"),
                            "--model.init_args.preset", "debug", "--model.init_args.image_size", "16",
                            "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4",
                            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
            return cli.trainer.checkpoint_callback.last_model_path
        return self._once("autoencoder", make)

    def module(self):
        def make():
            from transfusion.lightning.transfusion import TransfusionModule

            module = TransfusionModule(self.tokenizer, self.autoencoder, preset="debug", num_steps=2)
            module.configure_model()
            return module.eval()
        return self._once("module", make)

    @property
    def checkpoint(self) -> str:
        def make():
            import lightning as L

            path = self.root / "transfusion.ckpt"
            trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
            trainer.strategy.connect(self.module())
            trainer.save_checkpoint(path)
            return str(path)
        return self._once("checkpoint", make)

    @property
    def pretrained(self) -> str:
        def make():
            path = self.root / "pretrained"
            self.module().save_pretrained(path)
            return str(path)
        return self._once("pretrained", make)


# ----------------------------------------------------------------------------------------------------------------
# the targets: each writes its input under ``work`` and reads it through the package

@dataclass
class Target:
    name: str
    strategy: Callable[[Assets], st.SearchStrategy]
    run: Callable  # (value, work: Path, assets) -> (outcome "ok" | "skip", names the error must contain)
    cli: bool = False  # the input goes through ``transfusion.cli.main``: exit status 2 and no traceback


def _names(*paths) -> list[str]:
    return [str(p) for p in paths]


# prompt files

def prompts_txt_strategy(assets):
    return mutated([b"a small red circle in the centre\n\na large blue square\n"]) | encoded(TEXT) | st.binary()


def run_prompts(value, work, assets, suffix=".txt"):
    from transfusion.data.rows.prompts import read_prompts
    from transfusion.images import IMAGE

    path = work / f"prompts{suffix}"
    lines, images = value if isinstance(value, tuple) else (value, b"")
    path.write_bytes(lines)
    (work / "b.png").write_bytes(images)
    Image.new("RGB", (16, 16), "red").save(work / "a.png")
    try:
        records = read_prompts(path)
    finally:
        names = _names(path)
    for r in records:
        if not r["prompt"] or not all(isinstance(s, (str, Image.Image)) or s is IMAGE for s in r["prompt"]):
            raise Invalid(f"a prompt of segments other than text, images and IMAGE: {r['prompt']!r}")
        if r["max_new_tokens"] is not None and (type(r["max_new_tokens"]) is not int or r["max_new_tokens"] < 0):
            raise Invalid(f"max_new_tokens {r['max_new_tokens']!r} accepted")
        if r["reference"] is not None and not isinstance(r["reference"], str):
            raise Invalid(f"reference {r['reference']!r} accepted")
    return "ok", names


KEYS = ["prompt", "image", "segments", "generate", "reference", "max_new_tokens", "other"]
PROMPT_VALUES = (JSON | st.sampled_from(["a.png", "b.png", "missing.png", "../a.png", "<image>", "image", "text"])
                 | st.lists(st.sampled_from(["text", "<image>", {"image": "a.png"}, {"image": "b.png"}, {"image": 3},
                                             {"image": None}, {"image": "a.png", "x": 1}, ["nested"]]), max_size=4)
                 | st.fixed_dictionaries({"image": st.sampled_from(["a.png", "b.png", 7, None, "/", ""])}))


def prompts_jsonl_strategy(assets):
    record = st.dictionaries(st.sampled_from(KEYS), PROMPT_VALUES, max_size=4)
    line = st.builds(lambda r: json.dumps(r, allow_nan=True), record) | TEXT | st.just("{\"prompt\": ")
    lines = st.builds(lambda ls: "\n".join(ls).encode("utf-8", errors="surrogatepass"), st.lists(line, max_size=5))
    return st.tuples(lines | mutated([b'{"prompt": "a red circle", "generate": "image"}\n{"image": "a.png"}\n']),
                     IMAGES)


# YAML configs and CLI options

def _model_data_keys() -> tuple[list[str], list[str]]:
    import inspect

    from transfusion.data.modules.embedded import TransfusionDataModule
    from transfusion.lightning.transfusion import TransfusionModule

    return ([k for k in inspect.signature(TransfusionModule.__init__).parameters if k != "self"],
            [k for k in inspect.signature(TransfusionDataModule.__init__).parameters if k != "self"])


MODEL_KEYS, DATA_KEYS = _model_data_keys()
TRAINER_KEYS = ["max_steps", "devices", "precision", "accumulate_grad_batches", "gradient_clip_val",
                "val_check_interval", "limit_val_batches", "log_every_n_steps", "strategy", "accelerator"]
OPTION_VALUES = (SCALAR | st.sampled_from(["-1", "0", "1e9", "nan", "inf", "debug", "[1, 2]", "{a: 1}", "null",
                                           "true", "/nonexistent", "0.5", "-0.5", "cpu", "ddp", "bf16-mixed"]))


def config_yaml_strategy(assets):
    base = (ROOT / "lightning_configs/transfusion_embedded.yaml").read_bytes()
    overrides = st.fixed_dictionaries({"model": st.dictionaries(st.sampled_from(MODEL_KEYS), OPTION_VALUES, max_size=3),
                                       "data": st.dictionaries(st.sampled_from(DATA_KEYS), OPTION_VALUES, max_size=2),
                                       "trainer": st.dictionaries(st.sampled_from(TRAINER_KEYS), OPTION_VALUES,
                                                                  max_size=2)})
    return st.tuples(mutated([base]) | st.just(base), overrides, st.booleans())


def _yaml_value(value):
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _base_args(assets, work) -> list[str]:
    return ["--model.init_args.tokenizer", assets.tokenizer, "--model.init_args.autoencoder", assets.autoencoder,
            "--model.init_args.preset", "debug", "--trainer.default_root_dir", str(work / "run"),
            "--trainer.logger", "false", "--data.init_args.num_workers", "0"]


def run_config_yaml(value, work, assets):
    import yaml

    base, overrides, structured = value
    path = work / "config.yaml"
    if structured:  # a well-formed YAML with odd values
        config = {"model": {"init_args": {k: _yaml_value(v) for k, v in overrides["model"].items()}},
                  "data": {"init_args": {k: _yaml_value(v) for k, v in overrides["data"].items()}},
                  "trainer": {k: _yaml_value(v) for k, v in overrides["trainer"].items()}}
        path.write_text(yaml.safe_dump(config, allow_unicode=True))
        args = ["fit", "--config", str(ROOT / "lightning_configs/transfusion_embedded.yaml"), *_base_args(assets, work),
                "--config", str(path)]
    else:  # the shipped YAML, mutated
        path.write_bytes(base)
        args = ["fit", "--config", str(path), *_base_args(assets, work)]
    return run_cli(args, work, names=_names(path))


def cli_options_strategy(assets):
    option = st.tuples(st.sampled_from([f"--model.init_args.{k}" for k in MODEL_KEYS]
                                       + [f"--data.init_args.{k}" for k in DATA_KEYS]
                                       + [f"--trainer.{k}" for k in TRAINER_KEYS] + ["--ckpt_path", "--seed_everything",
                                                                                     "--nonsense", "--model", "--data"]),
                       OPTION_VALUES.map(lambda v: str(v) if not isinstance(v, str) else v))
    return st.tuples(st.sampled_from(["fit", "validate", "predict"]), st.lists(option, min_size=1, max_size=3))


def run_cli_options(value, work, assets):
    subcommand, options = value
    args = [subcommand, "--config", str(ROOT / "lightning_configs/transfusion_embedded.yaml"), *_base_args(assets, work)]
    for name, option_value in options:
        args += [name, option_value.replace("\x00", "")]
    return run_cli(args, work, names=[])


def run_cli(args: list[str], work: Path, names: list[str], outputs: tuple = ()) -> tuple[str, list[str]]:
    """``transfusion.cli`` in this process up to the point where it would read data (``run=False``)."""
    from transfusion import cli

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if args[0] in cli.SUBCOMMANDS:
                cli.main(args)
            else:
                _cli_without_run(args)
        except SystemExit as exit_:
            code = exit_.code
    message = err.getvalue()
    if code in (0, None):
        return "ok", names
    if code != 2 or "Traceback" in message:
        raise Invalid(f"exit status {code}: {message.strip()[-300:]}")
    for output in outputs:
        if Path(output).exists():
            raise Invalid(f"half-written output {output} left after an error")
    return "error", []


def _cli_without_run(args: list[str]) -> None:
    """``transfusion.cli.main`` with ``run=False``: options parsed, classes built, nothing trained."""
    from transfusion import cli
    from transfusion.errors import one_line

    try:
        cli.cli_main(args[1:], run=False)  # without a subcommand: run=False parses the subcommand's options
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"transfusion {args[0]}: error: {one_line(cause)}", file=sys.stderr)
        raise SystemExit(2) from error


# image files

def run_image(value, work, assets):
    from transfusion.data.preprocess import BadRecord, preprocess_image

    path = work / "image.bin"
    path.write_bytes(value)
    try:
        pixels = preprocess_image(str(path), 16)
    except BadRecord:
        return "skip", []
    if pixels.shape != (3, 16, 16) or not bool(pixels.isfinite().all()) or pixels.abs().max() > 1.0001:
        raise Invalid(f"pixels of shape {tuple(pixels.shape)} outside [-1, 1]")
    return "ok", []


# caption and text files

def text_files_strategy(assets):
    line = TEXT | st.builds(lambda r: json.dumps(r), st.dictionaries(st.sampled_from(["text", "other"]), JSON,
                                                                     max_size=2))
    body = st.builds(lambda ls, sep: sep.join(ls), st.lists(line, max_size=6), st.sampled_from(["\n", "\r\n", "\r"]))
    return st.tuples(encoded(body) | mutated([b"first document.\nsecond document.\n"]) | st.binary(),
                     st.sampled_from([".txt", ".jsonl"]), st.sampled_from(["line", "paragraph", "document"]))


def run_text_files(value, work, assets):
    from transfusion.data.embedded.text import read_documents
    from transfusion.data.sources import TextFilesSource

    data, suffix, sample_by = value
    path = work / f"corpus{suffix}"
    path.write_bytes(data)
    if suffix == ".txt":
        try:
            read_documents(path)
        except Exception as error:
            if user_error(error) is None:
                raise
    source = TextFilesSource(str(path), sample_by=sample_by)
    for split in ("train", "validation"):
        for document in source.documents(split):
            if not isinstance(document, str) or not document.strip():
                raise Invalid(f"document {document!r}")
    return "ok", _names(path)


# metadata.jsonl / metadata.csv of image folders

def metadata_strategy(assets):
    name = st.sampled_from(["a.png", "b.png", "missing.png", "", "../a.png", "sub/", "a.png\x00"]) | JSON
    caption = TEXT | JSON
    names = st.sampled_from(["a.png", "b.png", "missing.png", "", "../a.png", "sub/", "a.png\x00"])
    good = st.fixed_dictionaries({"file_name": names, "text": TEXT | st.lists(TEXT | st.none(), max_size=3)})
    row = good | good | good | st.fixed_dictionaries({"file_name": name, "text": caption}) | st.dictionaries(
        st.sampled_from(["file_name", "text", "other"]), JSON, max_size=3)
    jsonl = st.builds(lambda rows: "\n".join(json.dumps(r) for r in rows).encode(), st.lists(row, max_size=4))
    csv = st.builds(lambda rows: ("file_name,text\n" + "\n".join(f"{a},{b}" for a, b in rows)).encode(
        "utf-8", errors="surrogatepass"), st.lists(st.tuples(TEXT, TEXT), max_size=4))
    seeds = [b'{"file_name": "a.png", "text": "a red circle"}\n{"file_name": "b.png", "text": ["x", "y"]}\n',
             b"file_name,text\na.png,a red circle\nb.png,\"a, b\"\n"]
    return st.tuples(st.sampled_from(["jsonl", "csv"]), jsonl | csv | mutated(seeds) | st.binary(), IMAGES)


def run_metadata(value, work, assets):
    from transfusion.data.sources import ImageFolderSource
    from transfusion.data.sources.pairs import ImageCaptionPairs

    ext, data, image = value
    folder = work / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    (folder / "b.png").write_bytes(image)
    (folder / f"metadata.{ext}").write_bytes(data)
    rows = ImageFolderSource(str(folder)).load("train")
    return _pairs(ImageCaptionPairs(rows, 16, name=str(folder), scan="full", progress=False)), _names(folder)


def _pairs(pairs) -> str:
    for i in range(len(pairs)):
        item = pairs[i]
        if item["image"].shape != (3, 16, 16) or not item["captions"] or not all(
                isinstance(c, str) and c for c in item["captions"]):
            raise Invalid(f"pair {i}: {item['image'].shape} {item['captions']!r}")
    return "skip" if pairs.skipped or pairs.runtime_skips else "ok"


# COCO annotation JSON

def coco_strategy(assets):
    image = st.fixed_dictionaries({"id": st.sampled_from([1, 2, "1", None]) | JSON,
                                   "file_name": st.sampled_from(["a.png", "b.png", "missing.png"]) | JSON})
    annotation = st.fixed_dictionaries({"image_id": st.sampled_from([1, 2, 3, "1"]) | JSON, "caption": TEXT | JSON})
    good_image = st.fixed_dictionaries({"id": st.sampled_from([1, 2, 3]),
                                        "file_name": st.sampled_from(["a.png", "b.png", "missing.png"])})
    good_annotation = st.fixed_dictionaries({"image_id": st.sampled_from([1, 2, 3, 4]), "caption": TEXT})
    good = st.fixed_dictionaries({"images": st.lists(good_image, max_size=3),
                                  "annotations": st.lists(good_annotation, max_size=4)})
    data = good | good | good | st.fixed_dictionaries({"images": st.lists(image, max_size=3) | JSON,
                                                       "annotations": st.lists(annotation, max_size=4) | JSON}) | JSON
    karpathy = st.fixed_dictionaries({"images": st.lists(st.fixed_dictionaries({
        "split": st.sampled_from(["train", "restval", "val"]) | JSON, "filename": st.sampled_from(["a.png"]) | JSON,
        "sentences": st.lists(st.fixed_dictionaries({"raw": TEXT | JSON}), max_size=2) | JSON}), max_size=3) | JSON})
    seed = (b'{"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}], '
            b'"annotations": [{"image_id": 1, "caption": "a red square"}, {"image_id": 2, "caption": "b"}]}')
    return (st.tuples(st.just(False), st.builds(lambda d: json.dumps(d).encode(), data) | mutated([seed]), IMAGES)
            | st.tuples(st.just(True), st.builds(lambda d: json.dumps(d).encode(), karpathy), IMAGES))


def run_coco(value, work, assets):
    from transfusion.data.sources import CocoSource
    from transfusion.data.sources.pairs import ImageCaptionPairs

    karpathy, data, image = value
    folder = work / "coco"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    (folder / "b.png").write_bytes(image)
    path = work / "captions.json"
    path.write_bytes(data)
    source = CocoSource(str(folder), karpathy_split=str(path)) if karpathy else CocoSource(str(folder), str(path))
    rows = source.load("train")
    return _pairs(ImageCaptionPairs(rows, 16, name=str(path), scan="full", progress=False)), _names(path)


# Parquet and tar shards (transfusion/data/shards/)

def _shard_seed(kind: str) -> dict[str, bytes]:
    """A valid 3-record pair shard set of ``kind``: {file name: bytes}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tarfile

    from transfusion.data.shards.format import dump_index, new_index, shard_name

    images = [_image_bytes(Image.new("RGB", (16, 16), c), "PNG") for c in ("red", "green", "blue")]
    captions = [["a red square"], ["a green square", "green"], ["a blue square"]]
    name = shard_name(kind, 0)
    buffer = io.BytesIO()
    if kind == "webdataset":
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i, (image, caption) in enumerate(zip(images, captions)):
                for ext, data in (("json", json.dumps({"captions": caption}).encode()), ("png", image)):
                    info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    else:
        table = pa.table({"key": [f"s{i:06d}" for i in range(3)], "captions": captions, "image": images})
        pq.write_table(table, buffer, row_group_size=2)
    index = new_index(kind, "pairs", image_size=16, shards=[{"path": name, "samples": 3}])
    return {name: buffer.getvalue(), "index.json": dump_index(index).encode()}


def shards_strategy(kind: str):
    def strategy(assets):
        files = _shard_seed(kind)
        shard = next(k for k in files if k != "index.json")
        index = json.loads(files["index.json"])
        tampered_index = st.builds(lambda k, v: json.dumps({**index, k: v}).encode(),
                                   st.sampled_from(list(index) + ["other"]), JSON | st.sampled_from(
                                       [[{"path": shard, "samples": 99}], [{"path": shard, "samples": -1}],
                                        [{"path": "missing.tar", "samples": 3}], [], "pairs", "text", "documents"]))
        return st.tuples(mutated([files[shard]]) | st.just(files[shard]),
                         mutated([files["index.json"]]) | tampered_index | st.just(files["index.json"]),
                         st.just(shard), st.booleans())
    return strategy


def run_shards(value, work, assets):
    from types import SimpleNamespace

    from transfusion.data.rows.sequences import SequenceLayout
    from transfusion.data.shards.load import read_records
    from transfusion.data.shards.rows import Consumer, RowContext, Source
    from transfusion.data.shards.stream import open_shard_set

    shard, index, name, glob = value
    folder = work / "set"
    folder.mkdir()
    (folder / name).write_bytes(shard)
    (folder / "index.json").write_bytes(index)
    names = _names(folder)
    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=3, boi_id=4, eoi_id=5,
                          encode=lambda s, bos=False, eos=False: [1] * bos + [6 + ord(c) % 50 for c in s] + [2] * eos)
    ctx = RowContext(SequenceLayout(tokenizer=tok, patches_per_image=4, image_size=8), 64, (3, 8, 8))
    shard_set = open_shard_set(str(folder / f"*{Path(name).suffix}") if glob else str(folder))  # glob: no index
    consumer = Consumer([Source("set", 1.0, shard_set)], ctx, 0, 1)
    for _ in range(4):  # more rows than the set has records: every record is read, the second pass too
        row = consumer.next_row()
        if row["tokens"].shape != (64,):
            raise Invalid(f"a row of {tuple(row['tokens'].shape)} tokens")
    if shard_set.content == "pairs" and not glob:  # the in-memory reader (the latent cache)
        read_records(str(folder))
    return ("skip" if consumer.skips.counts else "ok"), names


# tokenizer files and options

def tokenizer_file_strategy(assets):
    model = Path(assets.tokenizer).read_bytes()
    hf = _hf_tokenizer_json()
    tampered = st.builds(lambda k, v: json.dumps({**json.loads(hf), k: v}).encode(),
                         st.sampled_from(list(json.loads(hf)) + ["model"]), JSON)
    return (st.tuples(st.just("tokenizer.model"), mutated([model]) | st.binary())
            | st.tuples(st.just("tokenizer.json"), mutated([hf]) | tampered)
            | st.tuples(st.just("tokenizer_config.json"), st.builds(lambda d: json.dumps(d).encode(), JSON)))


def _hf_tokenizer_json() -> bytes:
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a red circle", "a blue square", "a green triangle"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    return tok.to_str().encode()


def run_tokenizer_file(value, work, assets):
    from transfusion.data.tokenizer import Tokenizer

    name, data = value
    if name == "tokenizer_config.json":
        (work / "tokenizer.json").write_bytes(_HF_JSON)
    (work / name).write_bytes(data)
    path = work / ("tokenizer.json" if name == "tokenizer_config.json" else name)
    tok = Tokenizer(path)
    text = "a red circle\x00 é 🙂"
    ids = tok.encode(text, bos=True, eos=True)
    if not all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids):
        raise Invalid(f"ids {ids} outside the vocabulary of {tok.vocab_size}")
    tok.decode(ids)
    return "ok", _names(path)


_HF_JSON = b""


def tokenizer_options_strategy(assets):
    sizes = st.sampled_from(["-1", "0", "1", "6", "50", "300", "600", "100000", "x", "1e3"]) | st.integers(
        -10, 5000).map(str)
    from transfusion.data.embedded.text import read_documents

    corpus = "\n".join(read_documents()[:40]).encode()  # enough text for a few hundred pieces
    return st.tuples(sizes | st.integers(280, 700).map(str), st.sampled_from(["unigram", "bpe", "word", "char", ""]),
                     encoded(st.lists(TEXT, max_size=5).map("\n".join)) | mutated([b"a b c\nd e f\n", corpus])
                     | st.just(corpus), st.booleans())


def run_tokenizer_options(value, work, assets):
    from transfusion.data.tokenizer import Tokenizer

    vocab_size, model_type, text, captions = value
    (work / "text.txt").write_bytes(text)
    output = work / "out" / "t.model"
    args = ["tokenizer", "--output", str(output), "--vocab_size", vocab_size, "--model_type", model_type,
            "--text_path", str(work / "text.txt")]
    if captions:
        args += ["--captions_from"]  # no folders: no captions
    outcome, names = run_cli(args, work, names=[], outputs=(output,))
    if outcome == "ok":
        Tokenizer(output)  # what was written loads
    return outcome, names


# checkpoints and save_pretrained folders

def checkpoint_strategy(assets):
    data = Path(assets.checkpoint).read_bytes()
    return (st.tuples(st.just("bytes"), mutated([data]) | st.builds(lambda n: data[:n], st.integers(0, len(data))))
            | st.tuples(st.sampled_from(["shape", "drop", "extra", "hparam", "no_hparams", "autoencoder"]),
                        st.integers(0, 10 ** 6), SCALAR))


def run_checkpoint(value, work, assets):
    import torch

    from transfusion.errors import check_checkpoint_file
    from transfusion.lightning.transfusion import TransfusionModule

    kind, data, extra = value if len(value) == 3 else (*value, None)
    path = work / "model.ckpt"
    if kind == "bytes":
        path.write_bytes(data)
    elif kind == "autoencoder":
        shutil.copyfile(assets.autoencoder, path)
    else:
        checkpoint = torch.load(assets.checkpoint, weights_only=True)
        state = checkpoint["state_dict"]
        key = sorted(state)[data % len(state)]
        if kind == "shape":
            state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1) if state[key].dim() else \
                torch.zeros(2)
        elif kind == "drop":
            del state[key]
        elif kind == "extra":
            state["unexpected.weight"] = torch.zeros(3)
        elif kind == "hparam":
            hparams = checkpoint["hyper_parameters"]
            hparams[sorted(hparams)[data % len(hparams)]] = extra
        else:
            del checkpoint["hyper_parameters"]
        torch.save(checkpoint, path)
    check_checkpoint_file(path)
    module = TransfusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    if not isinstance(module, TransfusionModule):
        raise Invalid(f"loaded a {type(module).__name__}")
    return "ok", _names(path)


def pretrained_strategy(assets):
    folder = Path(assets.pretrained)
    config = json.loads((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    keys = sorted({*config, *config.get("init_args", {}), *config.get("config", {})})
    return st.tuples(st.sampled_from(["config.json", "init_args", "config", "model.safetensors", "tokenizer.model",
                                      "missing"]),
                     st.sampled_from(keys), JSON, mutated([(folder / "config.json").read_bytes()]),
                     mutated([weights]) | st.builds(lambda n: weights[:n], st.integers(0, len(weights))),
                     mutated([(folder / "tokenizer.model").read_bytes()]))


def run_pretrained(value, work, assets):
    from transfusion.lightning.transfusion import TransfusionModule

    what, key, new, config_bytes, weights, tokenizer = value
    folder = work / "saved"
    shutil.copytree(assets.pretrained, folder)
    config = json.loads((folder / "config.json").read_text())
    if what == "config.json":
        (folder / "config.json").write_bytes(config_bytes)
    elif what in ("init_args", "config"):
        config[what] = {**config[what], key: new}
        (folder / "config.json").write_text(json.dumps(config))
    elif what == "missing":
        (folder / ["config.json", "model.safetensors", "tokenizer.model"][len(key) % 3]).unlink()
    else:
        (folder / what).write_bytes(weights if what == "model.safetensors" else tokenizer)
    module = TransfusionModule.from_pretrained(str(folder))
    if not isinstance(module, TransfusionModule):
        raise Invalid(f"loaded a {type(module).__name__}")
    return "ok", _names(folder)


TARGETS = [
    Target("prompts_txt", prompts_txt_strategy, run_prompts),
    Target("prompts_jsonl", prompts_jsonl_strategy, lambda v, w, a: run_prompts(v, w, a, ".jsonl")),
    Target("config_yaml", config_yaml_strategy, run_config_yaml, cli=True),
    Target("cli_options", cli_options_strategy, run_cli_options, cli=True),
    Target("image", lambda assets: IMAGES, run_image),
    Target("text_files", text_files_strategy, run_text_files),
    Target("metadata", metadata_strategy, run_metadata),
    Target("coco", coco_strategy, run_coco),
    Target("tar_shards", shards_strategy("webdataset"), run_shards),
    Target("parquet_shards", shards_strategy("parquet"), run_shards),
    Target("tokenizer_file", tokenizer_file_strategy, run_tokenizer_file),
    Target("tokenizer_options", tokenizer_options_strategy, run_tokenizer_options, cli=True),
    Target("checkpoint", checkpoint_strategy, run_checkpoint),
    Target("pretrained", pretrained_strategy, run_pretrained),
]


# ----------------------------------------------------------------------------------------------------------------
# running a target: every input classified

@dataclass
class Tally:
    name: str
    outcomes: Counter = field(default_factory=Counter)  # ok / skip / error / failure / hang
    failures: dict = field(default_factory=dict)  # class -> (count, message, example input)
    seconds: float = 0.0

    @property
    def inputs(self) -> int:
        return sum(self.outcomes.values())


def _failure_class(error: BaseException) -> str:
    """The exception type and the deepest line of the package (or else of anything) that it passed through."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/transfusion/" in f.filename and "/bench/" not in f.filename]
    frame = (ours or frames or [None])[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
    return f"{type(error).__name__} at {where}"


def attempt(target: Target, value, assets: Assets, limit: float) -> tuple[str, str | None, str]:
    """(outcome, failure class or None, message) of one input."""
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-", dir=assets.root))

    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome, names = target.run(value, work, assets)
        return outcome, None, ""
    except Hang:
        return "hang", f"hang over {limit:g} s", f"{time.perf_counter() - start:.1f} s"
    except Invalid as error:
        return "failure", f"invalid: {str(error)[:60]}", str(error)
    except Exception as error:  # noqa: BLE001 - classified here
        cause = user_error(error)
        if cause is None:
            return "failure", _failure_class(error), f"{type(error).__name__}: {str(error)[:300]}"
        message = str(cause)
        if "\n" in message.strip() and "mismatched fields:" not in message:  # (a documented list of fields)
            return "failure", f"multi-line {type(cause).__name__}", message[:300]
        named = [n for n in _error_names(target, work) if n in message] or "mismatched fields:" in message
        if not named and not target.cli:
            return "failure", f"unnamed {type(cause).__name__} at {_failure_class(cause).split(' at ')[1]}", message[:300]
        return "error", None, message
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(work, ignore_errors=True)


def _error_names(target: Target, work: Path) -> list[str]:
    """What an error may name: any file or folder the target wrote (the input), or an option."""
    return [str(work)] if not target.cli else []


def run_target(target: Target, assets: Assets, n: int, limit: float, seed: int, out: Path | None,
               progress: bool = True, seconds: float | None = None) -> Tally:
    tally = Tally(target.name)
    strategy = target.strategy(assets)
    start = time.perf_counter()

    @hypothesis_seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(value):
        if seconds is not None and time.perf_counter() - start > seconds:
            raise TimeUp()
        outcome, failure, message = attempt(target, value, assets, limit)
        tally.outcomes[outcome] += 1
        if failure is not None:
            count, first, example = tally.failures.get(failure, (0, message, value))
            tally.failures[failure] = (count + 1, first, example)
            if count == 0 and out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{target.name}-{len(tally.failures)}.txt").write_text(
                    f"{failure}\n{message}\n\n{value!r}"[:200_000])
            if progress and count == 0:
                print(f"  {target.name}: new failure class {failure}: {message[:200]}", file=sys.stderr, flush=True)
        if progress and tally.inputs % 500 == 0:
            print(f"  {target.name}: {tally.inputs} inputs, {dict(tally.outcomes)}", file=sys.stderr, flush=True)

    try:
        one()
    except TimeUp:
        pass
    tally.seconds = time.perf_counter() - start
    return tally


def make_assets(root: Path, tokenizer: str | None = None, autoencoder: str | None = None) -> Assets:
    global _HF_JSON
    assets = Assets(root)
    if tokenizer:
        assets._made["tokenizer"] = tokenizer
    if autoencoder:
        assets._made["autoencoder"] = autoencoder
    _HF_JSON = _hf_tokenizer_json()
    return assets


def quiet() -> None:
    """Keep the libraries' progress bars and warnings out of the report."""
    import logging

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its "Failed to load JSON" lines: the errors say it
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transfusion"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--targets", nargs="+", default=[t.name for t in TARGETS],
                        choices=[t.name for t in TARGETS])
    parser.add_argument("--limit", type=float, default=20.0, help="seconds one input may take (else a hang)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None, help="stop a target after this long (fewer inputs)")
    parser.add_argument("--out", default="outputs/fuzz", help="an example input of each failure class; results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="transfusion-fuzz-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    quiet()
    import torch

    torch.set_num_threads(1)
    assets = make_assets(work)
    results = []
    try:
        for target in [t for t in TARGETS if t.name in args.targets]:
            tally = run_target(target, assets, args.n, args.limit, args.seed, out, seconds=args.seconds)
            results.append(tally)
            print(f"{target.name}: {tally.inputs} inputs in {tally.seconds:.0f} s, {dict(tally.outcomes)}, "
                  f"failure classes: {len(tally.failures)}", flush=True)
            for failure, (count, message, _) in tally.failures.items():
                print(f"    {count} x {failure}: {message[:200]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([{
        "target": t.name, "inputs": t.inputs, "seconds": round(t.seconds, 1), "outcomes": dict(t.outcomes),
        "failures": {k: {"count": c, "message": m} for k, (c, m, _) in t.failures.items()}} for t in results], indent=2))
    print("\n| target | inputs | ok | skip | error | failures | hangs | failure classes |\n|---|---|---|---|---|---|---|---|")
    for t in results:
        o = t.outcomes
        print(f"| {t.name} | {t.inputs} | {o['ok']} | {o['skip']} | {o['error']} | {o['failure']} | {o['hang']} | "
              f"{len(t.failures)} |")
    return 1 if any(t.failures for t in results) else 0


if __name__ == "__main__":
    sys.exit(main())
