"""Latent caching: encode an image dataset once with the frozen autoencoder, so training skips the encoder.

``transfusion cache-latents --config X.yaml [overrides] --output DIR`` builds the model and data module of
a Transfusion or Chameleon config, encodes every usable image of the train and validation splits (after the
same checks and preprocessing as on-the-fly training) and writes::

    DIR/meta.json                  kind, autoencoder fingerprint, image size, latent shape, counts
    DIR/{train,validation}/latents.npy    Transfusion (KL-VAE): (N, C, h, w) float32, unit-variance latents
    DIR/{train,validation}/codes.npy      Chameleon (VQ-VAE): (N, h * w) int32 codebook indices
    DIR/{train,validation}/captions.jsonl one JSON list of captions per image

``ImageTextDataModule(latent_cache=DIR)`` then trains from it, after checking that the fingerprint (a hash
of the autoencoder's weights and latent scale) equals the one of the model's autoencoder. Both encoders are
deterministic (posterior means, nearest codes), so cached and on-the-fly values are the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

FORMAT = 1
FILES = {"latents": ("latents.npy", np.float32), "codes": ("codes.npy", np.int32)}  # kind -> file, dtype


def autoencoder_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of an autoencoder module's parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class LatentPairs:
    """Item ``i``: ``{"image": (C, h, w) float latent or (n,) long codes, "captions": [str, ...]}`` from one
    split of a cache."""

    def __init__(self, root: str | Path, split: str, fingerprint: str | None, image_size: int):
        root = Path(root)
        meta = json.loads((root / "meta.json").read_text())
        if fingerprint is not None and meta["autoencoder_fingerprint"] != fingerprint:
            raise ValueError(
                f"latent cache {str(root)!r} was made by another autoencoder (fingerprint "
                f"{meta['autoencoder_fingerprint'][:12]}..., this model's is {fingerprint[:12]}...; checkpoint "
                f"{meta.get('autoencoder_checkpoint')!r}); re-run `transfusion cache-latents` or drop latent_cache")
        if meta["image_size"] != image_size:
            raise ValueError(f"latent cache {str(root)!r} holds {meta['image_size']}px images, the model wants {image_size}px")
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


@torch.no_grad()
def write_cache(pairs_by_split: dict, autoencoder, output: str | Path, batch_size: int = 64,
                checkpoint: str | None = None, num_workers: int = 0) -> dict:
    """Encode ``{split: ImageCaptionPairs}`` into ``output`` with ``autoencoder``: an ``AutoencoderModule``
    (latents) or a ``VQAutoencoderModule`` (codes)."""
    output = Path(output)
    autoencoder = autoencoder.eval()
    device = next(autoencoder.parameters()).device
    kind = "codes" if hasattr(autoencoder, "encode_codes") else "latents"
    encode = autoencoder.encode_codes if kind == "codes" else autoencoder.encode_latents
    name, dtype = FILES[kind]
    meta = {"format": FORMAT, "kind": kind, "autoencoder_fingerprint": autoencoder_fingerprint(autoencoder),
            "autoencoder_checkpoint": checkpoint, "image_size": autoencoder.config.image_size,
            "latent_shape": None, "count": {}, "skipped": {}}
    for split, pairs in pairs_by_split.items():
        (output / split).mkdir(parents=True, exist_ok=True)
        loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=lambda items: items)
        latents, captions, written = None, [], 0
        for items in tqdm(loader, desc=f"encoding {split}", disable=None):
            z = encode(torch.stack([it["image"] for it in items]).to(device)).cpu()
            if latents is None:
                meta["latent_shape"] = list(z.shape[1:])
                latents = np.lib.format.open_memmap(output / split / f"{name}.partial", mode="w+",
                                                    dtype=dtype, shape=(len(pairs), *z.shape[1:]))
            latents[written:written + len(z)] = z.numpy().astype(dtype)
            written += len(z)
            captions += [it["captions"] for it in items]
        latents.flush()
        del latents
        (output / split / f"{name}.partial").replace(output / split / name)
        (output / split / "captions.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions),
                                                       encoding="utf-8")
        meta["count"][split] = written
        meta["skipped"][split] = dict(getattr(pairs, "skipped", {}))
    (output / "meta.json").write_text(json.dumps(meta, indent=1))  # last: a cache without it is incomplete
    return meta
