"""The shard format: what ``transfusion shards`` writes and the streamed sources read.

A shard set is a folder (a local path or any fsspec URL: ``s3://``, ``gs://``, ``hf://``, ``https://``) of
WebDataset tar shards or Parquet shards, with an ``index.json`` beside them::

    {"format": 1, "kind": "webdataset" | "parquet",
     "content": "pairs" | "documents" | "text",
     "image": "pixels" | "latents" | "codes",          # how images are stored
     "image_size": 32 | null,                          # pixels: the size they were resized to (null: as found)
     "autoencoder_fingerprint": "..." | null,          # latents / codes: which autoencoder made them
     "latent_shape": [C, h, w] | [n] | null,
     "shards": [{"path": "shard-000000.tar", "samples": 1000}, ...],   # paths relative to the folder
     "skipped": {"reason": count, ...}}                # records the writer left out, by reason

Shards written by other tools (img2dataset, Hugging Face ``datasets``) need no index: a Parquet shard's row
count is in its footer; a tar's is counted from its member headers once (``transfusion shards --index``
writes the index of such a set).

A record (one sample) has a unique ``key`` and, by content:

* ``pairs``: ``captions`` (one or more strings) and one image;
* ``documents`` (interleaved): ``segments``, an ordered list of ``{"text": str}`` and ``{"image": i}`` (``i``
  indexes the record's images), each with an optional ``"loss": false`` (no loss on that segment);
* ``text``: ``text`` (one document).

In a **WebDataset tar** the members of a record share the key (the member name up to the first dot of its
base name, as ``webdataset`` groups them) and are consecutive:

    pairs       KEY.jpg | .jpeg | .png | .webp     (pixels)      KEY.latent.npy / KEY.codes.npy (encoded)
                KEY.txt (one caption) or KEY.json ({"captions": [...]} or {"caption": "..."}, as img2dataset)
    documents   KEY.json ({"segments": [...]}) and KEY.0.png, KEY.1.png, ... (or KEY.0.latent.npy, ...)
    text        KEY.txt

In a **Parquet shard** a record is a row: ``key`` (string); ``captions`` (list of strings) or ``caption``
(string); ``image`` (binary, or the ``{"bytes", "path"}`` struct that ``datasets`` writes); ``latent`` /
``codes`` (binary: an ``.npy`` file); ``segments`` (string: the JSON list) with ``images`` (list of binary);
``text`` (string).
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np

from transfusion.errors import UserError

FORMAT = 1
INDEX = "index.json"
KINDS = ("webdataset", "parquet")
CONTENTS = ("pairs", "documents", "text")
IMAGE_STORAGE = ("pixels", "latents", "codes")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ARRAY_EXTENSIONS = {"latents": "latent.npy", "codes": "codes.npy"}  # image storage -> tar member extension
SHARD_EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}


def split_member(name: str) -> tuple[str, str]:
    """A tar member's (key, extension): ``"a/b/000012.0.png"`` -> (``"a/b/000012"``, ``"0.png"``)."""
    folder, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension


def shard_name(kind: str, number: int) -> str:
    return f"shard-{number:06d}{SHARD_EXTENSIONS[kind]}"


def array_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of an ``.npy`` file (dtype and shape kept)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def new_index(kind: str, content: str, image: str = "pixels", **fields) -> dict:
    if kind not in KINDS:
        raise ValueError(f"shard kind must be one of {KINDS}, got {kind!r}")
    if content not in CONTENTS:
        raise ValueError(f"shard content must be one of {CONTENTS}, got {content!r}")
    if image not in IMAGE_STORAGE:
        raise ValueError(f"image storage must be one of {IMAGE_STORAGE}, got {image!r}")
    index = {"format": FORMAT, "kind": kind, "content": content, "image": image, "image_size": None,
             "autoencoder_fingerprint": None, "latent_shape": None, "shards": [], "skipped": {}}
    unknown = set(fields) - set(index)
    if unknown:
        raise ValueError(f"unknown index fields {sorted(unknown)}")
    return {**index, **fields}


def parse_index(text: str | bytes, where: str) -> dict:
    """Check an ``index.json``'s text (or bytes); errors (``UserError``) name ``where`` (its URL)."""
    try:
        index = json.loads(text)
    except ValueError as error:  # invalid JSON or UTF-8
        raise UserError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{where}: not a shard index of format {FORMAT} (written by `transfusion shards`)")
    for field, allowed in (("kind", KINDS), ("content", CONTENTS), ("image", IMAGE_STORAGE)):
        if index.get(field) not in allowed:
            raise UserError(f"{where}: {field} must be one of {allowed}, got {index.get(field)!r}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise UserError(f"{where}: no shards listed")
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("path"), str)
                and isinstance(shard.get("samples"), int) and shard["samples"] >= 0):
            raise UserError(f"{where}: shard {i} must be {{'path': str, 'samples': int >= 0}}, got {shard!r}")
    return index


def dump_index(index: dict) -> str:
    return json.dumps(index, indent=1) + "\n"
