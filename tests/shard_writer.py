"""Test shards written directly with ``tarfile`` / ``pyarrow`` per ``transfusion.data.shards.format`` (no converter)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from transfusion.data.shards.format import array_bytes, dump_index, new_index, shard_name


def png(seed: int, size: int = 16) -> bytes:
    """A small PNG whose colour depends on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_records(count: int, start: int = 0, image: str = "pixels", latent_shape=(4, 2, 2)) -> list[dict]:
    """``count`` pair records with keys ``s{i:06d}``: captions name the sample number."""
    records = []
    for i in range(start, start + count):
        record = {"key": f"s{i:06d}", "captions": [f"sample {i}", f"picture {i}"]}
        if image == "pixels":
            record["png"] = png(i)
        else:
            record["latent.npy"] = array_bytes(np.full(latent_shape, i, dtype=np.float32))
        records.append(record)
    return records


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, records: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for record in records:
            if "captions" in record:
                _add(tar, f"{record['key']}.json", json.dumps({"captions": record["captions"]}).encode())
            if "text" in record:
                _add(tar, f"{record['key']}.txt", record["text"].encode())
            for ext in ("png", "latent.npy"):
                if ext in record:
                    _add(tar, f"{record['key']}.{ext}", record[ext])


def write_parquet(path: Path, records: list[dict], row_group_size: int = 3) -> None:
    columns = {"key": [r["key"] for r in records]}
    if any("captions" in r for r in records):
        columns["captions"] = [r.get("captions", []) for r in records]
    if any("png" in r for r in records):
        columns["image"] = [r.get("png") for r in records]
    if any("latent.npy" in r for r in records):
        columns["latent"] = [r.get("latent.npy") for r in records]
    if any("text" in r for r in records):
        columns["text"] = [r["text"] for r in records]
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def write_set(folder: Path, sizes: list[int], kind: str = "webdataset", content: str = "pairs", image: str = "pixels",
              fingerprint: str | None = None, index: bool = True) -> list[list[dict]]:
    """A shard set of shards with ``sizes`` samples (numbered 0.. across shards); returns the records per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = new_index(kind, content, image, autoencoder_fingerprint=fingerprint)
    shards, start = [], 0
    for number, size in enumerate(sizes):
        if content == "text":
            records = [{"key": f"t{i:06d}", "text": f"document {i} says hello {i % 5}"} for i in range(start, start + size)]
        else:
            records = pair_records(size, start, image)
        name = shard_name(kind, number)
        (write_tar if kind == "webdataset" else write_parquet)(folder / name, records)
        meta["shards"].append({"path": name, "samples": size})
        shards.append(records)
        start += size
    if index:
        (folder / "index.json").write_text(dump_index(meta))
    return shards
