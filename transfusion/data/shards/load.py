"""A whole (small) shard set read into memory: map-style access, e.g. the latent cache (``LatentPairs``).
Large sets are streamed instead (``transfusion.data.shards.stream``)."""

from __future__ import annotations

import json
import posixpath
import tarfile

import pyarrow as pa
from fsspec.core import url_to_fs

from transfusion.data.shards import format as fmt
from transfusion.errors import UserError

ARRAY_COLUMNS = {"latents": "latent", "codes": "codes"}


def read_index(url: str) -> dict:
    fs, root = url_to_fs(url)
    where = posixpath.join(url.rstrip("/"), fmt.INDEX)
    with fs.open(posixpath.join(root, fmt.INDEX), "rb") as f:
        return fmt.parse_index(f.read(), where)


def has_index(url: str) -> bool:
    fs, root = url_to_fs(url)
    return fs.isfile(posixpath.join(root, fmt.INDEX))


def captions_of(members: dict, where: str) -> list[str]:
    meta = json.loads(members["json"]) if "json" in members else {}
    captions = meta.get("captions", meta.get("caption")) if isinstance(meta, dict) else None
    if captions is None:  # img2dataset's json may carry no caption: then the .txt
        captions = members.get("txt", b"").decode("utf-8")
    captions = [captions] if isinstance(captions, str) else captions
    if not captions:
        raise UserError(f"{where}: no caption")
    return list(captions)


def tar_records(f, index: dict, where: str):
    """The records of a tar shard: ``{"key", "captions", "array" | "image"}`` (pairs) or ``{"key", "text"}``."""
    def record(key, members):
        if index["content"] == "text":
            return {"key": key, "text": members["txt"].decode("utf-8")}
        if index["content"] != "pairs":
            raise UserError(f"{where}: reading {index['content']!r} sets into memory is not supported")
        out = {"key": key, "captions": captions_of(members, f"{where}: {key}")}
        if index["image"] in fmt.ARRAY_EXTENSIONS:
            out["array"] = fmt.read_array(members[fmt.ARRAY_EXTENSIONS[index["image"]]])
        else:
            out["image"] = next((members[e] for e in fmt.IMAGE_EXTENSIONS if e in members), None)
            if out["image"] is None:
                raise UserError(f"{where}: {key}: no image (members {sorted(members)})")
        return out

    key, members = None, {}
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name, extension = fmt.split_member(member.name)
            if name != key and members:
                yield record(key, members)
                members = {}
            key = name
            members[extension.lower()] = tar.extractfile(member).read()
    if members:
        yield record(key, members)


def parquet_records(f, index: dict, where: str):
    import pyarrow.parquet as pq

    table = pq.read_table(f)
    columns = table.column_names
    for i, row in enumerate(table.to_pylist()):
        key = row.get("key") or f"{i:09d}"
        if index["content"] == "text":
            yield {"key": key, "text": row["text"]}
            continue
        captions = row.get("captions", row.get("caption"))
        out = {"key": key, "captions": [captions] if isinstance(captions, str) else list(captions)}
        if index["image"] in ARRAY_COLUMNS:
            out["array"] = fmt.read_array(row[ARRAY_COLUMNS[index["image"]]])
        elif "image" in columns:
            image = row["image"]
            out["image"] = image["bytes"] if isinstance(image, dict) else image
        yield out


def read_records(url: str) -> tuple[dict, list[dict]]:
    """(index, every record in stored order) of the shard set at ``url``."""
    index = read_index(url)
    fs, root = url_to_fs(url)
    records = []
    for shard in index["shards"]:
        where = posixpath.join(url.rstrip("/"), shard["path"])
        with fs.open(posixpath.join(root, shard["path"]), "rb") as f:
            read = tar_records if index["kind"] == "webdataset" else parquet_records
            try:
                found = list(read(f, index, where))
            except UserError:
                raise
            except (tarfile.TarError, pa.ArrowException, ValueError, KeyError, TypeError) as error:  # bad bytes
                raise UserError(f"{where}: cannot be read ({type(error).__name__}: {error})") from error
        if len(found) != shard["samples"]:
            raise UserError(f"{where}: {len(found)} records, its index says {shard['samples']}")
        records += found
    return index, records
