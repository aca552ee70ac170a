"""`transfusion shards`: shard sets written from the package's sources, read back with plain tarfile / pyarrow."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.data.preprocess import preprocess_image
from transfusion.data.shards import format as fmt
from transfusion.data.shards.write import PairRecords, TextRecords, to_uint8, write_shards
from transfusion.data.sources.pairs import BadDataWarning

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def read_set(root) -> tuple[dict, list[dict]]:
    """(index, records) with tarfile / pyarrow only: ``{"key", "captions" | "text", "image" | "latent" | "codes"}``."""
    root = Path(root)
    index = json.loads((root / "index.json").read_text())
    records = []
    for shard in index["shards"]:
        path = root / shard["path"]
        found = []
        if index["kind"] == "webdataset":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = fmt.split_member(member.name)
                    if not found or found[-1]["key"] != key:
                        found.append({"key": key})
                    data = tar.extractfile(member).read()
                    if ext == "txt":
                        found[-1]["captions" if index["content"] == "pairs" else "text"] = (
                            [data.decode()] if index["content"] == "pairs" else data.decode())
                    elif ext == "json":
                        found[-1]["captions"] = json.loads(data)["captions"]
                    else:
                        found[-1][{"latent.npy": "latent", "codes.npy": "codes"}.get(ext, "image")] = data
        else:
            found = pq.read_table(path).to_pylist()
        assert len(found) == shard["samples"]
        records += found
    return index, records


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def fit_args(tmp_path, config, tokenizer, autoencoder, *more):
    return ["--config", str(CONFIGS / config), "--model.init_args.tokenizer", tokenizer,
            "--model.init_args.autoencoder", autoencoder, "--model.init_args.preset", "debug",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), *more]


def image_folder(root: Path, size=20) -> dict:
    """A metadata.jsonl folder: 5 good images (one with two captions), a truncated PNG (fails when decoded) and a
    missing file (fails the header scan); returns {file name: captions} of the good ones."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    metadata, good = [], {}
    for i in range(5):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + 6, 3), dtype=np.uint8)).save(root / name)
        captions = [f"picture number {i}"] + (["a second caption"] if i == 2 else [])
        metadata += [{"file_name": name, "text": c} for c in captions]
        good[name] = captions
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (9, 9, 9)).save(buffer, format="PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[:-30])
    metadata = [{"file_name": "missing.png", "text": "gone"}, {"file_name": "truncated.png", "text": "cut short"}, *metadata]
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    return good


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_shapes_and_text_from_the_embedded_config(tmp_path, tokenizer_path, autoencoder_ckpt, one_thread, kind):
    """The embedded shapes (train and validation as TransfusionDataModule makes them) and its text corpus."""
    from transfusion.cli import main

    (tmp_path / "news.txt").write_text("".join(f"story {i} about the weather.\n" for i in range(20)))
    args = fit_args(tmp_path, "transfusion_embedded.yaml", tokenizer_path, autoencoder_ckpt,
                    "--data.init_args.num_examples", "6", "--data.init_args.text_path", str(tmp_path / "news.txt"))
    main(["shards", *args, "--output", str(tmp_path / "shapes"), "--format", kind, "--samples_per_shard", "4"])
    for split, seed, count in (("train", 0, 6), ("validation", 1, 64)):
        index, records = read_set(tmp_path / "shapes" / split)
        assert index["kind"] == kind and index["content"] == "pairs" and index["image"] == "pixels"
        assert index["image_size"] == 16 and index["skipped"] == {}
        assert [s["samples"] for s in index["shards"]] == [4] * (count // 4) + ([count % 4] if count % 4 else [])
        assert len({r["key"] for r in records}) == len(records) == count
        expected = ShapesDataset(count, 16, seed=seed)
        for i in (0, count - 1):
            assert records[i]["captions"] == expected[i]["captions"]
            assert np.array_equal(pixels(records[i]["image"]), to_uint8(expected[i]["image"]))

    main(["shards", *args, "--output", str(tmp_path / "text"), "--format", kind, "--content", "text"])
    documents = {s: read_set(tmp_path / "text" / s)[1] for s in ("train", "validation")}
    assert [d["text"] for d in documents["train"]] == [f"story {i} about the weather." for i in range(18)]
    assert [d["text"] for d in documents["validation"]] == [f"story {i} about the weather." for i in (18, 19)]
    with pytest.raises(SystemExit):  # a second run over the output refuses
        main(["shards", *args, "--output", str(tmp_path / "text"), "--format", kind, "--content", "text"])


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_image_folder_pixels_captions_and_skips(tmp_path, tokenizer_path, autoencoder_ckpt, one_thread, kind):
    """An image folder: preprocessed pixels bitwise (PNG), every caption, bad records counted by reason."""
    from transfusion.cli import main

    good = image_folder(tmp_path / "images")
    (tmp_path / "news.txt").write_text("".join(f"story {i}.\n" for i in range(10)))
    args = fit_args(tmp_path, "transfusion_real_cpu.yaml", tokenizer_path, autoencoder_ckpt,
                    "--data.init_args.image_captions.init_args.data_dir", str(tmp_path / "images"),
                    "--data.init_args.text.init_args.paths", str(tmp_path / "news.txt"),
                    "--data.init_args.text.init_args.val_paths", str(tmp_path / "news.txt"),
                    "--data.init_args.val_fraction", "0.2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["shards", *args, "--output", str(tmp_path / "out"), "--format", kind, "--samples_per_shard", "2"])
    assert any("truncated.png" in str(w.message) for w in caught if issubclass(w.category, BadDataWarning))
    indexes, found = {}, {}
    for split in ("train", "validation"):
        indexes[split], records = read_set(tmp_path / "out" / split)
        found.update({tuple(r["captions"]): r for r in records})
    # 7 rows: the last one (img4) held out; 5 train rows pass the header scan, truncated.png fails when decoded
    assert indexes["train"]["skipped"] == {"missing file": 1, "cannot decode image": 1}
    assert sum(s["samples"] for s in indexes["train"]["shards"]) == 4
    assert sum(s["samples"] for s in indexes["validation"]["shards"]) == 1
    assert len(found) == len(good)
    for name, captions in good.items():
        expected = to_uint8(preprocess_image(str(tmp_path / "images" / name), 16))
        assert np.array_equal(pixels(found[tuple(captions)]["image"]), expected)


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_workers_write_identical_bytes(tmp_path, kind):
    """One or two worker processes, shuffled: the same shard bytes, all records once."""
    records = PairRecords(ShapesDataset(11, 16, seed=3))
    for workers in (1, 2):
        write_shards(records, str(tmp_path / f"k{workers}"), kind=kind, samples_per_shard=3, workers=workers,
                     shuffle=True, seed=5)
    files = sorted(p.name for p in (tmp_path / "k1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "k2").iterdir()) and len(files) == 5
    for name in files:
        assert (tmp_path / "k1" / name).read_bytes() == (tmp_path / "k2" / name).read_bytes(), name
    index, stored = read_set(tmp_path / "k1")
    assert sorted(int(r["key"]) for r in stored) == list(range(11))
    assert [int(r["key"]) for r in stored] != list(range(11))  # shuffled
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 2]


def test_encode_latents_equal_the_autoencoder(tmp_path, tokenizer_path, autoencoder_ckpt, one_thread):
    """--encode stores the model's encode_latents of the preprocessed images, with its fingerprint; the set is a
    latent cache for ImageTextDataModule."""
    from transfusion.cli import main
    from transfusion.data.modules.image_text import ImageTextDataModule
    from transfusion.data.sources import ImageFolderSource
    from transfusion.data.sources.latent_cache import LatentPairs, autoencoder_fingerprint
    from transfusion.lightning.transfusion import TransfusionModule

    good = image_folder(tmp_path / "images")
    (tmp_path / "news.txt").write_text("".join(f"story {i}.\n" for i in range(10)))
    args = fit_args(tmp_path, "transfusion_real_cpu.yaml", tokenizer_path, autoencoder_ckpt,
                    "--data.init_args.image_captions.init_args.data_dir", str(tmp_path / "images"),
                    "--data.init_args.text.init_args.paths", str(tmp_path / "news.txt"),
                    "--data.init_args.val_fraction", "0.2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        main(["shards", *args, "--output", str(tmp_path / "out"), "--encode", "--format", "webdataset",
              "--workers", "2", "--samples_per_shard", "2"])
    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug")
    index, records = read_set(tmp_path / "out" / "train")
    assert index["image"] == "latents" and index["latent_shape"] == [4, 4, 4] and index["image_size"] == 16
    assert index["autoencoder_fingerprint"] == autoencoder_fingerprint(module.autoencoder)
    assert index["skipped"] == {"missing file": 1, "cannot decode image": 1}
    by_caption = {tuple(c): name for name, c in good.items()}
    images = torch.stack([preprocess_image(str(tmp_path / "images" / by_caption[tuple(r["captions"])]), 16)
                          for r in records])
    sizes = [s["samples"] for s in index["shards"]]
    assert sizes == [1, 2, 1]  # truncated.png left out of the first shard
    expected = torch.cat([module.autoencoder.encode_latents(part) for part in images.split(sizes)])  # a shard a batch
    stored = torch.from_numpy(np.stack([fmt.read_array(r["latent"]) for r in records]))
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored, expected, rtol=0, atol=0)

    data = ImageTextDataModule(ImageFolderSource(str(tmp_path / "images")), None, text_ratio=0.0, seq_len=48,
                               val_fraction=0.2, latent_cache=str(tmp_path / "out"), layout=module.sequence_layout())
    data.setup("fit")
    assert isinstance(data.pairs["train"], LatentPairs) and len(data.pairs["train"]) == 4
    torch.testing.assert_close(data.pairs["train"][0]["image"], expected[0], rtol=0, atol=0)


def test_fsspec_output_overwrite_and_old_caches(tmp_path):
    """memory:// and file:// outputs; a rerun refuses without --overwrite; an old meta.json cache still loads."""
    from transfusion.data.shards.load import read_records
    from transfusion.data.sources.latent_cache import LatentPairs

    records = PairRecords(ShapesDataset(5, 16))
    index = write_shards(records, "memory://sets/a", kind="parquet", samples_per_shard=2)
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    stored_index, stored = read_records("memory://sets/a")
    assert stored_index == index and [r["captions"] for r in stored] == [records.get(i)["captions"] for i in range(5)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(records, "memory://sets/a", kind="parquet")
    assert write_shards(records, "memory://sets/a", kind="parquet", overwrite=True)["shards"] == [
        {"path": "shard-000000.parquet", "samples": 5}]
    write_shards(TextRecords(["one", "two"]), (tmp_path / "text").as_uri(), kind="webdataset")
    assert [r["text"] for r in read_set(tmp_path / "text")[1]] == ["one", "two"]

    old = tmp_path / "old"  # the earlier cache layout
    (old / "train").mkdir(parents=True)
    np.save(old / "train" / "latents.npy", np.ones((2, 4, 2, 2), np.float32))
    (old / "train" / "captions.jsonl").write_text('["a"]\n["b", "c"]\n')
    (old / "meta.json").write_text(json.dumps({"kind": "latents", "autoencoder_fingerprint": "f" * 64,
                                               "image_size": 16, "skipped": {"train": {}}}))
    pairs = LatentPairs(str(old), "train", "f" * 64, 16)
    assert len(pairs) == 2 and pairs[1]["captions"] == ["b", "c"] and pairs[1]["image"].shape == (4, 2, 2)


def test_index_of_foreign_sets(tmp_path):
    """--index counts img2dataset-style tars from their headers and `datasets` Parquet from its footer."""
    import datasets

    from transfusion.cli import main

    tars = tmp_path / "tars"
    tars.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    for number, count in ((0, 3), (1, 2)):
        with tarfile.open(tars / f"{number:05d}.tar", "w") as tar:
            for i in range(count):
                key = f"{number:05d}{i:04d}"
                for ext, data in (("jpg", jpeg.getvalue()), ("txt", b"a caption"), ("json", b'{"caption": "x"}')):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    main(["shards", "--index", str(tars / "*.tar")])
    index = json.loads((tars / "index.json").read_text())
    assert index["kind"] == "webdataset" and index["content"] == "pairs" and index["image"] == "pixels"
    assert index["shards"] == [{"path": "00000.tar", "samples": 3}, {"path": "00001.tar", "samples": 2}]
    assert fmt.parse_index((tars / "index.json").read_text(), "here")["shards"] == index["shards"]
    from transfusion.data.shards.load import read_records

    stored = read_records(str(tars))[1]  # the set now reads as any other
    assert len(stored) == 5 and stored[0]["captions"] == ["x"] and stored[0]["image"] == jpeg.getvalue()

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for number, count in ((0, 4), (1, 7)):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": jpeg.getvalue(), "path": None}] * count,
                                         "caption": ["c"] * count},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "caption": datasets.Value("string")}))
        ds.to_parquet(str(parquet / f"part-{number}.parquet"))
    main(["shards", "--index", str(parquet)])
    index = json.loads((parquet / "index.json").read_text())
    assert index["kind"] == "parquet" and index["content"] == "pairs"
    assert index["shards"] == [{"path": "part-0.parquet", "samples": 4}, {"path": "part-1.parquet", "samples": 7}]
    stored = read_records(str(parquet))[1]
    assert len(stored) == 11 and stored[-1]["captions"] == ["c"] and stored[-1]["image"] == jpeg.getvalue()
    with pytest.raises(SystemExit):  # refuses to replace an index
        main(["shards", "--index", str(parquet)])
