"""Full disks and file systems that fail writes: checkpoints, ``save_pretrained`` folders, shard sets and the sweep's
results are written whole or not at all (``transfusion.atomic``); a write that runs out of space leaves the previous
output as it was (loadable), says so in one line naming the file and the free space, and stops or retries.

Space runs out for real: ``RLIMIT_FSIZE`` makes the kernel refuse to grow a file past a size (``EFBIG``, with
SIGXFSZ ignored), which needs no root and no mount. A file system that reports the error only at ``fsync`` (NFS
does) and one that writes part of what it is given are fakes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from transfusion.errors import DiskFullError

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """In this process, no file may grow past ``limit`` bytes: writes past it fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- checkpoints ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a `transfusion fit` process
def test_fit_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, autoencoder_ckpt):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    previous = folder / "last.ckpt"
    previous.write_bytes(Path(autoencoder_ckpt).read_bytes())  # the run so far: 5 steps (~0.9 MB)
    before = _digest(previous)
    limit = previous.stat().st_size // 2  # the next checkpoint, as large, cannot be written; logs and config can

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run(
        [sys.executable, "-m", "transfusion.cli", "fit", "--config", "lightning_configs/autoencoder_embedded.yaml",
         "--model.init_args.preset", "debug", "--model.init_args.image_size", "16", "--data.init_args.image_size", "16",
         "--data.init_args.batch_size", "4", "--data.init_args.num_val", "4", "--trainer.limit_val_batches", "0",
         "--trainer.max_steps", "7", "--ckpt_path", str(previous), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.callbacks.init_args.dirpath", str(folder), "--trainer.callbacks.init_args.save_top_k", "0",
         "--trainer.callbacks.init_args.every_n_train_steps", "1",
         "--trainer.plugins", "transfusion.lightning.checkpoint.AtomicCheckpointIO",  # as configured: retry once
         "--trainer.plugins.init_args.retries", "1", "--trainer.plugins.init_args.retry_wait", "0"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, preexec_fn=limited,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # Lightning names it last-v1.ckpt: the run started elsewhere
    assert re.fullmatch(rf"transfusion fit: error: checkpoint {folder}/last(-v1)?\.ckpt not written: File too large "
                        rf"\(.* free on {folder}\); (the previous last\.ckpt there is unchanged|nothing was written "
                        r"there; last\.ckpt beside it unchanged)", last), last
    assert "writing it again in 0 s (retry 1 of 1)" in result.stderr and "Traceback" not in result.stderr
    assert _files(folder) == ["last.ckpt"] and _digest(previous) == before  # no temporary file; the old bytes
    assert torch.load(previous, weights_only=True)["global_step"] == 5  # and loadable


ON_TMPFS = """
import os, sys, torch
from pathlib import Path
from transfusion.atomic import atomic_write
from transfusion.errors import DiskFullError
path = Path(sys.argv[1]) / "last.ckpt"
with atomic_write(path, "checkpoint") as f:  # as AtomicCheckpointIO writes: 80 kB of the 256 kB
    torch.save({"step": 1, "w": torch.zeros(20_000)}, f)
try:
    with atomic_write(path, "checkpoint") as f:  # 200 kB more do not fit
        torch.save({"step": 2, "w": torch.ones(50_000)}, f)
except DiskFullError as error:
    print(error)
print(sorted(os.listdir(path.parent)), torch.load(path, weights_only=True)["step"])
"""


@pytest.mark.slow  # a process in a user namespace
def test_a_real_full_file_system_keeps_the_previous_checkpoint(tmp_path):
    """ENOSPC from a 256 kB tmpfs, mounted in a user namespace (where the system allows one; CI may not)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               f'mount -t tmpfs -o size=256k none "{mount}" && exec "$0" -c "$1" "{mount}"', sys.executable, ON_TMPFS]
    try:
        result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare command")
    if "mount" in result.stderr or "unshare" in result.stderr:
        pytest.skip(f"no tmpfs in a user namespace here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    message, listing = result.stdout.strip().splitlines()
    free = re.fullmatch(rf"checkpoint {mount}/last.ckpt not written: No space left on device \(([\d.]+) KiB free on "
                        rf"{mount}\); the previous last.ckpt there is unchanged", message)
    assert free and float(free[1]) < 256, message  # the tmpfs's own free space
    assert listing == "['last.ckpt'] 1"  # no temporary file; the previous checkpoint loads


def test_an_error_reported_at_fsync_keeps_the_previous_checkpoint_or_is_retried(tmp_path, monkeypatch):
    """A network file system may accept every write and report the full disk when the data is flushed."""
    from transfusion.lightning.checkpoint import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    fsync, failures = os.fsync, []

    def full_at_fsync(fd):
        if failures:
            failures.pop()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_at_fsync)
    failures.append(1)
    with pytest.raises(DiskFullError, match=rf"checkpoint {path} not written: No space left on device \(.* free on "
                                            rf"{tmp_path}\); the previous last.ckpt there is unchanged$"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and _files(tmp_path) == ["last.ckpt"]

    failures.append(1)  # space comes back before the retry: training goes on with the new checkpoint
    with pytest.warns(UserWarning, match="writing it again in 0 s"):
        AtomicCheckpointIO(retries=2, retry_wait=0).save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2} and _files(tmp_path) == ["last.ckpt"]


# -- save_pretrained --------------------------------------------------------------------------------------------
def test_save_pretrained_on_a_full_disk_keeps_the_previous_folder(tmp_path):
    from transfusion.lightning.autoencoder import AutoencoderModule

    module = AutoencoderModule(preset="debug", image_size=16)
    folder = tmp_path / "model"
    module.save_pretrained(folder)
    (folder / ".git").mkdir()  # a Hub clone's own files: kept by every later save
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = {name: _digest(folder / name) for name in _files(folder) if (folder / name).is_file()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    with file_size_limit((folder / "model.safetensors").stat().st_size // 2):
        with pytest.raises(DiskFullError, match=rf"save_pretrained folder {folder} not written: File too large \(.*"
                                                r"; the previous model there is unchanged$"):
            module.save_pretrained(folder)
    assert {name: _digest(folder / name) for name in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded = AutoencoderModule.from_pretrained(folder)  # the earlier weights, whole
    assert not any(torch.equal(a, b) for a, b in zip(loaded.parameters(), module.parameters()))

    module.save_pretrained(folder)  # room again: the new weights replace the old, the clone's files stay
    reloaded = AutoencoderModule.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), module.parameters()))
    assert (folder / ".git" / "HEAD").is_file()


# -- shard sets -------------------------------------------------------------------------------------------------
def _text_records(n: int = 40):
    from transfusion.data.shards.write import TextRecords

    return TextRecords([f"document {i}: " + "word " * 200 for i in range(n)])


def test_shards_on_a_full_disk_stop_without_an_index(tmp_path):
    from transfusion.data.shards.load import has_index, read_records
    from transfusion.data.shards.write import write_shards

    url = str(tmp_path / "set")
    with file_size_limit(5_000):  # a shard of 10 documents is ~10 kB
        with pytest.raises(DiskFullError, match=rf"shard set file {url}/shard-000000.tar not written: File too "
                                                rf"large \(.* free on {url}\); the shard set {url} has no index.json"):
            write_shards(_text_records(), url, samples_per_shard=10)
    assert _files(tmp_path / "set") == [] and not has_index(url)  # nothing a reader could take for a set
    with pytest.raises(FileNotFoundError):
        read_records(url)
    index = write_shards(_text_records(), url, samples_per_shard=10, overwrite=True)  # room again
    assert len(read_records(url)[1]) == 40 and len(index["shards"]) == 4


class ShortWrites(MemoryFileSystem):
    """A remote file system whose files write at most 1000 bytes a call (and say so), and fail with ENOSPC once
    ``room`` bytes are written in all."""

    protocol, store, pseudo_dirs = ("shortwrites",), {}, [""]  # its own store, not memory://'s
    room, used = None, 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("shortwrites://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            write = f.write

            def short(data):
                data = bytes(data[:1000])
                if ShortWrites.room is not None and ShortWrites.used + len(data) > ShortWrites.room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                ShortWrites.used += len(data)
                return write(data)

            f.write = short
        return f


def test_remote_shards_survive_short_writes_and_stop_cleanly_when_full():
    from transfusion.data.shards.load import has_index, read_records
    from transfusion.data.shards.write import write_shards

    fsspec.register_implementation("shortwrites", ShortWrites, clobber=True)
    fs = fsspec.filesystem("shortwrites")
    write_shards(_text_records(), "shortwrites://whole", samples_per_shard=10)
    rows = read_records("shortwrites://whole")[1]
    assert [r["text"] for r in rows] == _text_records().documents  # every byte of every shard written

    ShortWrites.room, ShortWrites.used = 2.5 * fs.size("/whole/shard-000000.tar"), 0  # two shards fit
    try:
        with pytest.raises(DiskFullError, match=r"shard set file shortwrites://.*full/shard-000002.tar not written: "
                                                r"No space left on device; the shard set .* has no index.json"):
            write_shards(_text_records(), "shortwrites://full", samples_per_shard=10)
    finally:
        ShortWrites.room = None
    assert sorted(fs.ls("/full", detail=False)) == ["/full/shard-000000.tar", "/full/shard-000001.tar"]
    assert not has_index("shortwrites://full")  # no .partial left, no index: the set reads as incomplete


# -- the sweep's results ----------------------------------------------------------------------------------------
def test_sweep_results_on_a_full_disk_keep_the_previous_ones(tmp_path):
    from transfusion.sweep.report import write_report

    def rows(steps):
        return [{"run": f"{m}-s", "model": m, "size": "s", "budget": steps[-1], "ablation": "", "setting": "",
                 "step": s, "params": 1000, "tokens": 100 * s, "flops": 6e5 * s, "flops_exact": 6e5 * s,
                 "ppl": 10.0 / s} for m in ("transfusion", "chameleon") for s in steps]

    write_report(rows([5, 10]), tmp_path, "s")
    before = {name: _digest(tmp_path / name) for name in _files(tmp_path)}
    with file_size_limit((tmp_path / "results.csv").stat().st_size + 16):  # the next results.csv is larger
        with pytest.raises(DiskFullError, match=rf"sweep results {tmp_path}/results.csv not written: File too large"
                                                r" .*; the previous results.csv there is unchanged$"):
            write_report(rows(list(range(1, 21))), tmp_path, "s")
    assert {name: _digest(tmp_path / name) for name in _files(tmp_path)} == before  # nothing changed, nothing added
