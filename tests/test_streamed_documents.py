"""Interleaved documents through the shard writer and the streamed reader: records read back as written (segments,
loss flags, pixels), byte-identical for any number of writer workers; streamed rows equal ``document_tokens``'
rows for the same records; a pairs / documents / text mix meets its weights; a resume mid-pass gives the same
rows; `transfusion shards` writes the embedded stories of a story config."""

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from shard_writer import write_set  # noqa: E402

from transfusion.data.embedded.stories import ShapeStories  # noqa: E402
from transfusion.data.preprocess import preprocess_image  # noqa: E402
from transfusion.data.rows.documents import pack, record_document  # noqa: E402
from transfusion.data.rows.sequences import SequenceLayout  # noqa: E402
from transfusion.data.shards.document_records import DocumentRecords  # noqa: E402
from transfusion.data.shards.rows import Consumer, RowContext, Source  # noqa: E402
from transfusion.data.shards.stream import (open_shard_set, pass_order, read_records, record_pictures,  # noqa: E402
                                            record_segments)
from transfusion.data.shards.write import to_uint8, write_shards  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
BOS, EOS, PAD, BOI, EOI = 1, 2, 3, 4, 5
TOK = SimpleNamespace(bos_id=BOS, eos_id=EOS, pad_id=PAD, boi_id=BOI, eoi_id=EOI,
                      encode=lambda s, bos=False, eos=False: [BOS] * bos + [ord(c) for c in s] + [EOS] * eos)
LAYOUT = SequenceLayout(tokenizer=TOK, patches_per_image=4, image_size=8)
SEQ_LEN = 160


def documents(count: int = 14) -> list[dict]:
    """Stories (8 px) with, every fourth, a handmade document: an image first (the limit rule), loss-off text and
    a loss-off image (an edit), and one document too long for SEQ_LEN."""
    stories = ShapeStories(count, image_size=8, seed=5)
    made = []
    for i in range(count):
        story = dict(stories[i])
        if i % 4 == 1:
            story["segments"] = [{"image": 0}, {"text": "a caption after it"}]
            story["images"] = story["images"][:1]
        elif i % 4 == 2:
            story["segments"] = [{"text": "make it so", "loss": False}, {"image": 0, "loss": False},
                                 {"text": "done"}, {"image": 1}]
            story["images"] = story["images"][:2]
        elif i == 11:
            story["segments"] = [{"text": "long " * 40}, {"image": 0}]
        made.append({"key": story["key"], "segments": story["segments"], "images": story["images"]})
    return made


def _write(folder: Path, kind: str, records=None, **options) -> dict:
    return write_shards(DocumentRecords(records or documents()), str(folder), kind=kind, samples_per_shard=4,
                        **options)


def _raw_records(shard_set) -> list[dict]:
    return [raw for s in range(len(shard_set.shards)) for _, raw in read_records(shard_set, s, 0, shard_set.samples[s])]


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_written_documents_read_back_as_written(tmp_path, kind):
    written = documents()
    index = _write(tmp_path / "one", kind)
    assert (index["content"], index["image"], index["skipped"]) == ("documents", "pixels", {})
    assert [s["samples"] for s in index["shards"]] == [4, 4, 4, 2]
    _write(tmp_path / "two", kind, workers=2)  # the bytes do not depend on the number of workers
    for one in sorted((tmp_path / "one").iterdir()):
        assert one.read_bytes() == (tmp_path / "two" / one.name).read_bytes(), one.name
    shard_set = open_shard_set(str(tmp_path / "one"))
    raws = _raw_records(shard_set)
    assert len(raws) == len(written)
    for raw, record in zip(raws, written):
        assert record_segments(raw) == record["segments"]  # loss flags kept
        pictures = record_pictures(raw, "pixels")
        assert len(pictures) == len(record["images"])
        for data, image in zip(pictures, record["images"]):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), to_uint8(image))
    ext = "tar" if kind == "webdataset" else "parquet"  # no index: the content is told from the shards
    bare = open_shard_set(str(tmp_path / "one" / f"*.{ext}"))
    assert (bare.content, bare.image, bare.samples) == ("documents", "pixels", [4, 4, 4, 2])


def _expected_rows(records: list[dict], count: int, max_t: int) -> tuple[list[dict], list[str]]:
    """Rows packed greedily in pass 0's order (shards of 4 in ``pass_order``) from ``record_document`` (the in-memory
    rules); too-long documents left out."""
    docs, skipped = [], []
    shards = [records[i:i + 4] for i in range(0, len(records), 4)]
    for record in [r for s in pass_order(len(shards), 0, 0) for r in shards[s]]:
        doc = record_document(record, TOK, LAYOUT.patches_per_image, max_t)
        (skipped.append(record["key"]) if len(doc.tokens) > SEQ_LEN else docs.append(doc))
    rows, current = [], []
    for doc in docs:
        if sum(len(d.tokens) for d in current) + len(doc.tokens) > SEQ_LEN:
            rows.append(pack(current, SEQ_LEN, LAYOUT.patches_per_image, PAD))
            current = []
        current.append(doc)
    return rows[:count], skipped


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_streamed_rows_equal_in_memory_document_rows(tmp_path, kind):
    records = documents()
    _write(tmp_path / "docs", kind)
    consumer = Consumer([Source("docs", 1.0, open_shard_set(str(tmp_path / "docs")))],
                        RowContext(LAYOUT, SEQ_LEN, (3, 8, 8), image_first_max_t=77), 0, 1)
    with pytest.warns(Warning, match=r"record 3 \(key 000000011\): document longer than seq_len"):
        expected, skipped = _expected_rows(records, 6, max_t=77)
        rows = [consumer.next_row() for _ in range(len(expected))]
    assert skipped == ["train-5-11"] and consumer.state()["skipped"] == {"document longer than seq_len": 1}
    assert len(expected) >= 4 and any("text_loss" in r for r in rows) and any((r["max_t"] == 77).any() for r in rows)
    for got, want in zip(rows, expected):
        for key in ("tokens", "doc_ids", "image_ids", "max_t", "images"):
            assert torch.equal(got[key], want[key]), key
        assert ("text_loss" in got) == ("text_loss" in want)
        if "text_loss" in want:
            assert torch.equal(got["text_loss"], want["text_loss"])
    assert any((r["max_t"] == -1).any() for r in rows)  # the loss-off image enters clean


def test_pairs_documents_and_text_mix_at_their_weights_and_resume(tmp_path):
    write_set(tmp_path / "pairs", [20, 20])
    write_set(tmp_path / "text", [10], content="text")
    _write(tmp_path / "docs", "webdataset")
    weights = [0.6, 0.2, 0.2]
    sources = [Source("pairs", 0.6, open_shard_set(str(tmp_path / "pairs"))),
               Source("docs", 0.2, open_shard_set(str(tmp_path / "docs"))),
               Source("text", 0.2, open_shard_set(str(tmp_path / "text")))]
    ctx = RowContext(LAYOUT, SEQ_LEN, (3, 8, 8))
    consumer = Consumer(sources, ctx, 0, 1)
    n = 400
    rows = [consumer.next_row() for _ in range(n)]
    shares = consumer.state()["source_rows"]
    for k, w in enumerate(weights):
        assert abs(shares[k] - n * w) <= 4 * (n * w * (1 - w)) ** 0.5, (shares, weights)  # 4 sigma binomial
    assert all(t > 0 for t in consumer.state()["source_tokens"])
    assert {r["images"].shape[1:] for r in rows} == {(3, 8, 8)}
    # resume mid-pass (consumer 1 of 2: its 7 documents a pass) from a saved position
    straight = Consumer(sources, ctx, 1, 2)
    for _ in range(7):
        straight.next_row()
    state = straight.state()
    assert 0 < state["sources"][1]["offset"] or state["sources"][1]["pass"] > 0
    later = [straight.next_row() for _ in range(15)]
    resumed = Consumer(sources, ctx, 1, 2, state)
    for a, b in zip(later, [resumed.next_row() for _ in range(15)]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_stories_from_the_story_config(tmp_path, tokenizer_path, autoencoder_ckpt, one_thread):
    """`transfusion shards --config story_embedded.yaml`: the training stories and held-out validation ones."""
    from transfusion.cli import main

    args = ["--config", str(CONFIGS / "story_embedded.yaml"), "--model.init_args.tokenizer", tokenizer_path,
            "--model.init_args.autoencoder", autoencoder_ckpt, "--model.init_args.preset", "debug",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.num_stories", "6", "--data.init_args.val_rows", "2"]
    main(["shards", *args, "--output", str(tmp_path / "stories"), "--samples_per_shard", "4"])
    for split, seed, count, name in (("train", 0, 6, "train"), ("validation", 1, 64, "heldout")):
        shard_set = open_shard_set(str(tmp_path / "stories" / split))
        assert (shard_set.content, shard_set.total) == ("documents", count)
        raws = _raw_records(shard_set)
        expected = ShapeStories(count, 16, seed=seed, split=name)
        for i in (0, count - 1):
            assert record_segments(raws[i]) == expected[i]["segments"]
            got = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in record_pictures(raws[i], "pixels")]
            assert all(np.array_equal(g, to_uint8(e)) for g, e in zip(got, expected[i]["images"]))
    main(["shards", *args, "--output", str(tmp_path / "encoded"), "--encode", "--format", "parquet"])
    encoded = open_shard_set(str(tmp_path / "encoded" / "train"))  # latents of every picture, its fingerprint
    assert (encoded.content, encoded.image, len(encoded.autoencoder_fingerprint)) == ("documents", "latents", 64)
    shape = tuple(json.loads((tmp_path / "encoded" / "train" / "index.json").read_text())["latent_shape"])
    raws = _raw_records(encoded)
    assert all(a.shape == shape for r in raws for a in record_pictures(r, "latents"))
    assert [len(record_pictures(r, "latents")) for r in raws] == [len(s["images"]) for s in ShapeStories(6, 16)]
    with pytest.raises(SystemExit):  # stories are documents only
        main(["shards", *args, "--output", str(tmp_path / "pairs"), "--content", "pairs"])

    # a user's JSONL of interleaved documents (image paths relative to it): bad records counted by reason
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"p{k}.png")
    lines = [{"segments": [{"text": "a cat", "loss": False}, {"image": 0}, {"text": "then a dog"}, {"image": 1}],
              "images": ["p0.png", "p1.png"]},
             {"segments": [{"image": 0}, {"text": "a caption"}], "images": ["p2.png"]},
             {"segments": [{"text": "lost"}, {"image": 0}], "images": ["missing.png"]},
             {"segments": [{"text": "no such image"}, {"image": 1}], "images": ["p0.png"]}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.warns(Warning, match=r"docs.jsonl line 3: missing file \(missing.png\)"):
        main(["shards", *args, "--output", str(tmp_path / "mine"), "--documents", str(tmp_path / "docs.jsonl"),
              "--format", "parquet"])
    index = json.loads((tmp_path / "mine" / "train" / "index.json").read_text())
    assert index["skipped"] == {"bad segments": 1, "missing file": 1} and index["image_size"] == 16
    raws = _raw_records(open_shard_set(str(tmp_path / "mine" / "train")))
    assert [record_segments(r) for r in raws] == [lines[0]["segments"], lines[1]["segments"]]
    got = np.asarray(Image.open(io.BytesIO(record_pictures(raws[1], "pixels")[0])).convert("RGB"))
    assert np.array_equal(got, to_uint8(preprocess_image(str(tmp_path / "p2.png"), 16)))


@pytest.mark.slow
def test_fit_from_streamed_story_shards(tmp_path, tokenizer_path, autoencoder_ckpt):
    """A few steps of `transfusion fit` (debug preset) from streamed story shards mixed with the embedded text."""
    import subprocess

    from test_reliability import _env

    for split, seed, name in (("train", 0, "train"), ("validation", 1, "heldout")):
        write_shards(DocumentRecords(ShapeStories(12, 16, seed=seed, split=name)), str(tmp_path / "stories" / split),
                     samples_per_shard=4)
    result = subprocess.run(
        [sys.executable, "-m", "transfusion.cli", "fit",
         "--config", str(CONFIGS / "transfusion_streamed_embedded.yaml"),
         "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
         "--model.init_args.preset", "debug", "--model.init_args.warmup_steps", "2",
         "--data.init_args.sources", f"[{{url: {tmp_path / 'stories' / 'train'}, weight: 0.8}}]",
         "--data.init_args.val", str(tmp_path / "stories" / "validation"), "--data.init_args.text_weight", "0.2",
         "--data.init_args.seq_len", "128", "--data.init_args.batch_size", "2", "--data.init_args.val_rows", "2",
         "--data.init_args.rows_per_epoch", "8", "--data.init_args.num_workers", "0",
         "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
         "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics or "loss" in metrics, metrics[:500]
    assert "row shares" in result.stderr + result.stdout  # the realised shares are reported


class _Encoder:
    """A stand-in for ``write.Encoder``: "latents" are each picture's per-channel means (shape (3, 1, 1))."""

    storage, dtype, fingerprint, image_size = "latents", np.float32, "f" * 64, 8

    def __call__(self, pixels):
        return [p.astype(np.float32).mean(axis=(0, 1)).reshape(3, 1, 1) for p in pixels]


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_encoded_documents_stream_their_latents(tmp_path, kind):
    records = [r for r in documents(8) if r["key"] != "train-5-11"]
    index = _write(tmp_path / "latents", kind, records, encoder=_Encoder())
    assert (index["image"], index["latent_shape"], index["autoencoder_fingerprint"]) == ("latents", [3, 1, 1], "f" * 64)
    shard_set = open_shard_set(str(tmp_path / "latents"))
    for raw, record in zip(_raw_records(shard_set), records):
        arrays = record_pictures(raw, "latents")
        assert record_segments(raw) == record["segments"] and len(arrays) == len(record["images"])
        for array, image in zip(arrays, record["images"]):
            assert np.array_equal(array, _Encoder()([to_uint8(image)])[0])
    consumer = Consumer([Source("d", 1.0, shard_set)], RowContext(LAYOUT, SEQ_LEN, (3, 1, 1)), 0, 1)
    rows = [consumer.next_row() for _ in range(3)]
    assert all(r["images"].shape[1:] == (3, 1, 1) and r["images"].dtype == torch.float32 for r in rows)
    assert consumer.state()["skipped"] == {}


def test_datamodule_streams_documents_and_holds_out_their_last_shard(tmp_path):
    """Documents only: the last shard is held out for validation; evaluation examples are first pictures and the
    text before them; training batches carry text_loss from the loss-off segments."""
    from transfusion.data.modules.streaming import StreamingDataModule

    records = [r for r in documents(12) if r["key"] != "train-5-11"]
    _write(tmp_path / "docs", "webdataset", records)
    dm = StreamingDataModule([str(tmp_path / "docs")], seq_len=SEQ_LEN, batch_size=2, rows_per_epoch=4, val_rows=2,
                             layout=LAYOUT)
    dm.setup("fit")
    assert dm.val_shards.samples == [3] and len(dm.val_set) == 2
    examples = dm.evaluation_examples(3)
    assert [e["caption"] for e in examples] == [records[8]["segments"][0]["text"], "make it so"]  # 9 is image-first
    assert torch.equal(examples[0]["image"], records[8]["images"][0])
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(b["images"].shape[1:] == (3, 8, 8) for b in batches)
    assert any("text_loss" in b for b in batches)
