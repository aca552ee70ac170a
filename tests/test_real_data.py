"""Real-data sources through `datasets`: COCO, imagefolder, parquet shards and text files made here,
turned into Transfusion rows with the right captions, images and order."""

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion.data.modules.image_text import ImageTextDataModule
from transfusion.data.preprocess import preprocess_image
from transfusion.data.rows.sequences import SequenceLayout
from transfusion.data.sources import (CocoSource, FilesSource, HubSource, HubTextSource, ImageFolderSource,
                                      TextFilesSource)
from transfusion.data.sources.latent_cache import LatentPairs
from transfusion.data.sources.pairs import ImageCaptionPairs
from transfusion.data.tokenizer import Tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 30)}


def save(path, colour, size=(20, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).convert(mode).save(path)
    return path.name


def colour_of(image: torch.Tensor) -> str:
    rgb = ((image.mean((1, 2)) + 1) * 127.5).numpy()
    return min(COLOURS, key=lambda c: np.abs(rgb - COLOURS[c]).sum())


@pytest.fixture
def layout(tokenizer_path):
    return SequenceLayout(Tokenizer(tokenizer_path), patches_per_image=4, image_size=8)


def make_imagefolder(root, colours=("red", "green", "blue", "yellow"), csv=False):
    rows = []
    for i, colour in enumerate(colours):
        name = save(root / f"{i}.png", colour)
        rows += [{"file_name": name, "text": f"a {colour} picture"}, {"file_name": name, "text": f"all {colour}"}]
    if csv:
        (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows))
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_coco(root):
    images = [{"id": 10 + i, "file_name": save(root / "train2017" / f"{i:012d}.jpg", c)}
              for i, c in enumerate(COLOURS)]
    annotations = [{"id": k, "image_id": 10 + i, "caption": f"{t} {c} thing"}
                   for i, c in enumerate(COLOURS) for k, t in enumerate(("one", "a", "some"))]
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    karpathy = {"images": [{"filepath": "train2017", "filename": im["file_name"], "cocoid": im["id"],
                            "split": split, "sentences": [{"raw": f"the {c} one"}, {"raw": f"{c}"}]}
                           for im, c, split in zip(images, COLOURS, ("train", "restval", "val", "test"))]}
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    return root


def test_imagefolder_groups_captions_per_image(tmp_path):
    for csv in (False, True):
        ds = ImageFolderSource(str(make_imagefolder(tmp_path / f"f{csv}", csv=csv))).load("train")
        assert len(ds) == 4 and ds[0]["captions"] == ["a red picture", "all red"]
        assert ds[3]["image"]["path"].endswith("3.png")


def test_coco_and_karpathy_split(tmp_path):
    root = make_coco(tmp_path)
    ds = CocoSource(images=str(root / "train2017"),
                    annotations=str(root / "annotations" / "captions_train2017.json")).load("train")
    assert len(ds) == 4 and ds[1]["captions"] == ["one green thing", "a green thing", "some green thing"]
    assert colour_of(preprocess_image(ds[1]["image"], 8)) == "green"
    karpathy = CocoSource(images=str(root), karpathy_split=str(root / "dataset_coco.json"))
    train, val, test = (karpathy.load(s) for s in ("train", "validation", "test"))
    assert [r["captions"][1] for r in train] == ["red", "green"]  # train + restval
    assert [r["captions"][1] for r in val] == ["blue"] and [r["captions"][1] for r in test] == ["yellow"]


def test_parquet_shards_with_image_bytes(tmp_path):
    import datasets

    for shard, colours in enumerate((("red", "green"), ("blue",))):
        cells = []
        for c in colours:
            buffer = io.BytesIO()
            Image.new("RGB", (12, 12), COLOURS[c]).save(buffer, format="PNG")
            cells.append({"bytes": buffer.getvalue(), "path": None})
        datasets.Dataset.from_dict({"jpg": cells, "caption": [f"{c} square" for c in colours]},
                                   features=datasets.Features({"jpg": datasets.Image(), "caption": datasets.Value("string")})
                                   ).to_parquet(str(tmp_path / f"shard-{shard}.parquet"))
    ds = FilesSource(str(tmp_path / "shard-*.parquet"), image_column="jpg", caption_column="caption").load("train")
    pairs = ImageCaptionPairs(ds, 8, scan="full")
    assert [colour_of(pairs[i]["image"]) for i in range(3)] == ["red", "green", "blue"]
    assert pairs[2]["captions"] == ["blue square"]
    with pytest.raises(ValueError, match="no column"):
        FilesSource(str(tmp_path / "shard-*.parquet")).load("train")


def test_preprocess_resizes_shorter_side_and_centre_crops():
    image = Image.new("RGB", (48, 16), COLOURS["red"])
    image.paste(COLOURS["blue"], (16, 0, 32, 16))  # left third red, centre blue, right red
    out = preprocess_image(image, 8)
    assert out.shape == (3, 8, 8) and out.min() >= -1 and out.max() <= 1
    assert colour_of(out[:, 1:-1, 1:-1]) == "blue"


def test_hub_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="'someone/captions'"):
        HubSource("someone/captions", image_column="jpg", caption_column="txt").load("train")
    with pytest.raises(ConnectionError, match="'allenai/c4'"):
        list(HubTextSource("allenai/c4", config="en", streaming=True).documents("train"))
    assert time.monotonic() - start < 15


def test_text_files_hold_out_and_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\nthird doc\n")
    (tmp_path / "b.txt").write_text("fourth doc\n")
    source = TextFilesSource(str(tmp_path / "*.txt"), val_fraction=0.25)
    assert list(source.documents("train")) == ["first doc", "second doc", "third doc"]
    assert list(source.documents("validation")) == ["fourth doc"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(4)))
    jsonl = TextFilesSource(str(tmp_path / "c.jsonl"), text_column="body", val_paths=str(tmp_path / "b.txt"))
    assert list(jsonl.documents("train")) == [f"doc {i}" for i in range(4)]


def _caption_first_documents(row, tok):
    """(caption text, image index) of each caption-first document in a row."""
    out, tokens, image_ids = [], row["tokens"].tolist(), row["image_ids"].tolist()
    for doc in row["doc_ids"].unique().tolist():
        positions = (row["doc_ids"] == doc).nonzero().flatten().tolist()
        ids = [tokens[p] for p in positions]
        if ids[0] != tok.bos_id or ids[1] == tok.boi_id:
            continue
        boi = ids.index(tok.boi_id)
        patches = [image_ids[p] for p in positions[boi + 1:-2]]
        assert ids[-2:] == [tok.eoi_id, tok.eos_id] and len(set(patches)) == 1 and len(patches) == 4
        out.append((tok.decode(ids[1:boi]), patches[0]))
    return out


def test_datamodule_rows_pair_captions_with_their_images(tmp_path, layout):
    coco = make_coco(tmp_path / "coco")
    (tmp_path / "news.txt").write_text("".join(f"news story number {i} about the weather.\n" for i in range(40)))
    dm = ImageTextDataModule(
        CocoSource(images=str(coco / "train2017"), annotations=str(coco / "annotations" / "captions_train2017.json")),
        TextFilesSource(str(tmp_path / "news.txt")), seq_len=48, rows_per_epoch=64, val_rows=8, val_fraction=0.25,
        p_caption_first=1.0, caption_dropout=0.0, batch_size=4, layout=layout, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.pairs["train"]) == 3 and len(dm.pairs["validation"]) == 1  # held out: the last image
    assert list((tmp_path / "cache").glob("text-*.tokens.bin"))
    seen, text_rows = set(), 0
    for i in range(len(dm.train_set)):
        row = dm.train_set[i]
        if row["images"].shape[0] == 0:
            text_rows += 1
            assert layout.tokenizer.decode(row["tokens"].tolist()).count("news story") >= 1
            continue
        for caption, k in _caption_first_documents(row, layout.tokenizer):
            colour = colour_of(row["images"][k])
            assert caption in {f"{t} {colour} thing" for t in ("one", "a", "some")}, (caption, colour)
            seen.add(caption)
    assert 0 < text_rows < 64 and len(seen) >= 6  # text mixed in; several captions per image used
    assert "yellow" not in " ".join(seen)  # the held-out (last) image never trains
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (4, 48)
    assert layout.tokenizer.decode(dm.heldout_text.tolist()).startswith("news story number 36")  # the last 10%
    assert [e["references"] for e in dm.evaluation_examples(2)] == [["one yellow thing", "a yellow thing", "some yellow thing"]]
    prompts = dm.heldout_prompts(4)
    assert prompts[1]["kind"] == "image-to-text" and len(prompts[1]["reference"]) == 3  # all captions as references


def test_imagefolder_pairs_only_and_text_only(tmp_path, layout):
    folder = make_imagefolder(tmp_path / "images")
    dm = ImageTextDataModule(ImageFolderSource(str(folder)), None, text_ratio=0.0, seq_len=32, rows_per_epoch=8,
                             val_fraction=0.25, layout=layout)
    dm.setup("fit")
    assert all(dm.train_set[i]["images"].shape[0] > 0 for i in range(8))
    (tmp_path / "t.txt").write_text("".join(f"line {i} of text here\n" for i in range(30)))
    dm = ImageTextDataModule(None, TextFilesSource(str(tmp_path / "t.txt")), seq_len=16, rows_per_epoch=8, layout=layout)
    dm.setup("fit")
    assert all(dm.train_set[i]["images"].shape[0] == 0 for i in range(8))
    with pytest.raises(ValueError, match="text_ratio"):
        ImageTextDataModule(ImageFolderSource(str(folder)), None, layout=layout)


def _load_script(name):
    import importlib.util
    import sys
    from pathlib import Path

    data_dir = Path(__file__).resolve().parents[1] / "data"
    sys.path.insert(0, str(data_dir))
    spec = importlib.util.spec_from_file_location(name, data_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wikipedia_markup_becomes_plain_text():
    wiki = _load_script("prepare_wikipedia")
    markup = ("{{Infobox|name={{nested|x}}}}\n'''Anarchism''' is a [[political philosophy]] that advocates "
              "[[self-governance|self-governed]] societies.<ref>Woodcock</ref> [[File:A.jpg|thumb|a [[b]] c]]\n\n"
              "== History ==\n\n* The [http://example.org earliest] anarchist themes are found here today.\n"
              "[[Category:Politics]]\n{| class=wikitable\n| a || b\n|}")
    assert wiki.plain_text(markup) == ("Anarchism is a political philosophy that advocates self-governed societies.\n"
                                       "The earliest anarchist themes are found here today.")


@pytest.mark.slow
def test_real_cpu_configs_train_on_prepared_output(tmp_path, tokenizer_path, autoencoder_ckpt, one_thread):
    """The prepare scripts' output format (digits imagefolder, Wikipedia JSONL) through the shipped real configs."""
    import csv
    import gzip
    from pathlib import Path

    from transfusion.cli import cli_main

    prep = _load_script("prepare_images")
    rows = [[str(int(v)) for v in np.random.default_rng(i).integers(0, 17, 64)] + [str(i % 10)] for i in range(20)]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    prep.write(tmp_path / "digits", prep.digits(gzip.compress(buffer.getvalue().encode())))
    assert json.loads((tmp_path / "digits" / "train" / "metadata.jsonl").read_text().splitlines()[3])["text"][0] == \
        "a handwritten digit 3"
    (tmp_path / "wiki").mkdir()
    for split, n in (("train", 30), ("validation", 5)):
        (tmp_path / "wiki" / f"{split}.jsonl").write_text("".join(
            json.dumps({"title": f"T{i}", "text": f"Article {i} is about topic number {i} and more words."}) + "\n"
            for i in range(n)))
    configs = Path(__file__).resolve().parents[1] / "lightning_configs"
    common = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.init_args.num_workers", "0"]
    cli = cli_main(["fit", "--config", str(configs / "autoencoder_real_cpu.yaml"), *common,
                    "--model.init_args.preset", "debug", "--model.init_args.image_size", "16",
                    "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4",
                    "--data.init_args.source.init_args.data_dir", str(tmp_path / "digits")])
    assert cli.trainer.global_step == 2 and len(cli.datamodule.val_set) == 2
    cli = cli_main(["fit", "--config", str(configs / "transfusion_real_cpu.yaml"), *common,
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                    "--model.init_args.preset", "debug", "--data.init_args.seq_len", "48",
                    "--data.init_args.batch_size", "4", "--data.init_args.cache_dir", str(tmp_path / "cache"),
                    "--data.init_args.image_captions.init_args.data_dir", str(tmp_path / "digits"),
                    "--data.init_args.text.init_args.paths", str(tmp_path / "wiki" / "train.jsonl"),
                    "--data.init_args.text.init_args.val_paths", str(tmp_path / "wiki" / "validation.jsonl")])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.data_counts()["data/train_pairs"] == 18
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["val/loss"].item()))
    # the Chameleon baseline on the same data: a VQ-VAE, then Chameleon
    cli = cli_main(["fit", "--config", str(configs / "vqvae_real_cpu.yaml"), *common,
                    "--model.init_args.preset", "debug", "--model.init_args.image_size", "16",
                    "--model.init_args.codebook_size", "32", "--data.init_args.image_size", "16",
                    "--data.init_args.batch_size", "4", "--data.init_args.source.init_args.data_dir", str(tmp_path / "digits"),
                    "--trainer.default_root_dir", str(tmp_path / "vq"), "--trainer.logger.init_args.save_dir", str(tmp_path / "vq")])
    vq = cli.trainer.checkpoint_callback.last_model_path
    cli = cli_main(["fit", "--config", str(configs / "chameleon_real_cpu.yaml"), *common,
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", vq,
                    "--model.init_args.preset", "debug", "--data.init_args.seq_len", "48",
                    "--data.init_args.batch_size", "4", "--data.init_args.cache_dir", str(tmp_path / "cache"),
                    "--data.init_args.image_captions.init_args.data_dir", str(tmp_path / "digits"),
                    "--data.init_args.text.init_args.paths", str(tmp_path / "wiki" / "train.jsonl"),
                    "--data.init_args.text.init_args.val_paths", str(tmp_path / "wiki" / "validation.jsonl"),
                    "--trainer.default_root_dir", str(tmp_path / "ch"), "--trainer.logger.init_args.save_dir", str(tmp_path / "ch")])
    assert cli.trainer.global_step == 2 and torch.isfinite(torch.tensor(cli.trainer.callback_metrics["val/loss"].item()))


def coco_fit_args(tmp_path, config: str, tokenizer: str, autoencoder: str):
    """A small COCO folder and news file under ``tmp_path``; the `transfusion fit` arguments of ``config`` on them."""
    from pathlib import Path

    coco = make_coco(tmp_path / "coco")
    (tmp_path / "news.txt").write_text("".join(f"news story number {i} about the weather.\n" for i in range(40)))
    configs = Path(__file__).resolve().parents[1] / "lightning_configs"
    return coco, ["--config", str(configs / config),
                  "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
                  "--model.init_args.preset", "debug", "--data.init_args.seq_len", "48", "--data.init_args.batch_size", "4",
                  "--data.init_args.num_workers", "0", "--data.init_args.val_fraction", "0.25",
                  "--data.init_args.image_captions", "transfusion.data.sources.CocoSource",
                  "--data.init_args.image_captions.images", str(coco / "train2017"),
                  "--data.init_args.image_captions.annotations", str(coco / "annotations" / "captions_train2017.json"),
                  "--data.init_args.text.init_args.paths", str(tmp_path / "news.txt"),
                  "--data.init_args.text.init_args.val_paths", str(tmp_path / "news.txt"),
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]


def test_latent_cache_matches_on_the_fly_and_checks_the_autoencoder(tmp_path, tokenizer_path, autoencoder_ckpt,
                                                                    one_thread):
    """`transfusion cache-latents` writes latents equal to on-the-fly encoding; training uses them; another
    autoencoder is refused."""
    from transfusion.cli import main
    from transfusion.lightning.transfusion import TransfusionModule

    coco, args = coco_fit_args(tmp_path, "transfusion_real_cpu.yaml", tokenizer_path, autoencoder_ckpt)
    main(["cache-latents", *args, "--output", str(tmp_path / "latents"), "--batch_size", "2"])
    index = {s: json.loads((tmp_path / "latents" / s / "index.json").read_text()) for s in ("train", "validation")}
    assert {s: sum(x["samples"] for x in i["shards"]) for s, i in index.items()} == {"train": 3, "validation": 1}
    assert index["train"]["image"] == "latents" and index["train"]["latent_shape"] == [4, 4, 4]

    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug")
    layout = module.sequence_layout()
    source = CocoSource(images=str(coco / "train2017"), annotations=str(coco / "annotations" / "captions_train2017.json"))
    kwargs = dict(text_ratio=0.0, seq_len=48, rows_per_epoch=8, val_fraction=0.25, layout=layout)
    cached = ImageTextDataModule(source, None, latent_cache=str(tmp_path / "latents"), **kwargs)
    fresh = ImageTextDataModule(source, None, **kwargs)
    cached.setup("fit"), fresh.setup("fit")
    for i in range(3):
        a, b = cached.pairs["train"][i], fresh.pairs["train"][i]
        assert a["captions"] == b["captions"]
        torch.testing.assert_close(a["image"], module.encode_images(b["image"][None])[0], rtol=1e-5, atol=1e-5)
    row_cached, row_fresh = cached.train_set[0], fresh.train_set[0]
    assert torch.equal(row_cached["tokens"], row_fresh["tokens"])  # same rows, latents in place of pixels
    torch.testing.assert_close(module.encode_images(row_cached["images"]), module.encode_images(row_fresh["images"]),
                               rtol=1e-5, atol=1e-5)

    layout.autoencoder_fingerprint = "0" * 64  # a different autoencoder
    with pytest.raises(ValueError, match="made by another autoencoder"):
        ImageTextDataModule(source, None, latent_cache=str(tmp_path / "latents"), **kwargs).setup("fit")

    from transfusion.cli import cli_main
    cli = cli_main(["fit", *args, "--data.init_args.latent_cache", str(tmp_path / "latents"), "--trainer.max_steps", "2",
                    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2 and isinstance(cli.datamodule.pairs["train"], LatentPairs)


def test_vq_code_cache_matches_on_the_fly_and_trains_chameleon(tmp_path, tokenizer_path, vq_ckpt, one_thread):
    """For a Chameleon config `transfusion cache-latents` writes VQ codes equal to on-the-fly encoding, the rows
    carry them in place of pixels, Chameleon trains from them, and another autoencoder's fingerprint is refused."""
    from transfusion.cli import cli_main, main
    from transfusion.data.rows.sequences import collate_rows
    from transfusion.lightning.chameleon import ChameleonModule

    coco, args = coco_fit_args(tmp_path, "chameleon_real_cpu.yaml", tokenizer_path, vq_ckpt)
    main(["cache-latents", *args, "--output", str(tmp_path / "codes"), "--batch_size", "2"])
    index = {s: json.loads((tmp_path / "codes" / s / "index.json").read_text()) for s in ("train", "validation")}
    assert {s: sum(x["samples"] for x in i["shards"]) for s, i in index.items()} == {"train": 3, "validation": 1}
    assert index["train"]["image"] == "codes" and index["train"]["latent_shape"] == [16]

    module = ChameleonModule(tokenizer_path, vq_ckpt, preset="debug")
    layout = module.sequence_layout()
    source = CocoSource(images=str(coco / "train2017"), annotations=str(coco / "annotations" / "captions_train2017.json"))
    kwargs = dict(text_ratio=0.0, seq_len=48, rows_per_epoch=8, val_fraction=0.25, layout=layout)
    cached = ImageTextDataModule(source, None, latent_cache=str(tmp_path / "codes"), **kwargs)
    fresh = ImageTextDataModule(source, None, **kwargs)
    cached.setup("fit"), fresh.setup("fit")
    for i in range(3):
        a, b = cached.pairs["train"][i], fresh.pairs["train"][i]
        assert a["captions"] == b["captions"] and a["image"].dtype == torch.long
        assert torch.equal(a["image"], module.encode_images(b["image"][None])[0])
    row_cached, row_fresh = cached.train_set[0], fresh.train_set[0]
    assert torch.equal(module.batch_tokens(collate_rows([row_cached])), module.batch_tokens(collate_rows([row_fresh])))

    cli = cli_main(["fit", *args, "--data.init_args.latent_cache", str(tmp_path / "codes"), "--trainer.max_steps", "2",
                    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2 and isinstance(cli.datamodule.pairs["train"], LatentPairs)
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["val/loss"].item()))

    layout.autoencoder_fingerprint = "0" * 64  # e.g. a Transfusion model's KL-VAE
    with pytest.raises(ValueError, match="made by another autoencoder"):
        ImageTextDataModule(source, None, latent_cache=str(tmp_path / "codes"), **kwargs).setup("fit")


def test_webdataset_tar_shards(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, colour in enumerate(("green", "red")):
            for ext, data in (("jpg", None), ("txt", f"a {colour} photo".encode())):
                if data is None:
                    buffer = io.BytesIO()
                    Image.new("RGB", (12, 12), COLOURS[colour]).save(buffer, format="JPEG")
                    data = buffer.getvalue()
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = FilesSource(str(tmp_path / "*.tar"), format="webdataset", image_column="jpg", caption_column="txt").load("train")
    pairs = ImageCaptionPairs(ds, 8, scan="full")
    assert [(colour_of(pairs[i]["image"]), pairs[i]["captions"]) for i in range(2)] == \
        [("green", ["a green photo"]), ("red", ["a red photo"])]
