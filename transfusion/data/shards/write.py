"""Writing shard sets (``transfusion.data.shards.format``): ``transfusion shards`` and ``transfusion cache-latents``.

``transfusion shards --config X.yaml [overrides of transfusion fit] --output DIR`` builds the config's data module
(and model: image size, tokenizer, autoencoder) and writes its train and validation splits to ``DIR/train/`` and
``DIR/validation/``, each a shard set with its own ``index.json``. Records get the same checks and preprocessing as
in training (images resized and centre-cropped to the model's size); bad ones are counted by reason in the index's
``skipped``. Shard ``n`` holds records ``n * samples_per_shard ...`` of the (optionally seeded-shuffled) record order
and is made by one worker process, so the bytes written do not depend on the number of workers. Each shard is
written whole or not at all (``transfusion.atomic.put``: a temporary name, fsync'ed, renamed); ``index.json`` comes
last (a set without it is incomplete); a full disk stops with one line naming the file and the free space.

With ``--encode`` images are stored encoded by the model's frozen autoencoder (KL-VAE latents or VQ codes): workers
decode and preprocess, the parent encodes batch by batch (on the GPU when there is one) and writes the shard.
``transfusion shards --index URL_OR_GLOB`` writes the ``index.json`` of shards made by other tools. Interleaved
documents come from a story config (``StoryDataModule``) or ``--documents FILE.jsonl`` (``document_records.py``).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import posixpath
import tarfile
import warnings
from collections import Counter

import numpy as np
import torch
from fsspec.core import url_to_fs
from PIL import Image
from tqdm.auto import tqdm

from transfusion import atomic
from transfusion.data.preprocess import BadRecord
from transfusion.data.shards import format as fmt
from transfusion.data.sources.pairs import MAX_WARNINGS, BadDataWarning, describe

IMAGE_FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"lossless": True})}
PARQUET_IMAGE_COLUMN = {"pixels": "image", "latents": "latent", "codes": "codes"}
ROW_GROUP = 256  # Parquet rows per row group: the unit a streamed reader fetches


# -- records to write -------------------------------------------------------------------------------------------
class PairRecords:
    """Image-caption pairs (``ImageCaptionPairs``, ``ShapesDataset``, any ``{"image", "captions"}`` dataset) as
    records ``{"captions", "pixels": (H, W, 3) uint8}``; ``skipped`` counts those left out before writing."""

    content = "pairs"

    def __init__(self, pairs):
        self.pairs = pairs
        self.skipped = Counter(getattr(pairs, "skipped", {}))

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, i: int) -> dict:
        """Record ``i``; raises ``BadRecord`` when its image cannot be decoded."""
        pairs = self.pairs
        if hasattr(pairs, "index") and hasattr(pairs, "_pixels"):  # checked rows: a bad image is a skip, not the next row
            image = pairs.rows[pairs.index[i]]["image"]
            try:
                return {"captions": list(pairs.captions[i]), "pixels": to_uint8(pairs._pixels(image))}
            except BadRecord as error:
                error.where = describe(image)  # for the warning
                raise
        item = pairs[i]
        return {"captions": list(item["captions"]), "pixels": to_uint8(item["image"])}


class TextRecords:
    """Documents (strings) as records ``{"text"}``."""

    content = "text"

    def __init__(self, documents):
        self.documents = list(documents)
        self.skipped = Counter()

    def __len__(self) -> int:
        return len(self.documents)

    def get(self, i: int) -> dict:
        return {"text": self.documents[i]}


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] (as ``preprocess_image`` makes it from 8-bit pixels) -> the (H, W, 3) uint8 pixels."""
    return ((image.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1], exactly as ``preprocess_image``; contiguous, as training
    batches are (a channels-last batch would take other convolution kernels: other rounding)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1.0


class Encoder:
    """A frozen autoencoder encoding pixels for storage: KL-VAE latents (float32) or VQ codes (int32)."""

    def __init__(self, autoencoder, batch_size: int = 64):
        from transfusion.data.sources.latent_cache import autoencoder_fingerprint

        self.autoencoder, self.batch_size = autoencoder.eval(), batch_size
        codes = hasattr(autoencoder, "encode_codes")
        self.storage = "codes" if codes else "latents"
        self.dtype = np.int32 if codes else np.float32
        self.fingerprint = autoencoder_fingerprint(autoencoder)
        self.image_size = autoencoder.config.image_size

    @torch.no_grad()
    def __call__(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        encode = self.autoencoder.encode_codes if self.storage == "codes" else self.autoencoder.encode_latents
        device = next(self.autoencoder.parameters()).device
        arrays = []
        for start in range(0, len(pixels), self.batch_size):
            batch = from_uint8(np.stack(pixels[start:start + self.batch_size])).to(device)
            arrays.extend(encode(batch).cpu().numpy().astype(self.dtype))
        return arrays


# -- shard bytes ------------------------------------------------------------------------------------------------
def image_bytes(pixels: np.ndarray, image_format: str) -> bytes:
    name, options = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=name, **options)
    return buffer.getvalue()


def tar_members(record: dict, image_format: str) -> list[tuple[str, bytes]]:
    """A record's (extension, bytes) members: the image (or array), then the caption(s) or text; a document's
    segments (``json``), then its images ``0.png``, ``1.png``, ... (or ``0.latent.npy``, ...)."""
    if "text" in record:
        return [("txt", record["text"].encode("utf-8"))]
    if "segments" in record:
        members = [("json", json.dumps({"segments": record["segments"]}, ensure_ascii=False).encode("utf-8"))]
        if "arrays" in record:
            extension = fmt.ARRAY_EXTENSIONS[record["storage"]]
            return members + [(f"{k}.{extension}", fmt.array_bytes(a)) for k, a in enumerate(record["arrays"])]
        return members + [(f"{k}.{image_format}", data) for k, data in enumerate(record["images"])]
    if "array" in record:
        image = (fmt.ARRAY_EXTENSIONS[record["storage"]], fmt.array_bytes(record["array"]))
    else:
        image = (image_format, record["image"])
    captions = record["captions"]
    text = (("txt", captions[0].encode("utf-8")) if len(captions) == 1 else
            ("json", json.dumps({"captions": captions}, ensure_ascii=False).encode("utf-8")))
    return [image, text]


def tar_bytes(records: list[dict], image_format: str) -> bytes:
    """A WebDataset tar (ustar, zero times and owners: the same records give the same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            for extension, data in tar_members(record, image_format):
                info = tarfile.TarInfo(f"{record['key']}.{extension}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(records: list[dict], content: str, storage: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"key": pa.array([r["key"] for r in records], pa.string())}
    if content == "text":
        columns["text"] = pa.array([r["text"] for r in records], pa.string())
    elif content == "documents":  # segments as a JSON string, images as a list of binary (.npy when encoded)
        columns["segments"] = pa.array([json.dumps(r["segments"], ensure_ascii=False) for r in records], pa.string())
        images = [[fmt.array_bytes(a) for a in r["arrays"]] if "arrays" in r else r["images"] for r in records]
        columns["images"] = pa.array(images, pa.list_(pa.binary()))
    else:
        columns["captions"] = pa.array([r["captions"] for r in records], pa.list_(pa.string()))
        data = [fmt.array_bytes(r["array"]) if "array" in r else r["image"] for r in records]
        columns[PARQUET_IMAGE_COLUMN[storage]] = pa.array(data, pa.binary())
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=ROW_GROUP)
    return buffer.getvalue()


def shard_bytes(records: list[dict], kind: str, content: str, storage: str, image_format: str) -> bytes:
    if kind == "webdataset":
        return tar_bytes(records, image_format)
    return parquet_bytes(records, content, storage)


# -- the work of one shard (in a worker process) ----------------------------------------------------------------
_JOB: dict = {}  # set in the parent before the workers fork


def _start_worker() -> None:
    torch.set_num_threads(1)  # workers decode images; torch ops here are small


def prepare_shard(number: int) -> tuple[int, bytes | list[dict], int, Counter, list[str]]:
    """Shard ``number``: its bytes, or (encoding) its records with pixels; the records skipped and why."""
    job = _JOB
    size = job["samples_per_shard"]
    records, skipped, messages = [], Counter(), []
    for i in job["order"][number * size:(number + 1) * size]:
        try:
            record = job["records"].get(int(i))
        except BadRecord as error:
            skipped[str(error).split(" (")[0]] += 1
            messages.append(f"{getattr(error, 'where', f'record {int(i)}')}: {error}")
            continue
        record["key"] = f"{int(i):09d}"
        if "pixels" in record and not job["encode"]:
            record["image"] = image_bytes(record.pop("pixels"), job["image_format"])
        if "pictures" in record and not job["encode"]:
            record["images"] = [image_bytes(p, job["image_format"]) for p in record.pop("pictures")]
        records.append(record)
    if job["encode"]:
        return number, records, len(records), skipped, messages
    payload = shard_bytes(records, job["kind"], job["content"], "pixels", job["image_format"])
    return number, payload, len(records), skipped, messages


# -- the writer -------------------------------------------------------------------------------------------------
def put(fs, path: str, data: bytes, url: str) -> None:
    """Write ``data`` to ``path`` whole or not at all (``transfusion.atomic.put``) in the set at ``url``."""
    atomic.put(fs, path, data, "shard set file", kept=f"the shard set {url} has no {fmt.INDEX}, so no reader takes "
               "it for complete; free space and write it again with --overwrite")


def prepare_output(fs, root: str, overwrite: bool, url: str) -> None:
    """Refuse a folder that holds files unless ``overwrite``; then remove its index (first) and shards."""
    if fs.exists(root):
        found = fs.ls(root, detail=False)
        if found and not overwrite:
            raise FileExistsError(f"{url} exists and is not empty; pass --overwrite to replace the shard set there")
        old = [p for p in found if posixpath.basename(p).startswith("shard-")]
        if fs.exists(posixpath.join(root, fmt.INDEX)):
            fs.rm(posixpath.join(root, fmt.INDEX))  # first: the set is incomplete from here on
        for path in old:
            fs.rm(path)
    fs.makedirs(root, exist_ok=True)


def write_shards(records, url: str, kind: str = "webdataset", samples_per_shard: int = 1000, workers: int = 1,
                 shuffle: bool = False, seed: int = 0, image_format: str = "png", encoder: Encoder | None = None,
                 image_size: int | None = None, overwrite: bool = False, desc: str = "writing shards") -> dict:
    """Write ``records`` (``PairRecords`` / ``TextRecords`` / ``document_records``) as a shard set at ``url``."""
    if kind not in fmt.KINDS:
        raise ValueError(f"--format must be one of {fmt.KINDS}, got {kind!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"--image_format must be one of {tuple(IMAGE_FORMATS)}, got {image_format!r}")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"--samples_per_shard and --workers must be >= 1, got {samples_per_shard} and {workers}")
    fs, root = url_to_fs(url)
    root = root.rstrip("/") or "/"
    prepare_output(fs, root, overwrite, url)
    content, encode = records.content, encoder is not None and records.content != "text"
    storage = encoder.storage if encode else "pixels"
    index = fmt.new_index(kind, content, storage)
    if content != "text":
        index["image_size"] = encoder.image_size if encode else image_size
        index["autoencoder_fingerprint"] = encoder.fingerprint if encode else None
    order = np.random.default_rng(seed).permutation(len(records)) if shuffle else np.arange(len(records))
    _JOB.clear()
    _JOB.update(records=records, order=order, samples_per_shard=samples_per_shard, encode=encode, kind=kind,
                content=content, image_format=image_format)
    count = math.ceil(len(records) / samples_per_shard)
    skipped, warned = Counter(records.skipped), 0
    pool = multiprocessing.get_context("fork").Pool(workers, _start_worker) if workers > 1 and count > 1 else None
    try:
        results = pool.imap(prepare_shard, range(count)) if pool else map(prepare_shard, range(count))
        with tqdm(total=len(records), desc=desc, unit=" records", disable=None) as bar:
            for number, payload, samples, bad, messages in results:
                if encode and content == "pairs":
                    for record, array in zip(payload, encoder([r.pop("pixels") for r in payload])):
                        record.update(array=array, storage=storage)
                        index["latent_shape"] = list(array.shape)
                elif encode:  # documents: every picture of the shard in one run of batches
                    arrays = iter(encoder([p for r in payload for p in r["pictures"]]))
                    for record in payload:
                        record.update(arrays=[next(arrays) for _ in record.pop("pictures")], storage=storage)
                        if record["arrays"]:
                            index["latent_shape"] = list(record["arrays"][0].shape)
                if encode:
                    payload = shard_bytes(payload, kind, content, storage, image_format)
                name = fmt.shard_name(kind, number)
                put(fs, posixpath.join(root, name), payload, url)
                index["shards"].append({"path": name, "samples": samples})
                skipped += bad
                for message in messages[:max(0, MAX_WARNINGS - warned)]:
                    warnings.warn(f"skipping {desc}: {message}", BadDataWarning)
                warned += len(messages)
                bar.update(samples + sum(bad.values()))
    finally:
        if pool is not None:
            pool.terminate()
        _JOB.clear()
    if not index["shards"]:
        raise ValueError(f"{desc}: nothing to write (no records)")
    index["skipped"] = dict(sorted(skipped.items()))
    put(fs, posixpath.join(root, fmt.INDEX), fmt.dump_index(index).encode(), url)  # last: the set is complete
    return index


def summary(url: str, index: dict) -> str:
    samples = sum(s["samples"] for s in index["shards"])
    skipped = ", ".join(f"{n} {reason}" for reason, n in index["skipped"].items()) or "none"
    shape = f", {index['image']} of shape {index['latent_shape']}" if index["latent_shape"] else ""
    return f"wrote {url}: {samples} {index['content']} records in {len(index['shards'])} shards{shape}; skipped: {skipped}"


# -- sources of a `transfusion fit` config ----------------------------------------------------------------------
def split_records(data, module, content: str | None, splits=("train", "validation")) -> dict:
    """``{split: records}`` of a data module built from a config: ``ImageTextDataModule`` (its image-caption or
    text source), ``TransfusionDataModule`` (the embedded shapes or text) or ``StoryDataModule`` (the embedded
    stories: training stories, and held-out ones for validation)."""
    from transfusion.data.modules.embedded import TransfusionDataModule
    from transfusion.data.modules.story import StoryDataModule

    if not hasattr(module, "sequence_layout"):
        raise ValueError(f"shards needs a Transfusion or Chameleon model config, got {type(module).__name__}")
    layout = module.sequence_layout()
    if hasattr(data, "uncached_pairs"):  # ImageTextDataModule
        data.layout = layout
        content = content or ("pairs" if data.image_captions is not None else "text")
        if content == "pairs":
            if data.image_captions is None:
                raise ValueError("--content pairs: the config's data has no image_captions source")
            return {s: PairRecords(data.uncached_pairs(s)) for s in splits}
        if data.text is None:
            raise ValueError("--content text: the config's data has no text source")
        return {s: TextRecords(data.text.documents(s)) for s in splits}
    if isinstance(data, StoryDataModule):
        from transfusion.data.shards.document_records import DocumentRecords

        if content not in (None, "documents"):
            raise ValueError(f"--content {content}: the story config's data holds interleaved documents "
                             "(--content documents)")
        data.layout = layout
        counts = {"train": data.hparams.num_stories, "validation": max(data.hparams.val_rows, 64)}  # as in setup()
        return {s: DocumentRecords(data.stories(s, counts[s])) for s in splits}
    if content == "documents":
        raise ValueError("--content documents: the config's data has no interleaved documents (use a story config, "
                         "e.g. lightning_configs/story_embedded.yaml)")
    if isinstance(data, TransfusionDataModule):
        from transfusion.data.embedded.shapes import ShapesDataset
        from transfusion.data.embedded.text import read_documents, split_documents

        hp, content = data.hparams, content or ("pairs" if data.hparams.num_examples else "text")
        if content == "pairs":
            if hp.num_examples == 0:
                raise ValueError("--content pairs: data.init_args.num_examples is 0 (a text-only config)")
            sets = {"train": ShapesDataset(hp.num_examples, layout.image_size, seed=hp.seed),  # as in setup()
                    "validation": ShapesDataset(max(hp.val_rows, 64), layout.image_size, seed=hp.seed + 1)}
            return {s: PairRecords(sets[s]) for s in splits}
        documents = dict(zip(("train", "validation"), split_documents(read_documents(hp.text_path))))
        return {s: TextRecords(documents[s]) for s in splits}
    raise ValueError(f"shards reads ImageTextDataModule or TransfusionDataModule configs, got {type(data).__name__}")


def write_splits(records: dict, output: str, overwrite: bool = False, **options) -> dict:
    """Each split's records as the shard set ``output/SPLIT``; ``{split: index}``."""
    fs, root = url_to_fs(output)
    if fs.exists(root) and fs.ls(root, detail=False) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace the shard sets there")
    return {split: write_shards(part, posixpath.join(output.rstrip("/"), split), overwrite=overwrite,
                                desc=f"writing {split}", **options) for split, part in records.items()}
