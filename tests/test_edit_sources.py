"""Real editing data through `datasets`: the prepared local example loads, in both layouts (Parquet table, image
folder), as exactly the embedded edits it was made from; column names are settings; each class of bad record is
counted, named and skipped (an error in strict mode), and nothing usable is an error."""

import importlib.util
import io
import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from transfusion.data.embedded.shape_edits import ShapeEdits
from transfusion.data.sources.edits import EditFilesSource, EditFolderSource, EditTriples
from transfusion.data.sources.pairs import MAX_WARNINGS, BadDataError, BadDataWarning

SIZE = 16
RED, BLUE = (220, 30, 30), (40, 60, 230)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def square(colour, side=SIZE) -> Image.Image:
    return Image.new("RGB", (side, side), colour)


def mean_colour(image: torch.Tensor) -> np.ndarray:
    return ((image.mean((1, 2)) + 1) * 127.5).numpy()


def edit_folder(root: Path, files: dict[str, bytes], metadata: list[dict]) -> EditFolderSource:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    return EditFolderSource(str(root))


def row(source, target, instruction):
    return {"source_file": source, "target_file": target, "instruction": instruction}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``data/prepare_edits.py`` output: 16 train and 8 validation edits of 16 px."""
    path = Path(__file__).resolve().parents[1] / "data" / "prepare_edits.py"
    spec = importlib.util.spec_from_file_location("prepare_edits", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("edits")
    script.main(["--output", str(out), "--train", "16", "--validation", "8", "--image_size", str(SIZE)])
    return out


def test_prepared_example_loads_as_the_embedded_edits_in_both_layouts(prepared):
    assert sorted(p.name for p in (prepared / "parquet").iterdir()) == ["train.parquet", "validation.parquet"]
    assert len(list((prepared / "folder" / "train").glob("*.png"))) == 32
    embedded = {"train": ShapeEdits(16, SIZE, seed=0, split="train"),
                "validation": ShapeEdits(8, SIZE, seed=1, split="heldout")}
    sources = {"parquet": EditFilesSource(str(prepared / "parquet" / "train.parquet"),
                                          val_data_files=str(prepared / "parquet" / "validation.parquet")),
               "folder": EditFolderSource(str(prepared / "folder"))}
    for layout, source in sources.items():
        for split, edits in embedded.items():
            ds = source.load(split)
            assert sorted(ds.column_names) == ["instructions", "source", "target"], layout
            assert isinstance(ds[0]["instructions"], list) and isinstance(ds[0]["source"], dict)  # undecoded
            triples = EditTriples(ds, SIZE, name=f"{layout} {split}", scan="full")
            assert len(triples) == len(edits) and not triples.skipped and not triples.converted
            wordings = set()
            for i in range(len(edits)):
                item, truth = triples[i], edits[i]
                assert item["source"].shape == item["target"].shape == (3, SIZE, SIZE)
                assert item["source"].dtype == torch.float32
                # PNG is lossless and the images are 8-bit: decoding gives the embedded pixels back
                assert (item["source"] - truth["source"]).abs().max() < 1e-6, (layout, split, i)
                assert (item["target"] - truth["target"]).abs().max() < 1e-6, (layout, split, i)
                assert not torch.equal(item["source"], item["target"])  # an edit changes something
                assert len(item["instructions"]) == 1 and item["instructions"][0] in truth["instructions"]
                wordings.add(truth["instructions"].index(item["instructions"][0]))
            assert wordings == {0, 1, 2, 3}  # the phrasing is picked by index, all of them used
    assert EditFilesSource(str(prepared / "parquet" / "train.parquet")).load("validation") is None
    assert EditFolderSource(str(prepared / "folder" / "train")).load("validation") is None  # no split folders


def test_column_names_are_settings_and_a_missing_column_is_named(tmp_path):
    cells = [{"bytes": png_bytes(square(c)), "path": None} for c in (RED, BLUE)]
    features = datasets.Features({"before": datasets.Image(), "instruction": datasets.Value("string"),
                                  "after": datasets.Image(), "extra": datasets.Value("int64")})
    datasets.Dataset.from_dict({"before": cells, "instruction": ["make it blue", "make it red"],
                                "after": cells[::-1], "extra": [1, 2]}, features=features
                               ).to_parquet(str(tmp_path / "edits.parquet"))
    source = EditFilesSource(str(tmp_path / "*.parquet"), source_column="before", instruction_column="instruction",
                             target_column="after")
    triples = EditTriples(source.load("train"), 8)
    assert [t["instructions"] for t in (triples[0], triples[1])] == [["make it blue"], ["make it red"]]
    assert np.abs(mean_colour(triples[0]["source"]) - RED).max() < 2
    assert np.abs(mean_colour(triples[0]["target"]) - BLUE).max() < 2
    with pytest.raises(ValueError, match=r"no column \['input_image', 'edit_prompt', 'edited_image'\] \(columns: "
                                         r"\['before', 'instruction', 'after', 'extra'\]\); set source_column / "
                                         r"instruction_column / target_column"):
        EditFilesSource(str(tmp_path / "edits.parquet")).load("train")
    with pytest.raises(ValueError, match=r"no column \['prompt'\].*set instruction_column"):
        EditFilesSource(str(tmp_path / "edits.parquet"), source_column="before", target_column="after",
                        instruction_column="prompt").load("train")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        EditFilesSource(str(tmp_path / "nothing-*.parquet")).load("train")


def test_folder_csv_custom_columns_and_phrasings_grouped_per_edit(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(square(RED)))
    (tmp_path / "b.png").write_bytes(png_bytes(square(BLUE)))
    (tmp_path / "metadata.csv").write_text("before,after,prompt\na.png,b.png,make it blue\n"
                                           "a.png,b.png,paint it blue\nb.png,a.png,make it red\n")
    ds = EditFolderSource(str(tmp_path), source_column="before", target_column="after",
                          instruction_column="prompt").load("train")
    assert len(ds) == 2 and ds[0]["instructions"] == ["make it blue", "paint it blue"]
    assert ds[1]["source"]["path"] == str(tmp_path / "b.png")  # relative to the metadata's folder
    with pytest.raises(ValueError, match=r"metadata\.csv: no column \['source_file', 'instruction', 'target_file'\] "
                                         r"\(columns: \['before', 'after', 'prompt'\]\)"):
        EditFolderSource(str(tmp_path)).load("train")
    # a JSONL list of phrasings per edit
    lists = edit_folder(tmp_path / "lists", {"a.png": png_bytes(square(RED)), "b.png": png_bytes(square(BLUE))},
                        [row("a.png", "b.png", ["make it blue", "  turn   it blue "])])
    assert EditTriples(lists.load("train"), 8).instructions == [["make it blue", "turn it blue"]]


def test_each_bad_record_is_counted_named_and_skipped(tmp_path):
    good, other = png_bytes(square(RED)), png_bytes(square(BLUE))
    source = edit_folder(tmp_path, {
        "s0.png": good, "t0.png": other, "s5.png": other, "t5.png": good,
        "corrupt.png": b"\x89PNG\r\n\x1a\n this is not a png",
        "tiny.png": png_bytes(square(RED, side=2)),
    }, [row("s0.png", "t0.png", "make it blue"),
        row("corrupt.png", "t0.png", "make it blue"),
        row("s0.png", "gone.png", "make it blue"),
        row("s0.png", "t5.png", "   "),
        row("s0.png", "tiny.png", "make it small"),
        row("s5.png", "t5.png", "make it red")])
    with pytest.warns(BadDataWarning) as record:
        triples = EditTriples(source.load("train"), 8, name="edits train")
    messages = [str(w.message) for w in record]
    for row_index, name, reason in [(1, "source " + str(tmp_path / "corrupt.png"), "unreadable image"),
                                    (2, "target " + str(tmp_path / "gone.png"), "missing file"),
                                    (3, "s0.png -> " + str(tmp_path / "t5.png"), "empty instruction"),
                                    (4, "target " + str(tmp_path / "tiny.png"), "too small")]:
        assert any(f"row {row_index}, " in m and name in m and reason in m for m in messages), (name, reason, messages)
    assert triples.skipped == {"unreadable image": 1, "missing file": 1, "empty instruction": 1, "too small": 1}
    assert len(triples) == 2 and triples.index == [0, 5]
    assert triples[1]["instructions"] == ["make it red"]
    assert np.abs(mean_colour(triples[1]["source"]) - BLUE).max() < 2
    assert any("edits train: 2 of 6 rows usable; skipped: 1 empty instruction, 1 missing file, 1 too small, "
               "1 unreadable image" in m for m in messages)  # the summary


def test_strict_mode_names_the_row_and_file(tmp_path):
    source = edit_folder(tmp_path, {"a.png": png_bytes(square(RED)), "b.png": png_bytes(square(BLUE))},
                         [row("a.png", "b.png", "make it blue"), row("a.png", "gone.png", "make it blue")])
    with pytest.raises(BadDataError, match=r"row 1, target .*gone\.png: missing file \(strict mode"):
        EditTriples(source.load("train"), 8, strict=True)


def test_everything_bad_stops_with_a_clear_error(tmp_path):
    source = edit_folder(tmp_path, {"a.png": b"junk", "b.png": png_bytes(square(BLUE))},
                         [row("a.png", "b.png", "make it blue"), row("b.png", "b.png", "")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        with pytest.raises(BadDataError, match=r"none of its 2 rows is usable.*1 empty instruction, 1 unreadable"):
            EditTriples(source.load("train"), 8)


def test_decode_failure_found_late_is_replaced_and_warnings_are_capped():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data, good = png_bytes(noise), png_bytes(square(RED))
    rows = [{"source": {"path": "half.png", "bytes": data[: len(data) // 2]}, "target": {"path": None, "bytes": good},
             "instructions": ["x"]},
            {"source": {"path": None, "bytes": good}, "target": {"path": None, "bytes": good}, "instructions": "y"}]
    triples = EditTriples(rows, 8, scan="header")  # the header is intact: it passes the scan
    assert len(triples) == 2
    with pytest.warns(BadDataWarning, match=r"row 0, source half\.png: cannot decode image"):
        item = triples[0]
    assert item["instructions"] == ["y"] and triples.runtime_skips == 1
    with pytest.warns(BadDataWarning, match="cannot decode image"):
        EditTriples(rows, 8, scan="full")
    bad = [{"source": None, "target": None, "instructions": ["x"]}] * 30
    with pytest.warns(BadDataWarning) as record:
        triples = EditTriples(bad + rows[1:], 8)
    assert sum(str(w.message).startswith("skipping") for w in record) == MAX_WARNINGS
    assert triples.skipped == {"no image": 30}
