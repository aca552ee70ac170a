"""Streamed shards: read a shard set (``format.py``) from a local path or any fsspec URL, a slice at a time.

Nothing is materialised: a set is resolved once (its ``index.json``, or a glob / list of shard URLs counted
from Parquet footers and tar headers), then each consumer (one data worker of one rank) opens only the
shards that overlap its range of the sample order and reads their records in stored order, seeking over the
members it skips (tar) or reading only the row groups it needs (Parquet).

The sharding rule, per pass ``p`` (one epoch of the data): the shards are permuted by a generator seeded with
``(seed, p)``; their samples, concatenated in that order, are cut into ``C = world_size x num_workers``
contiguous ranges ``[c N // C, (c + 1) N // C)``, consumer ``c = rank x num_workers + worker`` reading range
``c``. Every sample of a pass is used exactly once, and shares differ by at most one sample.

Bad records (a truncated tar member, an unreadable image, no caption, no image) are counted by reason and
skipped (``strict``: raised); transient read errors are retried with backoff, then fail naming the shard.
"""

from __future__ import annotations

import bisect
import json
import tarfile
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfusion.data.shards.format import (ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, INDEX, SHARD_EXTENSIONS,
                                            parse_index, read_array, split_member)
from transfusion.errors import UserError

RETRIES = 3  # attempts after the first, with backoff 0.5 s, 1 s, 2 s
try:  # fsspec's http filesystem lets some aiohttp errors through unwrapped
    from aiohttp import ClientError as _ClientError
except ImportError:  # pragma: no cover
    _ClientError = OSError
TRANSIENT = (OSError, TimeoutError, _ClientError)  # FileNotFoundError excepted: a missing shard is no glitch


class CorruptShard(UserError):
    """A shard whose bytes are not a tar or Parquet file: bad data, not a read glitch, so never retried."""


class TruncatedRecord(Exception):
    """A record whose bytes end early (a cut tar member); ``str(err)`` is the reason."""


@dataclass
class ShardSet:
    """A resolved shard set: where it is, what it holds and how many samples each shard has."""

    name: str
    kind: str  # webdataset | parquet
    content: str  # pairs | documents | text
    image: str = "pixels"  # pixels | latents | codes
    autoencoder_fingerprint: str | None = None
    shards: list[str] = field(default_factory=list)  # full URLs
    samples: list[int] = field(default_factory=list)
    storage_options: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.samples)

    def first_index(self, shard: int) -> int:
        """The stable set index of the first sample of ``shard`` (per-record seeds use it)."""
        return sum(self.samples[:shard])


def _fs(url: str, storage_options: dict):
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def retry(action, what: str, attempts: int = RETRIES):
    """``action()``, retried on transient errors (OSError but a missing file, fsspec errors) with backoff."""
    for attempt in range(attempts + 1):
        try:
            return action()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{what}: not found ({error})") from None
        except TRANSIENT as error:
            if attempt == attempts:
                raise OSError(f"{what}: read failed after {attempts + 1} attempts "
                              f"({type(error).__name__}: {error})") from error
            time.sleep(0.5 * 2 ** attempt)


def open_shard_set(source: str | list[str], storage_options: dict | None = None) -> ShardSet:
    """A shard set from a folder URL with ``index.json``, a glob of shard URLs, or a list of them."""
    options = dict(storage_options or {})
    shard_file = tuple(SHARD_EXTENSIONS.values())
    if isinstance(source, str) and not any(ch in source for ch in "*?[") and not source.endswith(shard_file):
        folder = source.rstrip("/")
        fs, path = _fs(folder, options)
        index_path = f"{path.rstrip('/')}/{INDEX}"
        if not retry(lambda: fs.exists(index_path), f"{folder}/{INDEX}"):
            raise FileNotFoundError(f"shard set {folder!r}: no {INDEX} (write one with `transfusion shards --index`, "
                                    "or pass a glob or list of shard URLs)")
        text = retry(lambda: fs.cat_file(index_path), f"{folder}/{INDEX}")
        index = parse_index(text, f"{folder}/{INDEX}")
        shards = index["shards"]
        return ShardSet(folder, index["kind"], index["content"], index["image"], index.get("autoencoder_fingerprint"),
                        [f"{folder}/{s['path']}" for s in shards], [s["samples"] for s in shards], options)
    urls = []
    for item in [source] if isinstance(source, str) else list(source):
        if any(ch in item for ch in "*?["):
            fs, _ = _fs(item, options)
            found = sorted(p for p in fsspec.core.get_fs_token_paths(item, storage_options=options)[2]
                           if p.endswith(tuple(SHARD_EXTENSIONS.values())))  # not index.json, README...
            if not found:
                raise FileNotFoundError(f"shard glob {item!r} matches no file")
            urls += [fs.unstrip_protocol(p) if "://" in item else p for p in found]
        else:
            urls.append(item)
    kinds = {kind for kind, ext in SHARD_EXTENSIONS.items() for u in urls if u.endswith(ext)}
    if len(kinds) != 1 or not all(u.endswith(tuple(SHARD_EXTENSIONS.values())) for u in urls):
        raise UserError(f"shards must all be .tar or all .parquet, got {urls[:3]}...")
    kind = kinds.pop()
    counted = [count_shard(u, kind, options) for u in urls]  # once, at setup
    contents = {c for _, c, _ in counted}
    if len(contents) != 1:
        raise UserError(f"shards of {urls[0]!r}... hold different contents {sorted(contents)}")
    return ShardSet(urls[0] if len(urls) == 1 else f"{urls[0]} (+{len(urls) - 1})", kind, contents.pop(),
                    counted[0][2], None, urls, [n for n, _, _ in counted], options)


def count_shard(url: str, kind: str, options: dict) -> tuple[int, str, str]:
    """(samples, content, image storage) of one shard without an index: a Parquet footer, or a tar header scan."""
    def scan():
        with fsspec.open(url, "rb", **options) as f:
            if kind == "parquet":
                file = _parse_parquet(url, lambda: pq.ParquetFile(f))
                return file.metadata.num_rows, set(file.schema_arrow.names)
            keys, extensions = [], set()
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:  # headers only: the data is seeked over
                    key, ext = split_member(member.name)
                    if member.isfile() and (not keys or keys[-1] != key):
                        keys.append(key)
                    extensions.add(ext)
            return len(keys), extensions
    try:
        count, names = retry(scan, f"shard {url}")
    except tarfile.TarError as error:
        raise CorruptShard(f"shard {url}: not a readable tar ({error})") from error
    if kind == "parquet":
        content = "text" if "text" in names else "documents" if "segments" in names else "pairs"
        image = "latents" if "latent" in names else "codes" if "codes" in names else "pixels"
    else:
        numbered = {e.partition(".")[2] for e in names if e.partition(".")[0].isdigit()}  # a document's images
        content = "documents" if numbered else "pairs" if names & {
            *IMAGE_EXTENSIONS, *ARRAY_EXTENSIONS.values()} else "text"
        names = names | numbered
        image = "latents" if "latent.npy" in names else "codes" if "codes.npy" in names else "pixels"
    return count, content, image


def partition(total: int, consumers: int, consumer: int) -> tuple[int, int]:
    """Consumer ``c``'s range ``[c N // C, (c + 1) N // C)`` of a pass's ``N`` samples."""
    return consumer * total // consumers, (consumer + 1) * total // consumers


def pass_order(num_shards: int, seed: int, pass_: int) -> np.ndarray:
    """The shard order of pass ``pass_``: a permutation seeded by (seed, pass)."""
    return np.random.default_rng([seed, pass_, 0x5A4D]).permutation(num_shards)


def consumer_slices(shard_set: ShardSet, seed: int, pass_: int, start: int, stop: int) -> list[tuple]:
    """[(shard, first record, end record, pass position of the first)] that cover positions [start, stop) of a pass."""
    order = pass_order(len(shard_set.shards), seed, pass_)
    sizes = [shard_set.samples[s] for s in order]
    ends = np.cumsum(sizes).tolist()
    slices, position = [], start
    while position < stop:
        j = bisect.bisect_right(ends, position)
        begin = ends[j] - sizes[j]
        first, end = position - begin, min(sizes[j], stop - begin)
        slices.append((int(order[j]), first, end, position))
        position += end - first
    return slices


# ------------------------------------------------------------------------------------------------------------
# raw records of one shard: {"key", field -> value} in stored order, from record ``first`` to ``end``

def read_records(shard_set: ShardSet, shard: int, first: int, end: int):
    """Yield (record number in the shard, raw record or a TruncatedRecord) for records ``first`` .. ``end - 1``,
    reopening the shard (and seeking back) after a transient read error."""
    url, next_record, failures = shard_set.shards[shard], first, 0
    while next_record < end:
        reader = _tar_records if shard_set.kind == "webdataset" else _parquet_records
        try:
            for number, record in reader(url, shard_set.storage_options, next_record, end):
                yield number, record
                next_record, failures = number + 1, 0
            for number in range(next_record, end):  # the shard ends before the records its count promised
                yield number, TruncatedRecord(f"missing record: the shard ends after record {next_record - 1}")
            return
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {url} is missing (listed in the set {shard_set.name!r})") from None
        except TRANSIENT as error:
            failures += 1
            if failures > RETRIES:
                raise OSError(f"shard {url}: read failed {failures} times ({type(error).__name__}: {error})") from error
            time.sleep(0.5 * 2 ** (failures - 1))


def _open(url: str, options: dict):
    return fsspec.open(url, "rb", **options).open()


def _tar_records(url: str, options: dict, first: int, end: int):
    f = _open(url, options)
    try:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as error:
            raise CorruptShard(f"shard {url}: not a readable tar ({error})") from error
        with tar:
            number, key, record, members = -1, None, None, iter(tar)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except tarfile.ReadError as error:  # the archive ends inside a member
                    if "unexpected end of data" not in str(error) and "truncated" not in str(error):
                        raise CorruptShard(f"shard {url}: not a readable tar ({error})") from error
                    break
                if not member.isfile():
                    continue
                member_key, ext = split_member(member.name)
                if member_key != key:
                    if record is not None:
                        yield number, record
                    number, key, record = number + 1, member_key, None
                    if number >= end:
                        return
                    if number >= first:
                        record = {"key": key}
                if record is None or isinstance(record, TruncatedRecord):
                    continue  # a record before ``first``: its data is seeked over, never read
                try:
                    data = tar.extractfile(member).read()
                except tarfile.ReadError as error:  # the member's bytes end early
                    data = error
                if isinstance(data, Exception) or len(data) < member.size:
                    record = TruncatedRecord(f"truncated tar member: {member.name}")
                    continue
                record[ext] = data
            if record is not None:
                yield number, record
    finally:
        f.close()


def _parse_parquet(url: str, read):
    """``read()``; pyarrow's errors for bytes that are not Parquet as a CorruptShard (a remote OSError is retried)."""
    try:
        return read()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:  # a local file's OSError is its bytes too
        if isinstance(error, OSError) and fsspec.utils.get_protocol(url) not in ("file", "local"):
            raise
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # pyarrow's messages span lines
        raise CorruptShard(f"shard {url}: not a readable Parquet file ({reason})") from error


def _parquet_records(url: str, options: dict, first: int, end: int):
    f = _open(url, options)
    try:
        file = _parse_parquet(url, lambda: pq.ParquetFile(f))
        offset = 0
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if offset + rows > first and offset < end:  # only the row groups that overlap [first, end)
                table = _parse_parquet(url, lambda: file.read_row_group(group).to_pylist())
                for i in range(max(first - offset, 0), min(end - offset, rows)):
                    yield offset + i, table[i]
            offset += rows
            if offset >= end:
                return
    finally:
        f.close()


# ------------------------------------------------------------------------------------------------------------
# raw record -> fields (the layouts of format.py)

def record_captions(record: dict) -> list:
    """The captions of a raw pair record (tar members or a Parquet row), possibly empty."""
    if "captions" in record and record["captions"] is not None and not isinstance(record["captions"], bytes):
        return list(record["captions"])
    if "json" in record:  # img2dataset's json is metadata: its caption may be in the .txt instead
        meta = json.loads(record["json"])
        if meta.get("captions"):
            return list(meta["captions"])
        if meta.get("caption") is not None:
            return [meta["caption"]]
    value = record.get("txt", record.get("caption"))
    return [value] if value is not None else []


def record_image(record: dict, storage: str):
    """Image bytes (pixels) or an array (latents / codes) of a raw pair record; None if it has none."""
    if storage == "pixels":
        for name in ("image", *IMAGE_EXTENSIONS):
            value = record.get(name)
            if value is not None:
                return value  # bytes, or datasets' {"bytes", "path"} struct
        return None
    name = "latent" if storage == "latents" else "codes"
    value = record.get(name, record.get(ARRAY_EXTENSIONS[storage]))
    return read_array(value) if value is not None else None


def record_text(record: dict) -> str | None:
    value = record.get("text", record.get("txt"))
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else value


def record_segments(record: dict):
    """The ``segments`` of a raw document record (a tar's ``KEY.json`` or a Parquet row's JSON string), as parsed
    JSON (checked by ``documents.parse_segments``); None if it has none. Raises ValueError on invalid JSON."""
    if "segments" in record and record["segments"] is not None:
        value = record["segments"]
        return json.loads(value) if isinstance(value, (str, bytes)) else value
    if "json" in record:
        meta = json.loads(record["json"])
        return meta.get("segments") if isinstance(meta, dict) else None
    return None


def record_pictures(record: dict, storage: str) -> list:
    """The images of a raw document record in order: bytes (pixels) or arrays (latents / codes); tar members
    ``KEY.0.png``, ``KEY.1.png``, ... (or ``KEY.0.latent.npy``, ...), or a Parquet row's ``images`` list."""
    if record.get("images") is not None:
        values = list(record["images"])
    else:
        extensions = IMAGE_EXTENSIONS if storage == "pixels" else (ARRAY_EXTENSIONS[storage],)
        values, k = [], 0
        while True:
            value = next((record[f"{k}.{e}"] for e in extensions if f"{k}.{e}" in record), None)
            if value is None:
                break
            values.append(value)
            k += 1
    return values if storage == "pixels" else [read_array(v) for v in values]
