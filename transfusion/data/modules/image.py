"""Image data, batched as ``{"image": (N, 3, H, W)}`` for autoencoders (and with ``captions=True`` also
``{"caption": [str]}``, one caption drawn per item, for CLIP training): the embedded shapes, or the images
of a real image-caption source (``transfusion.data.sources``), checked and preprocessed as for Transfusion."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from transfusion.data.embedded.scenes import ScenesDataset
from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.data.modules.resumable import ResumableDataModule
from transfusion.data.sources import ImageCaptionSource
from transfusion.data.sources.pairs import ImageCaptionPairs


def collate_images(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the images of dataset items, dropping captions and attributes."""
    return {"image": torch.stack([item["image"] for item in items])}


def collate_captioned_images(items: list[dict]) -> dict:
    """Images plus one caption per item, drawn from its phrasings (torch's RNG: seeded by ``seed_everything``)."""
    picks = [int(torch.randint(len(item["captions"]), ())) for item in items]
    return {**collate_images(items), "caption": [item["captions"][i] for item, i in zip(items, picks)]}


class ImageDataModule(ResumableDataModule):
    """Train/validation images in [-1, 1]: :class:`ShapesDataset` (``images="scenes"``: :class:`ScenesDataset`), or ``source`` (then ``num_*`` are ignored and
    the source's validation split, or its last ``val_fraction``, is held out). The image order resumes exactly mid-epoch."""

    def __init__(
        self,
        image_size: int = 32,
        num_train: int = 10_000,
        num_val: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        source: ImageCaptionSource | None = None,
        val_fraction: float = 0.05,
        scan: str = "header",
        strict: bool = False,
        captions: bool = False,
        images: str = "shapes",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["source"])
        self.source = source
        for name in ("image_size", "num_train", "num_val", "batch_size"):
            if not isinstance(self.hparams[name], int) or self.hparams[name] <= 0:
                raise ValueError(f"data option {name} must be a positive integer, got {self.hparams[name]!r}")
        if images not in ("shapes", "scenes"):
            raise ValueError(f"data option images must be 'shapes' or 'scenes', got {images!r}")
        if num_workers < 0:
            raise ValueError(f"data option num_workers must be >= 0, got {num_workers}")
        self.train_set: ShapesDataset | None = None
        self.val_set: ShapesDataset | None = None

    def setup(self, stage: str | None = None):
        hp = self.hparams
        if self.train_set is None and self.source is None:
            embedded = ScenesDataset if hp.images == "scenes" else ShapesDataset
            self.train_set = embedded(hp.num_train, hp.image_size, hp.seed)
            self.val_set = embedded(hp.num_val, hp.image_size, hp.seed + 1)
        elif self.train_set is None:
            val = self.source.load("validation")
            train = self.source.load("train")
            if val is None:
                n_train = len(train) - max(1, round(len(train) * hp.val_fraction))
                train, val = train.select(range(n_train)), train.select(range(n_train, len(train)))
            name = type(self.source).__name__
            self.train_set, self.val_set = (ImageCaptionPairs(rows, hp.image_size, name=f"{name} {split}", scan=hp.scan,
                                                              strict=hp.strict)
                                            for rows, split in ((train, "train"), (val, "validation")))

    def _loader(self, dataset: ShapesDataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=self.train_sampler(len(dataset), hp.batch_size, hp.seed) if shuffle else None,
            num_workers=hp.num_workers,
            collate_fn=collate_captioned_images if hp.captions else collate_images,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle,  # constant batch shapes in training
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)
