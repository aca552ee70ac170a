"""Latent caching: encode an image dataset once with the frozen autoencoder, so training skips the encoder.

``transfusion cache-latents --config X.yaml [overrides] --output DIR`` is ``transfusion shards --encode --format
parquet`` (``transfusion.data.shards.write``): it builds the model and data module of a Transfusion or Chameleon
config, encodes every usable image of the train and validation splits (after the same checks and preprocessing as
on-the-fly training) and writes ``DIR/train/`` and ``DIR/validation/``, shard sets whose records hold KL-VAE
latents ((C, h, w) float32, unit variance; Transfusion) or VQ codes ((h * w,) int32; Chameleon) with all captions,
and whose ``index.json`` names the autoencoder's fingerprint, the image size and the latent shape.

``ImageTextDataModule(latent_cache=DIR)`` then trains from it (``LatentPairs``: latents are small, so a split is read
into memory), after checking that the fingerprint (a hash of the autoencoder's weights and latent scale) equals the
one of the model's autoencoder. Any shard set written with ``--encode`` (tar or Parquet, local or an fsspec URL) is
such a cache. Caches of the earlier layout (``meta.json`` + ``latents.npy``) still load. Both encoders are
deterministic (posterior means, nearest codes), so cached and on-the-fly values are the same.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path

import numpy as np
import torch

FILES = {"latents": ("latents.npy", np.float32), "codes": ("codes.npy", np.int32)}  # the earlier layout: kind -> file


def autoencoder_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of an autoencoder module's parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def is_cache(path: str) -> bool:
    """Whether ``path`` holds a latent cache: shard sets with an index, or the earlier ``meta.json`` layout."""
    from transfusion.data.shards.load import has_index

    return has_index(posixpath.join(str(path).rstrip("/"), "train")) or has_index(str(path)) or \
        (Path(path) / "meta.json").is_file()


def _check(where: str, found: str, fingerprint: str | None, cached_size, image_size: int) -> None:
    if fingerprint is not None and found != fingerprint:
        raise ValueError(
            f"latent cache {where!r} was made by another autoencoder (fingerprint {str(found)[:12]}..., this model's "
            f"is {fingerprint[:12]}...); re-run `transfusion cache-latents` or drop latent_cache")
    if cached_size != image_size:
        raise ValueError(f"latent cache {where!r} holds {cached_size}px images, the model wants {image_size}px")


class LatentPairs:
    """Item ``i``: ``{"image": (C, h, w) float latent or (n,) long codes, "captions": [str, ...]}`` from one
    split of a cache: ``ROOT/SPLIT`` a shard set of encoded images (or ``ROOT`` itself, one set), or the earlier
    ``meta.json`` layout."""

    def __init__(self, root: str | Path, split: str, fingerprint: str | None, image_size: int):
        from transfusion.data.shards.load import has_index, read_records

        root = str(root)
        url = posixpath.join(root.rstrip("/"), split)
        url = url if has_index(url) else root if has_index(root) else None
        if url is None:
            self._load_meta(Path(root), split, fingerprint, image_size)
            return
        index, records = read_records(url)
        if index["content"] != "pairs" or index["image"] not in ("latents", "codes"):
            raise ValueError(f"latent cache {url!r} holds {index['content']} with {index['image']} images, not "
                             "encoded pairs; write it with `transfusion shards --encode` or `transfusion cache-latents`")
        _check(url, index["autoencoder_fingerprint"], fingerprint, index["image_size"], image_size)
        self.kind = index["image"]
        self.latents = [r["array"] for r in records]
        self.captions = [r["captions"] for r in records]
        self.name, self.skipped, self.converted = f"latent cache {split}", dict(index["skipped"]), {}

    def _load_meta(self, root: Path, split: str, fingerprint: str | None, image_size: int) -> None:
        """The earlier layout: ``meta.json`` and ``SPLIT/latents.npy`` (or ``codes.npy``) + ``captions.jsonl``."""
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(f"latent cache {str(root)!r}: no {split}/index.json (nor meta.json); make it with "
                                    "`transfusion cache-latents`")
        meta = json.loads((root / "meta.json").read_text())
        _check(str(root), meta["autoencoder_fingerprint"], fingerprint, meta["image_size"], image_size)
        self.kind = meta.get("kind", "latents")
        self.latents = np.load(root / split / FILES[self.kind][0], mmap_mode="r")
        self.captions = [json.loads(line) for line in (root / split / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
        if len(self.captions) != len(self.latents):
            raise ValueError(f"latent cache {str(root / split)!r}: {len(self.latents)} latents but {len(self.captions)} captions")
        self.name, self.skipped, self.converted = f"latent cache {split}", meta["skipped"].get(split, {}), {}

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        value = torch.from_numpy(np.array(self.latents[i]))
        return {"image": value.long() if self.kind == "codes" else value, "captions": self.captions[i]}

    def summary(self) -> str:
        return f"cached; skipped when cached: {self.skipped or 'none'}"


def write_cache(pairs_by_split: dict, autoencoder, output: str | Path, batch_size: int = 64,
                checkpoint: str | None = None, num_workers: int = 0, kind: str = "parquet",
                samples_per_shard: int = 10_000, overwrite: bool = False) -> dict:
    """Encode ``{split: ImageCaptionPairs}`` into shard sets ``output/SPLIT`` with ``autoencoder``: an
    ``AutoencoderModule`` (latents) or a ``VQAutoencoderModule`` (codes); ``num_workers`` processes decode
    images. Returns ``{split: index}``. (``checkpoint`` is kept for callers of the earlier layout; unused.)"""
    from transfusion.data.shards.write import Encoder, PairRecords, write_splits

    records = {split: PairRecords(pairs) for split, pairs in pairs_by_split.items()}
    return write_splits(records, str(output), overwrite=overwrite, kind=kind, samples_per_shard=samples_per_shard,
                        workers=max(1, num_workers), encoder=Encoder(autoencoder, batch_size))
