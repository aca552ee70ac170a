"""The ``index.json`` of shards written by other tools (img2dataset tars, Parquet from Hugging Face ``datasets``):
``transfusion shards --index URL_OR_GLOB``. Samples are counted from tar member headers (no data is read) and
Parquet footers; what the records hold is told from member extensions / column names."""

from __future__ import annotations

import posixpath
import tarfile

from fsspec.core import url_to_fs

from transfusion import atomic
from transfusion.data.shards import format as fmt


def shard_paths(fs, path: str) -> list[str]:
    """The tar / Parquet files of a folder (recursively) or a glob, sorted."""
    if fs.isdir(path):
        found = fs.find(path)
    else:
        found = fs.glob(path) if any(c in path for c in "*?[") else [path] if fs.isfile(path) else []
    return sorted(p for p in found if p.endswith((".tar", ".parquet")))


def tar_summary(f) -> tuple[int, set[str]]:
    """(samples, member extensions) of a tar from its headers: consecutive members sharing a key are one sample."""
    samples, extensions, last = 0, set(), None
    with tarfile.open(fileobj=f, mode="r:") as tar:  # seeks over member data
        for member in tar:
            if not member.isfile():
                continue
            key, extension = fmt.split_member(member.name)
            if not extension or posixpath.basename(member.name).startswith("."):
                continue  # not a record member (e.g. a stray file without extension)
            extensions.add(extension.lower())
            samples += key != last
            last = key
    return samples, extensions


def describe_tar(extensions: set[str], where: str) -> tuple[str, str]:
    """(content, image storage) from a tar's member extensions."""
    last = {e.rsplit(".", 1)[-1] for e in extensions}
    numbered = any(e.split(".")[0].isdigit() and "." in e for e in extensions)
    for storage, extension in fmt.ARRAY_EXTENSIONS.items():
        if any(e.endswith(extension) for e in extensions):
            return ("documents" if numbered else "pairs"), storage
    if last & set(fmt.IMAGE_EXTENSIONS):
        return ("documents" if numbered else "pairs"), "pixels"
    if "txt" in last:
        return "text", "pixels"
    raise ValueError(f"{where}: no image, array or text members (extensions {sorted(extensions)})")


def describe_parquet(columns: list[str], where: str) -> tuple[str, str]:
    """(content, image storage) from a Parquet shard's column names."""
    if "segments" in columns:
        return "documents", "latents" if "latents" in columns else "pixels"
    for column, storage in (("latent", "latents"), ("codes", "codes"), ("image", "pixels")):
        if column in columns:
            return "pairs", storage
    if "text" in columns:
        return "text", "pixels"
    raise ValueError(f"{where}: no image, latent, codes, segments or text column (columns {columns})")


def write_foreign_index(url: str, output: str | None = None, overwrite: bool = False) -> tuple[str, dict]:
    """Count the samples of the shards at ``url`` (folder, URL or glob) and write their ``index.json`` into their
    common folder (or ``output``); returns (index URL, index)."""
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    paths = shard_paths(fs, path)
    if not paths:
        raise FileNotFoundError(f"no .tar or .parquet shard at {url}")
    kinds = {p.endswith(".tar") for p in paths}
    if len(kinds) > 1:
        raise ValueError(f"{url}: a shard set is all tar or all Parquet, found both")
    kind = "webdataset" if kinds == {True} else "parquet"
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    if output is not None:
        out_fs, root_out = url_to_fs(output)
        if out_fs.protocol != fs.protocol:
            raise ValueError(f"--output {output} must be on the same filesystem as the shards")
        root = root_out.rstrip("/")
    shards, described = [], set()
    for p in paths:
        with fs.open(p, "rb") as f:
            if kind == "webdataset":
                samples, extensions = tar_summary(f)
                described.add(describe_tar(extensions, p))
            else:
                metadata = pq.ParquetFile(f).metadata
                samples = metadata.num_rows
                described.add(describe_parquet(metadata.schema.to_arrow_schema().names, p))
        shards.append({"path": posixpath.relpath(p, root), "samples": samples})
    if len(described) > 1:
        raise ValueError(f"{url}: shards hold different kinds of records {sorted(described)}")
    content, storage = described.pop()
    index = fmt.new_index(kind, content, storage, shards=shards)
    target = posixpath.join(root, fmt.INDEX)
    if fs.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    atomic.put(fs, target, fmt.dump_index(index).encode(), "shard index")
    return fs.unstrip_protocol(target), index
