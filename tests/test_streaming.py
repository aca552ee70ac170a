"""Streamed shards (``transfusion.data.shards``): the sharding rule uses every sample of a pass once over ranks and
workers; rows resume exactly from a saved position; bad records are counted, named and skipped; sources mix at
their weights; local, ``memory://`` and ``http://`` sets stream; a run killed with SIGKILL resumes through
``transfusion fit --ckpt_path last`` to the same losses, with 1 and 2 processes and data workers."""

import functools
import http.server
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from shard_writer import write_set  # noqa: E402
from test_reliability import _env, _finish, _losses  # noqa: E402

from transfusion.data.rows.sequences import SequenceLayout  # noqa: E402
from transfusion.data.shards.rows import Consumer, RowContext, Source, StreamingRows  # noqa: E402
from transfusion.data.shards.stream import consumer_slices, open_shard_set, partition, pass_order  # noqa: E402
from transfusion.data.sources.pairs import BadDataWarning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS, PAD, BOI, EOI = 1, 2, 3, 4, 5
TOK = SimpleNamespace(bos_id=BOS, eos_id=EOS, pad_id=PAD, boi_id=BOI, eoi_id=EOI,
                      encode=lambda s, bos=False, eos=False: [BOS] * bos + [ord(c) for c in s] + [EOS] * eos)
LAYOUT = SequenceLayout(tokenizer=TOK, patches_per_image=4, image_size=8)


def _ctx(seq_len=48, **options) -> RowContext:
    return RowContext(LAYOUT, seq_len, (3, 8, 8), **options)


def _samples(row: dict) -> list[int]:
    """Sample numbers of a caption-first row (captions are "sample i" / "picture i"; ids are characters)."""
    tokens, numbers, i = row["tokens"].tolist(), [], 0
    while i < len(tokens):
        if tokens[i] == BOS:
            end = tokens.index(BOI, i)
            numbers.append(int("".join(map(chr, tokens[i + 1:end])).split()[1]))
            i = end
        i += 1
    return numbers


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_sharding_rule_uses_every_sample_of_a_pass_once(num_shards):
    rng = np.random.default_rng(num_shards)
    for ranks in (1, 2, 3, 8):
        for workers in (1, 2, 4):
            sizes = rng.integers(0, 12, num_shards).tolist()
            sizes[0] += ranks * workers  # at least one sample per consumer
            shard_set = SimpleNamespace(shards=list(range(num_shards)), samples=sizes)
            total, C = sum(sizes), ranks * workers
            for p in (0, 1):
                order = pass_order(num_shards, seed=3, pass_=p)
                expected = [(s, i) for s in order for i in range(sizes[s])]  # the concatenated pass order
                used, shares = [], []
                for c in range(C):
                    lo, hi = partition(total, C, c)
                    slices = consumer_slices(shard_set, 3, p, lo, hi)
                    mine = [(s, i) for s, first, end, _ in slices for i in range(first, end)]
                    assert len({s for s, *_ in slices}) == len(slices)  # each overlapping shard opened once
                    used += mine
                    shares.append(len(mine))
                assert used == expected  # every sample once, contiguous ranges in consumer order
                assert max(shares) - min(shares) <= 1


def test_two_ranks_two_workers_read_every_sample_once(tmp_path):
    """Ranks 0 and 1 of 2, each a DataLoader with 2 workers over uneven tar shards: pass 0 is used exactly once."""
    write_set(tmp_path / "set", [7, 2, 11, 5])
    shard_set = open_shard_set(str(tmp_path / "set"))
    ctx = _ctx(p_caption_first=1.0, caption_dropout=0.0)
    seen = {}
    for rank in range(2):
        rows = StreamingRows([Source("pairs", 1.0, shard_set)], ctx, batch_size=2, batches_per_epoch=8, rank=rank,
                             world_size=2, workers=2)
        for batch in DataLoader(rows, batch_size=None, num_workers=2):
            consumer = rank * 2 + batch["stream"]["slot"]
            for r in range(batch["tokens"].shape[0]):
                seen.setdefault(consumer, []).extend(_samples({"tokens": batch["tokens"][r]}))
    used = []
    for c in range(4):
        lo, hi = partition(25, 4, c)
        used += seen[c][:hi - lo]  # a consumer's first share is its range of pass 0 (nothing dropped in packing)
    assert sorted(used) == list(range(25))


def _ddp_rank(rank: int, folder: str, out: str) -> None:
    """One of 2 gloo processes: a DataLoader with 2 workers over the set; rank 0 writes what every consumer read."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=2)
    rows = StreamingRows([Source("pairs", 1.0, open_shard_set(folder))], _ctx(p_caption_first=1.0, caption_dropout=0.0),
                         batch_size=2, batches_per_epoch=8, rank=dist.get_rank(), world_size=dist.get_world_size(),
                         workers=2)
    seen: dict = {}
    for batch in DataLoader(rows, batch_size=None, num_workers=2):
        consumer = rank * 2 + batch["stream"]["slot"]
        for r in range(batch["tokens"].shape[0]):
            seen.setdefault(consumer, []).extend(_samples({"tokens": batch["tokens"][r]}))
    gathered = [None, None]
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        Path(out).write_text(json.dumps({c: v for part in gathered for c, v in part.items()}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_with_two_workers_read_every_sample_once(tmp_path):
    import json

    import torch.multiprocessing as mp

    write_set(tmp_path / "set", [7, 2, 11, 5])
    out = tmp_path / "seen.json"
    mp.start_processes(_ddp_rank, args=(str(tmp_path / "set"), str(out)), nprocs=2, start_method="fork")
    seen = {int(c): v for c, v in json.loads(out.read_text()).items()}
    used = []
    for c in range(4):
        lo, hi = partition(25, 4, c)
        used += seen[c][:hi - lo]
    assert sorted(used) == list(range(25))  # pass 0: every sample once over 2 processes x 2 workers


def _rows(consumer: Consumer, count: int) -> list[dict]:
    return [consumer.next_row() for _ in range(count)]


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_rows_resume_exactly_from_a_saved_state(tmp_path, kind):
    write_set(tmp_path / "pairs", [5, 3, 6], kind=kind)
    write_set(tmp_path / "text", [3, 4], kind=kind, content="text")
    sources = [Source("pairs", 0.7, open_shard_set(str(tmp_path / "pairs"))),
               Source("text", 0.3, open_shard_set(str(tmp_path / "text"))),
               Source("file", 0.2, tokens=torch.arange(6, 400))]
    straight = Consumer(sources, _ctx(), 1, 3)
    first = _rows(straight, 9)
    state = straight.state()
    later = _rows(straight, 12)  # crosses passes of the 4-sample ranges
    resumed = Consumer(sources, _ctx(), 1, 3, state)
    for a, b in zip(later, _rows(resumed, 12)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert {r["index"] % 3 for r in first + later} == {1}  # row ids are unique over consumers
    assert all(r["images"].shape[1:] == (3, 8, 8) for r in first)


def test_tar_and_parquet_give_the_same_rows(tmp_path):
    rows = {}
    for kind in ("webdataset", "parquet"):
        write_set(tmp_path / kind, [4, 6], kind=kind)
        rows[kind] = _rows(Consumer([Source("p", 1.0, open_shard_set(str(tmp_path / kind)))], _ctx(), 0, 2), 6)
    for a, b in zip(rows["webdataset"], rows["parquet"]):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])
    for kind, ext in (("webdataset", "tar"), ("parquet", "parquet")):  # no index: counted from headers / footers
        write_set(tmp_path / f"bare-{kind}", [4, 6], kind=kind, index=False)
        by_glob = open_shard_set(str(tmp_path / f"bare-{kind}" / f"*.{ext}"))
        by_list = open_shard_set(sorted(str(f) for f in (tmp_path / f"bare-{kind}").iterdir()))
        for bare in (by_glob, by_list):
            assert (bare.kind, bare.content, bare.image, bare.samples) == (kind, "pairs", "pixels", [4, 6])
            again = _rows(Consumer([Source("p", 1.0, bare)], _ctx(), 0, 2), 6)
            assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(rows[kind], again))


def test_bad_records_are_counted_named_and_skipped(tmp_path):
    shards = write_set(tmp_path / "set", [4, 4], index=True)
    folder = tmp_path / "set"
    # shard 0: record 1's image is not an image; record 2 has no caption (rewritten without its json)
    import tarfile
    from shard_writer import _add
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for i, record in enumerate(shards[0]):
            if i != 2:
                _add(tar, f"{record['key']}.json", b'{"captions": ["sample %d"]}' % i)
            _add(tar, f"{record['key']}.png", b"not a png" if i == 1 else record["png"])
    # shard 1: cut inside its last member (a truncated upload)
    data = (folder / "shard-000001.tar").read_bytes()
    last = data.rfind(b"s000007.png")
    (folder / "shard-000001.tar").write_bytes(data[:last + 512 + 40])
    # one row holds the 5 usable documents of pass 0 (16 tokens each); the next one is read, not used
    consumer = Consumer([Source("p", 1.0, open_shard_set(str(folder)))],
                        _ctx(seq_len=90, p_caption_first=1.0, caption_dropout=0.0), 0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numbers = _samples(consumer.next_row())
    assert sorted(numbers) == [0, 3, 4, 5, 6]  # 1, 2 and 7 skipped, nothing else lost
    skipped = consumer.state()["skipped"]
    assert skipped == {"unreadable image": 1, "no caption": 1, "truncated tar member": 1}, skipped
    messages = [str(w.message) for w in caught if issubclass(w.category, BadDataWarning)]
    assert any("shard-000000.tar record 1 (key s000001)" in m and "unreadable image" in m for m in messages)
    assert any("shard-000000.tar record 2 (key s000002): no caption" in m for m in messages)
    assert any("shard-000001.tar record 3" in m and "truncated tar member: s000007.png" in m for m in messages)
    strict = Consumer([Source("p", 1.0, open_shard_set(str(folder)))], _ctx(strict=True), 0, 1)
    with pytest.raises(ValueError, match=r"bad record .*shard-00000[01].tar record \d.*strict=True"):
        _rows(strict, 3)


def test_a_set_of_only_bad_records_fails_instead_of_looping(tmp_path):
    shards = write_set(tmp_path / "set", [3, 2], index=True)
    import tarfile
    from shard_writer import _add
    for number, shard in enumerate(shards):  # every image unreadable
        with tarfile.open(tmp_path / "set" / f"shard-{number:06d}.tar", "w") as tar:
            for record in shard:
                _add(tar, f"{record['key']}.json", b'{"captions": ["a caption"]}')
                _add(tar, f"{record['key']}.png", b"not a png")
    consumer = Consumer([Source("p", 1.0, open_shard_set(str(tmp_path / "set")))], _ctx(), 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        with pytest.raises(ValueError, match=r"last 5 records .* all skipped .*unreadable image.*no usable record"):
            consumer.next_row()


def test_missing_shard_fails_naming_it(tmp_path):
    write_set(tmp_path / "set", [3, 3, 3])
    (tmp_path / "set" / "shard-000001.tar").unlink()
    consumer = Consumer([Source("p", 1.0, open_shard_set(str(tmp_path / "set")))], _ctx(), 0, 1)
    with pytest.raises(FileNotFoundError, match="shard .*shard-000001.tar is missing"):
        _rows(consumer, 10)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        open_shard_set(str(tmp_path / "nowhere"))


def test_mixed_sources_meet_their_weights(tmp_path):
    write_set(tmp_path / "pairs", [20, 20])
    write_set(tmp_path / "text", [10], content="text")
    weights = [0.6, 0.2, 0.2]
    sources = [Source("pairs", 0.6, open_shard_set(str(tmp_path / "pairs"))),
               Source("text", 0.2, open_shard_set(str(tmp_path / "text"))),
               Source("file", 0.2, tokens=torch.arange(6, 2000))]
    consumer = Consumer(sources, _ctx(), 0, 1)
    n = 600
    _rows(consumer, n)
    rows = consumer.state()["source_rows"]
    for k, w in enumerate(weights):
        assert abs(rows[k] - n * w) <= 4 * (n * w * (1 - w)) ** 0.5, (rows, weights)  # 4 sigma binomial bounds
    assert all(t > 0 for t in consumer.state()["source_tokens"])


def test_memory_and_http_urls_stream(tmp_path):
    write_set(tmp_path / "set", [3, 4], kind="webdataset")
    local = _rows(Consumer([Source("p", 1.0, open_shard_set(str(tmp_path / "set")))], _ctx(), 0, 1), 4)
    fs = fsspec.filesystem("memory")
    for path in (tmp_path / "set").iterdir():
        fs.pipe(f"/set-{tmp_path.name}/{path.name}", path.read_bytes())
    url = f"memory://set-{tmp_path.name}"
    streamed = {"memory": _rows(Consumer([Source("p", 1.0, open_shard_set(url))], _ctx(), 0, 1), 4)}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/set"
        streamed["http"] = _rows(Consumer([Source("p", 1.0, open_shard_set(url))], _ctx(), 0, 1), 4)
    finally:
        server.shutdown()
    for name, rows in streamed.items():
        for a, b in zip(local, rows):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"]), name


# ----------------------------------------------------------------------------------------------------------
# exact resume through the CLI after SIGKILL, 1 and 2 processes, data workers

def _fit_command(root: Path, shards: Path, tokenizer: str, autoencoder: str, steps: int, devices: int,
                 *extra: str) -> list[str]:
    overlay = root / "every_step.yaml"
    root.mkdir(parents=True, exist_ok=True)
    overlay.write_text(
        "trainer:\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: {root}, name: logs, flush_logs_every_n_steps: 1}}\n"
        "  callbacks:\n"
        "    - class_path: transfusion.lightning.callbacks.LastStepCheckpoint\n"
        "      init_args: {every_n_train_steps: 1, save_last: true, save_top_k: 0}\n")
    parallel = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"] if devices > 1 else []
    return [sys.executable, "-m", "transfusion.cli", "fit",
            "--config", str(ROOT / "lightning_configs" / "transfusion_streamed_embedded.yaml"), "--config", str(overlay),
            "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
            "--model.init_args.preset", "debug", "--model.init_args.warmup_steps", "3",
            "--data.init_args.sources", f"[{{url: {shards}, weight: 0.8}}]", "--data.init_args.text_weight", "0.2",
            "--data.init_args.seq_len", "48", "--data.init_args.batch_size", "2", "--data.init_args.val_rows", "2",
            # an epoch of 5 steps per process: the runs cross an epoch boundary; two data workers per process
            "--data.init_args.rows_per_epoch", str(10 * devices), "--data.init_args.num_workers", "2",
            "--trainer.devices", str(devices), *parallel,
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), *extra]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("devices", [1, 2])
def test_sigkill_then_resume_streams_the_same_losses(tmp_path, tokenizer_path, autoencoder_ckpt, devices):
    shards = tmp_path / "shards"
    write_set(shards, [9, 4, 13, 6])
    steps = 9
    command = functools.partial(_fit_command, shards=shards, tokenizer=tokenizer_path, autoencoder=autoencoder_ckpt,
                                steps=steps, devices=devices)
    with open(tmp_path / "straight.err", "w") as err:  # a file, not a pipe: nothing reads it while the others run
        straight = subprocess.Popen(command(tmp_path / "straight"), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    killed_root = tmp_path / "killed"
    killed = subprocess.Popen(command(killed_root), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while max(_losses(killed_root), default=-1) < 3 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    import os
    os.killpg(killed.pid, signal.SIGKILL)  # every process of the run: ranks and data workers
    _finish(killed, 60)
    before = _losses(killed_root)
    assert 3 <= max(before) < steps - 1
    last = killed_root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] >= 3
    position = saved["StreamingDataModule"]
    assert (position["world_size"], position["workers"]) == (devices, 2) and len(position["positions"]) == devices

    resumed = subprocess.run(command(killed_root, *()) + ["--ckpt_path", "last"], env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _finish(straight, 600)
    assert straight.returncode == 0, (tmp_path / "straight.err").read_text()[-3000:]
    reference, after = _losses(tmp_path / "straight"), _losses(killed_root)
    assert sorted(reference) == list(range(steps)) and sorted(after) == list(range(steps))
    assert min(_losses(killed_root, "1")) == saved["global_step"]  # continued from the checkpoint
    for step, values in after.items():
        assert set(values) == set(reference[step]), (step, values, reference[step])


def test_datamodule_holds_out_validation_and_serves_evaluation(tmp_path):
    from transfusion.data.modules.streaming import StreamingDataModule

    write_set(tmp_path / "pairs", [6, 5, 4])
    dm = StreamingDataModule([{"url": str(tmp_path / "pairs"), "weight": 1.0}], seq_len=48, batch_size=2,
                             rows_per_epoch=6, val_rows=2, layout=LAYOUT)
    dm.setup("fit")
    assert dm.train_set.sources[0].shards.samples == [6, 5] and dm.val_shards.samples == [4]  # last shard held out
    assert len(dm.val_set) == 2 and all(r["images"].shape[1:] == (3, 8, 8) for r in dm.val_set)
    examples = dm.evaluation_examples(3)
    assert [e["caption"] for e in examples] == ["sample 11", "sample 12", "sample 13"]
    assert examples[0]["image"].shape == (3, 8, 8) and examples[0]["references"] == ["sample 11", "picture 11"]
    assert [p["kind"] for p in next(iter(dm.predict_dataloader()))] == ["text-to-image", "image-to-text"]
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and "stream" in batches[0]
    for batch in batches:  # what Lightning does before each step: the position is recorded, the batch stripped
        assert "stream" not in dm.on_before_batch_transfer(batch, 0)
    assert dm._position["batch"] == 3 and dm.realised["rows"] == {str(tmp_path / "pairs"): 1.0}
    with pytest.raises(ValueError, match="2 processes x 1 data workers, this run has 1 x 1"):
        dm.load_state_dict({"world_size": 2, "workers": 1, "positions": [{}, {}]})


def test_latents_of_another_autoencoder_are_refused(tmp_path):
    from transfusion.data.modules.streaming import StreamingDataModule

    write_set(tmp_path / "latents", [3, 3], image="latents", fingerprint="a" * 64)
    layout = SequenceLayout(tokenizer=TOK, patches_per_image=4, image_size=8, autoencoder_fingerprint="b" * 64)
    dm = StreamingDataModule([str(tmp_path / "latents")], seq_len=48, batch_size=2, rows_per_epoch=4, layout=layout)
    with pytest.raises(ValueError, match="holds latents of another autoencoder .*aaaaaaaaaaaa"):
        dm.setup("fit")
    layout.autoencoder_fingerprint = "a" * 64
    dm.setup("fit")
    assert dm.val_set[0]["images"].shape[1:] == (4, 2, 2)
    write_set(tmp_path / "docs", [2], content="pairs")  # pairs mislabelled as documents: no record has segments
    import json
    index = json.loads((tmp_path / "docs" / "index.json").read_text())
    (tmp_path / "docs" / "index.json").write_text(json.dumps({**index, "content": "documents"}))
    with pytest.raises(ValueError, match=r"shard-000000.tar record 0 \(key s000000\): no segments"):
        Consumer([Source("d", 1.0, open_shard_set(str(tmp_path / "docs")))], _ctx(strict=True), 0, 1).next_row()


def test_transient_read_errors_are_retried_then_name_the_shard(tmp_path, monkeypatch):
    import transfusion.data.shards.stream as stream

    write_set(tmp_path / "set", [4, 4])
    shard_set = open_shard_set(str(tmp_path / "set"))
    real_open, calls = stream._open, []

    def flaky(url, options, failures):
        calls.append(url)
        if len(calls) <= failures:
            raise ConnectionResetError("connection reset by peer")
        return real_open(url, options)

    reference = _rows(Consumer([Source("p", 1.0, shard_set)], _ctx(), 0, 1), 2)
    monkeypatch.setattr(stream.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(stream, "_open", lambda url, options: flaky(url, options, 2))
    for a, b in zip(reference, _rows(Consumer([Source("p", 1.0, shard_set)], _ctx(), 0, 1), 2)):
        assert torch.equal(a["tokens"], b["tokens"])  # 2 failures, then read as if nothing happened
    calls.clear()
    monkeypatch.setattr(stream, "_open", lambda url, options: flaky(url, options, 99))
    with pytest.raises(OSError, match=r"shard .*shard-00000[01].tar: read failed 4 times \(ConnectionResetError"):
        _rows(Consumer([Source("p", 1.0, shard_set)], _ctx(), 0, 1), 2)


def test_img2dataset_style_records_read_their_captions():
    from transfusion.data.shards.stream import record_captions

    assert record_captions({"json": b'{"url": "http://x", "width": 9}', "txt": b"a cat"}) == [b"a cat"]
    assert record_captions({"json": b'{"caption": "a dog"}', "txt": b"a cat"}) == ["a dog"]
    assert record_captions({"json": b'{"captions": ["a", "b"]}'}) == ["a", "b"]
    assert record_captions({"captions": ["a"], "caption": "b"}) == ["a"] and record_captions({"caption": "c"}) == ["c"]
