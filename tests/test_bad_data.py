"""Bad data, one class at a time: each is converted cleanly or skipped with a counted warning naming the
file and reason; strict mode makes it an error; a dataset with nothing usable stops with a clear error."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion.data.modules.image_text import ImageTextDataModule
from transfusion.data.preprocess import preprocess_image
from transfusion.data.rows.sequences import SequenceLayout
from transfusion.data.sources import ImageFolderSource, TextFilesSource
from transfusion.data.sources.pairs import BadDataError, BadDataWarning, ImageCaptionPairs
from transfusion.data.tokenizer import Tokenizer


def png_bytes(image: Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rows(*items):
    """A list of dataset rows from (image, captions) pairs."""
    return [{"image": image, "captions": captions} for image, captions in items]


GOOD = Image.new("RGB", (16, 16), (200, 30, 30))


def folder(tmp_path, files: dict, metadata: list[dict]):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    return ImageFolderSource(str(tmp_path))


@pytest.mark.parametrize("mode, expected", [
    ("L", (76, 76, 76)),            # greyscale of (200, 30, 30)
    ("1", None),
    ("P", (200, 30, 30)),
    ("CMYK", (200, 30, 30)),
    ("YCbCr", (200, 30, 30)),
])
def test_modes_convert_to_rgb(mode, expected):
    image = GOOD.convert(mode)
    out = preprocess_image(image, 8)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    if expected is not None:
        rgb = ((out.mean((1, 2)) + 1) * 127.5).numpy()
        assert np.abs(rgb - expected).max() < 6, (mode, rgb)


def test_transparency_is_flattened_onto_white_and_16_bit_is_rescaled(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    assert preprocess_image(rgba, 8).min() == 1.0  # white
    half = Image.new("LA", (16, 16), (0, 128))
    assert abs(preprocess_image(half, 8).mean().item()) < 0.02  # black at half alpha over white = mid grey
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert preprocess_image(palette, 8).min() == 1.0
    deep = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))  # I;16 white
    (tmp_path / "deep.png").write_bytes(png_bytes(deep))
    reopened = Image.open(tmp_path / "deep.png")
    assert reopened.mode.startswith("I")
    assert preprocess_image(reopened, 8).min() == 1.0
    mid = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))
    assert abs(preprocess_image(mid, 8).mean().item()) < 0.01


def test_each_bad_image_class_is_skipped_and_counted(tmp_path):
    truncated = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    source = folder(tmp_path, {
        "good.png": png_bytes(GOOD),
        "grey.png": png_bytes(GOOD.convert("L")),
        "corrupt.png": b"\x89PNG\r\n\x1a\n this is not a png",
        "text.jpg": b"hello",
        "truncated.png": truncated[:len(truncated) // 2],
        "tiny.png": png_bytes(Image.new("RGB", (2, 2))),
        "huge.png": png_bytes(Image.new("RGB", (200, 200))),
        "empty_caption.png": png_bytes(GOOD),
    }, [{"file_name": n, "text": "a red square"} for n in
        ("good.png", "grey.png", "corrupt.png", "text.jpg", "truncated.png", "tiny.png", "huge.png", "missing.png")]
       + [{"file_name": "empty_caption.png", "text": "   "}])
    with pytest.warns(BadDataWarning) as record:
        pairs = ImageCaptionPairs(source.load("train"), 8, scan="full", min_size=4, max_pixels=100 * 100)
    messages = "\n".join(str(w.message) for w in record)
    for name, reason in [("corrupt.png", "unreadable image"), ("text.jpg", "unreadable image"),
                         ("truncated.png", "cannot decode image"), ("tiny.png", "too small"),
                         ("huge.png", "too large"), ("missing.png", "missing file"),
                         ("empty_caption.png", "empty caption")]:
        assert any(name in line and reason in line for line in messages.splitlines()), (name, reason, messages)
    assert len(pairs) == 2  # good + grey (converted)
    assert pairs.skipped == {"unreadable image": 2, "cannot decode image": 1, "too small": 1, "too large": 1,
                             "missing file": 1, "empty caption": 1}
    assert pairs.converted == {"mode L converted to RGB": 1}
    assert "2 of 9 rows usable" in messages and "1 mode L converted to RGB" in messages  # the summary


def test_truncated_file_found_late_is_replaced_and_counted(tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    items = rows(({"path": None, "bytes": data[: len(data) // 2]}, ["broken"]), (GOOD, ["good"]))
    pairs = ImageCaptionPairs(items, 8, scan="header")  # the header is intact: it passes the scan
    assert len(pairs) == 2
    with pytest.warns(BadDataWarning, match="cannot decode image"):
        item = pairs[0]
    assert item["captions"] == ["good"] and pairs.runtime_skips == 1
    with pytest.raises(BadDataError, match="cannot decode image"):
        ImageCaptionPairs(items, 8, scan="header", strict=True)[0]


def test_strict_mode_names_the_file(tmp_path):
    source = folder(tmp_path, {"good.png": png_bytes(GOOD)},
                    [{"file_name": "good.png", "text": "ok"}, {"file_name": "gone.png", "text": "ok"}])
    with pytest.raises(BadDataError, match=r"gone\.png: missing file.*strict"):
        ImageCaptionPairs(source.load("train"), 8, strict=True)


def test_everything_bad_stops_with_a_clear_error(tmp_path):
    source = folder(tmp_path, {"a.png": b"junk", "b.png": png_bytes(Image.new("RGB", (1, 1)))},
                    [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        with pytest.raises(BadDataError, match=r"none of its 2 rows is usable.*1 too small.*1 unreadable image"):
            ImageCaptionPairs(source.load("train"), 8)


def test_captions_bad_utf8_overlong_and_lists(tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    long = "word " * 500
    items = rows((GOOD, [b"caf\xe9 au lait", "  fine   caption  "]), (GOOD, [long]), (GOOD, [None, ""]))
    with pytest.warns(BadDataWarning, match="caption cut or re-encoded"):
        pairs = ImageCaptionPairs(items, 8, tokenizer=tok, max_caption_tokens=20)
    assert pairs.captions[0] == ["caf\ufffd au lait", "fine caption"]
    assert 0 < len(tok.encode(pairs.captions[1][0])) <= 20
    assert pairs.skipped == {"empty caption": 1} and pairs.converted == {"caption cut or re-encoded": 2}
    # invalid UTF-8 inside metadata.jsonl: replaced with a warning naming the file, or an error in strict mode
    (tmp_path / "a.png").write_bytes(png_bytes(GOOD))
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "na\xefve"}\n')
    with pytest.warns(BadDataWarning, match=r"metadata\.jsonl: invalid UTF-8 at byte"):
        ds = ImageFolderSource(str(tmp_path)).load("train")
    assert ds[0]["captions"] == ["na\ufffdve"]
    with pytest.raises(BadDataError, match="invalid UTF-8"):
        ImageFolderSource(str(tmp_path), strict=True).load("train")


def test_text_files_empty_and_bad_utf8(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 one\nsecond line\nthird line\n")
    source = TextFilesSource(str(tmp_path / "*.txt"), val_fraction=0.34)
    with pytest.warns(BadDataWarning) as record:
        docs = list(source.documents("train"))
    messages = "\n".join(str(w.message) for w in record)
    assert "empty.txt: empty text file" in messages and "blank.txt: empty text file" in messages
    assert "latin1.txt: invalid UTF-8 at byte 3" in messages
    assert docs == ["caf\ufffd one", "second line"]
    with pytest.raises(BadDataError, match="blank.txt: empty text file"):  # the first file in order
        list(TextFilesSource(str(tmp_path / "*.txt"), strict=True).documents("train"))
    with pytest.raises(BadDataError, match="no usable text file"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadDataWarning)
            list(TextFilesSource(str(tmp_path / "e*.txt")).documents("train"))


def test_datamodule_logs_counts_and_propagates_strict(tmp_path, tokenizer_path):
    layout = SequenceLayout(Tokenizer(tokenizer_path), patches_per_image=4, image_size=8)
    source = folder(tmp_path, {f"{i}.png": png_bytes(GOOD) for i in range(4)} | {"bad.png": b"junk"},
                    [{"file_name": "bad.png", "text": "x"}] + [{"file_name": f"{i}.png", "text": f"red {i}"} for i in range(4)])
    dm = ImageTextDataModule(source, None, text_ratio=0.0, seq_len=32, rows_per_epoch=4, val_fraction=0.2, layout=layout)
    with pytest.warns(BadDataWarning, match="bad.png: unreadable image"):
        dm.setup("fit")
    assert dm.data_counts() == {"data/train_pairs": 3, "data/train_skipped": 1, "data/train_converted": 0,
                                "data/validation_pairs": 1, "data/validation_skipped": 0,
                                "data/validation_converted": 0}
    strict = ImageTextDataModule(source, None, text_ratio=0.0, strict=True, layout=layout)
    assert source.strict
    with pytest.raises(BadDataError, match="bad.png"):
        strict.setup("fit")


def test_jsonl_text_with_bad_utf8_is_repaired(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok one"}\n{"text": "bad \xff two"}\n{"text": "three"}\n')
    with pytest.warns(BadDataWarning, match=r"a\.jsonl: invalid UTF-8 at byte 33"):
        docs = list(TextFilesSource(str(tmp_path / "a.jsonl"), val_fraction=0.34).documents("train"))
    assert docs == ["ok one", "bad \ufffd two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_exif_rotation_32_bit_and_float_modes_and_long_captions():
    wide = Image.new("RGB", (32, 16), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 32, 8))  # top half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    rotated = Image.open(io.BytesIO(_jpeg_with_exif(wide, exif)))
    out = preprocess_image(rotated, 8)  # displayed upright: the blue half is on the right
    assert out[2, :, 6:].mean() > out[2, :, :2].mean() + 0.5
    assert preprocess_image(Image.fromarray(np.full((16, 16), 65535, dtype=np.int32), "I"), 8).min() == 1.0
    assert abs(preprocess_image(Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), "F"), 8).mean()) < 0.01
    pairs = ImageCaptionPairs(rows((GOOD, ["word " * 100])), 8, max_caption_chars=32)
    assert pairs.captions[0] == ["word word word word word word"] and pairs.converted == {"caption cut or re-encoded": 1}


def _jpeg_with_exif(image, exif) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()
