"""One input per failure class that ``bench/fuzz.py`` found: each now ends in a ``UserError`` (or a counted skip)
naming the file, record or option, where it used to end in a library's traceback, an untyped error or a retry loop.
The table of classes and the fuzz run are in docs/reliability.md ("Fuzzing")."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ prompt files

@pytest.mark.parametrize("line, message", [
    (b"\xff\xfe a caption", r"invalid UTF-8 at byte 0"),  # was UnicodeDecodeError
    (b'{"segments": ["a", {"image": 3}]}', r"a segment must be a string"),  # was TypeError (path / int)
    (b'{"segments": null, "prompt": "a"}', r"segments must be a list"),  # was TypeError
    (b'{"prompt": "a", "max_new_tokens": "many"}', r"max_new_tokens must be a non-negative integer"),  # accepted
    (b'{"prompt": "a", "reference": {"x": 1}}', r"reference must be a string"),  # accepted
])
def test_prompt_file(tmp_path, line, message):
    from transfusion.data.rows.prompts import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(UserError, match=message) as error:
        read_prompts(path)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------------------------ text files

def test_text_corpus_file(tmp_path):
    from transfusion.data.embedded.text import read_documents, split_documents

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"ok\n\x89PNG\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}.*invalid UTF-8 at byte 3"):  # was UnicodeDecodeError
        read_documents(path)
    path.write_bytes(b"\n \n")
    with pytest.raises(UserError, match="contains no non-empty line"):  # was an untyped ValueError
        read_documents(path)
    with pytest.raises(UserError, match="at least two documents"):
        split_documents(["one"])


def test_text_files_source(tmp_path):
    from transfusion.data.sources import TextFilesSource

    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(UserError, match=rf"cannot read json files .*corpus\.jsonl.*JSON parse error"):  # was
        list(TextFilesSource(str(path)).documents("train"))  # datasets' DatasetGenerationError, no file named
    path = tmp_path / "one.txt"
    path.write_text("a single document\n")
    with pytest.raises(UserError, match=r"one\.txt.*needs at least two documents.*got 1"):
        list(TextFilesSource(str(path)).documents("train"))


# ------------------------------------------------------------------------------------------------ image folders, COCO

@pytest.mark.parametrize("name, data, message", [
    ("metadata.jsonl", b'{"file_name": "a.png", "text": "a"}\n{"file_name": \n', r"cannot read .*metadata\.jsonl"),
    ("metadata.csv", b"name,caption\na.png,a\n", r"metadata\.csv' has no column 'file_name'"),
    ("metadata.jsonl", b'{"file_name": "a.png", "text": {"en": "a"}}\n',  # was pyarrow's ArrowTypeError
     r"metadata\.jsonl' row 1: file_name must be a string and text a string or a list of strings"),
])
def test_image_folder_metadata(tmp_path, name, data, message):
    from transfusion.data.sources import ImageFolderSource

    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=message):
        ImageFolderSource(str(tmp_path)).load("train")


@pytest.mark.parametrize("data, message", [
    (b'{"images": [], "annotations": [{"image_id": 1, "caption": "a"}]\xff}', "is not valid JSON"),
    (b'{"images": [{"id": 1, "file_name": "a.png"}]}', r"not in the COCO captions layout \(KeyError: 'annotations'"),
    (b'{"images": null, "annotations": []}', r"not in the COCO captions layout \(TypeError"),
    (b'[1, 2]', r"not in the COCO captions layout \(TypeError"),
])
def test_coco_annotations(tmp_path, data, message):
    from transfusion.data.sources import CocoSource

    path = tmp_path / "captions.json"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as error:
        CocoSource(str(tmp_path), str(path)).load("train")
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------------------------ shards

def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _shard_set(folder: Path, shard: bytes, name: str = "shard-000000.tar", samples: int = 2,
               index: bytes | None = None) -> Path:
    from transfusion.data.shards.format import dump_index, new_index

    folder.mkdir()
    (folder / name).write_bytes(shard)
    kind = "webdataset" if name.endswith(".tar") else "parquet"
    (folder / "index.json").write_bytes(index if index is not None else dump_index(
        new_index(kind, "pairs", shards=[{"path": name, "samples": samples}])).encode())
    return folder


PAIRS = [("s0.json", b'{"captions": ["red"]}'), ("s0.png", _png()), ("s1.json", b'{"captions": ["blue"]}'),
         ("s1.png", _png("blue"))]


def _consumer(folder: Path):
    from types import SimpleNamespace

    from transfusion.data.rows.sequences import SequenceLayout
    from transfusion.data.shards.rows import Consumer, RowContext, Source
    from transfusion.data.shards.stream import open_shard_set

    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=3, boi_id=4, eoi_id=5,
                          encode=lambda s, bos=False, eos=False: [1] * bos + [6] * len(s) + [2] * eos)
    ctx = RowContext(SequenceLayout(tokenizer=tok, patches_per_image=4, image_size=8), 48, (3, 8, 8))
    return Consumer([Source("s", 1.0, open_shard_set(str(folder)))], ctx, 0, 1)


@pytest.mark.parametrize("index, message", [
    (b'{"format": 1, "kind": "webdataset"\xff}', "not valid JSON"),  # was UnicodeDecodeError
    (b'{"format": 1, "kind": "zip", "content": "pairs", "image": "pixels", "shards": []}', "kind must be one of"),
])
def test_shard_index(tmp_path, index, message):
    from transfusion.data.shards.load import read_records
    from transfusion.data.shards.stream import open_shard_set

    folder = _shard_set(tmp_path / "set", _tar(PAIRS), index=index)
    for read in (open_shard_set, read_records):  # the streamed and the in-memory reader (was: untyped ValueError)
        with pytest.raises(UserError, match=message) as error:
            read(str(folder))
        assert str(folder / "index.json") in str(error.value)


@pytest.fixture
def no_retry(monkeypatch):
    """Fails a test whose read backs off (a retry sleeps): corrupt shards are named at once, not retried."""
    import transfusion.data.shards.stream as stream

    monkeypatch.setattr(stream.time, "sleep", lambda seconds: pytest.fail(f"retried (slept {seconds} s)"))


def test_corrupt_tar_shard_is_named_at_once(tmp_path, no_retry):
    shard = bytearray(_tar(PAIRS))
    shard[150] ^= 0xFF  # the first header's checksum field: tarfile's ReadError, which used to be retried 3 times
    folder = _shard_set(tmp_path / "set", bytes(shard))
    with pytest.raises(UserError, match=r"shard-000000\.tar: not a readable tar \(invalid header\)"):
        _consumer(folder).next_row()


def test_corrupt_parquet_shard_is_named_at_once(tmp_path, no_retry):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"key": ["a", "b"], "captions": [["red"], ["blue"]], "image": [_png(), _png()]}), buffer)
    data = buffer.getvalue()
    captions = pa.array([b"red", b"blue \x80"], pa.binary()).view(pa.string())  # a string that is not UTF-8
    buffer = io.BytesIO()
    pq.write_table(pa.table({"key": ["a", "b"], "caption": captions, "image": [_png(), _png()]}), buffer)
    for shard in (b"not parquet at all", data[:4] + b"\x00" * 200 + data[204:],  # no footer; a corrupt page; was
                  buffer.getvalue()):  # ArrowInvalid, OSError retried 3 times (3.5 s), UnicodeDecodeError
        folder = _shard_set(tmp_path / f"set{len(shard)}", shard, name="shard-000000.parquet")
        for source in (folder, folder / "*.parquet"):  # with its index.json, and a glob (counted from the footer)
            with pytest.raises(UserError, match=r"shard-000000\.parquet: not a readable Parquet file") as error:
                _consumer(source).next_row()
            assert "\n" not in str(error.value)


def test_all_records_skipped_and_the_in_memory_reader(tmp_path):
    from transfusion.data.shards.load import read_records
    from transfusion.data.sources.pairs import BadDataError

    no_images = [("s0.json", b'{"captions": ["red"]}'), ("s1.json", b'{"captions": ["blue"]}')]
    folder = _shard_set(tmp_path / "set", _tar(no_images))
    with pytest.raises(BadDataError, match=r"all skipped \(\{'no image': 2\}\)"):  # was an untyped ValueError
        _consumer(folder).next_row()
    with pytest.raises(UserError, match=r"shard-000000\.tar: s0: no image"):  # was RuntimeError (StopIteration)
        read_records(str(folder))
    folder = _shard_set(tmp_path / "three", _tar(PAIRS), samples=3)
    with pytest.raises(UserError, match=r"shard-000000\.tar: 2 records, its index says 3"):
        read_records(str(folder))


# ------------------------------------------------------------------------------------------------ tokenizer files

def test_tokenizer_files(tmp_path, tokenizer_path):
    from transfusion.data.tokenizer import Tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(Path(tokenizer_path).read_bytes()[:100])  # was sentencepiece's RuntimeError: INTERNAL
    with pytest.raises(UserError, match=rf"tokenizer '{re.escape(str(path))}' is not a SentencePiece model"):
        Tokenizer(path)
    model = Path(tokenizer_path).read_bytes()
    start = model.index(b"<0x65>") + 2
    path.write_bytes(model[:start] + b"\x83" + model[start + 1:])  # a piece of invalid UTF-8: was UnicodeDecodeError
    with pytest.raises(UserError, match=r"is not a SentencePiece model \('utf-8' codec can't decode byte 0x83"):
        Tokenizer(path)
    path = tmp_path / "tokenizer.json"
    for text in ('{"model": 3}', '{"padding": {"strategy": "\\n"}}'):  # an untyped ValueError; a message of 2 lines
        path.write_text(text)
        with pytest.raises(UserError, match=r"tokenizer\.json' is not a Hugging Face tokenizer\.json") as error:
            Tokenizer(path)
        assert "\n" not in str(error.value)


def test_hugging_face_tokenizer_config(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    from transfusion.data.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a red circle"] * 4, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    config = tmp_path / "tokenizer_config.json"
    for text, message in (("[1]", "must hold a JSON object, got list"),  # was AttributeError
                          ('{"bos_token": 7}', "a special token must be a string, got 7"),  # was TypeError
                          ('{"bos_token": "<s>"', "is not valid JSON")):
        config.write_text(text)
        with pytest.raises(UserError, match=message) as error:
            Tokenizer(tmp_path / "tokenizer.json")
        assert str(config) in str(error.value)


# ------------------------------------------------------------------------------------------------ CLI

def test_config_file_and_trainer_options(tmp_path, capsys, monkeypatch):
    from transfusion.cli import main

    monkeypatch.delenv("TRANSFUSION_DEBUG", raising=False)
    autoencoder = ["fit", "--config", "lightning_configs/autoencoder_embedded.yaml"]
    config = tmp_path / "config.yaml"
    config.write_bytes(b"trainer:\n  max_steps: 3\xff\n")  # was jsonargparse's UnicodeDecodeError
    for args, message in ((["fit", "--config", str(config)], f"config file {config}: invalid UTF-8 at byte 23"),
                          (["fit", f"--config={config}"], "invalid UTF-8 at byte 23"),
                          ([*autoencoder, "--trainer.devices", "0", "--trainer.accelerator", "cpu"],
                           "invalid trainer option: `Trainer(devices='0')` value is not a valid input"),  # TypeError
                          ([*autoencoder, "--seed_everything", "-1"], "seed_everything: -1 is not in bounds")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err.strip()  # (after Lightning's "Seed set to" line)
        assert exit_info.value.code == 2 and "Traceback" not in err and message in err.splitlines()[-1], err


# ------------------------------------------------------------------------------------------------ checkpoints, folders

@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    """A debug TransfusionModule as a Lightning checkpoint and as a save_pretrained folder."""
    import lightning as L

    from transfusion.lightning.transfusion import TransfusionModule

    root = tmp_path_factory.mktemp("saved")
    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", num_steps=2)
    module.configure_model()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(root / "model.ckpt")
    module.save_pretrained(root / "folder")
    return root


def test_checkpoints_that_do_not_fit(saved, tmp_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule

    checkpoint = torch.load(saved / "model.ckpt", weights_only=True)
    path = tmp_path / "model.ckpt"
    shape = {**checkpoint, "state_dict": {**checkpoint["state_dict"], "model.lm_head.weight": torch.zeros(3, 3)}}
    no_arguments = {k: v for k, v in checkpoint.items() if k != "hyper_parameters"}
    data = (saved / "model.ckpt").read_bytes()
    body = data[:-300] + bytes(100) + data[-200:]  # a zip whose directory is damaged
    for write, message in ((lambda: torch.save(shape, path), r"size mismatch for model\.lm_head\.weight"),  # was
                           (lambda: torch.save(no_arguments, path), "missing 2 required positional arguments"),
                           (lambda: shutil.copyfile(autoencoder_ckpt, path), "AutoencoderModule"),  # torch's or
                           (lambda: path.write_bytes(body), "PytorchStreamReader failed")):  # Lightning's traceback
        write()
        with pytest.raises(UserError, match=rf"checkpoint {re.escape(str(path))} cannot be loaded as a "
                                            rf"TransfusionModule \(.*{message}") as error:
            TransfusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        assert "\n" not in str(error.value)


def test_save_pretrained_folders_that_do_not_load(saved, tmp_path):
    from transfusion.lightning.transfusion import TransfusionModule

    folder = tmp_path / "folder"
    for tamper, message in (
            (lambda: (folder / "config.json").write_bytes(b'{"class_path": "\xff"}'), "UnicodeDecodeError"),
            (lambda: (folder / "model.safetensors").write_bytes(b"\x10"), "SafetensorError"),
            (lambda: (folder / "config.json").write_text(json.dumps({**json.loads((saved / "folder/config.json")
             .read_text()), "init_args": {"tokenizer": "tokenizer.model", "n_kv_heads": 2}})),
             "unexpected keyword argument 'n_kv_heads'")):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(saved / "folder", folder)
        tamper()
        with pytest.raises(UserError, match=rf"'{re.escape(str(folder))}' cannot be loaded as a TransfusionModule "
                                            rf"\(.*{message}"):
            TransfusionModule.from_pretrained(folder)
