"""The embedded shapes as images: ``{"image": (N, 3, H, W)}`` batches for autoencoders, and with
``captions=True`` also ``{"caption": [str]}`` (one phrasing drawn per item) for CLIP training."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from transfusion.data.resumable import ResumableDataModule
from transfusion.data.shapes import ShapesDataset


def collate_images(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the images of dataset items, dropping captions and attributes."""
    return {"image": torch.stack([item["image"] for item in items])}


def collate_captioned_images(items: list[dict]) -> dict:
    """Images plus one caption per item, drawn from its phrasings (torch's RNG: seeded by ``seed_everything``)."""
    picks = [int(torch.randint(len(item["captions"]), ())) for item in items]
    return {**collate_images(items), "caption": [item["captions"][i] for item, i in zip(items, picks)]}


class ImageDataModule(ResumableDataModule):
    """Train/validation splits of :class:`ShapesDataset` images in [-1, 1]; the image order resumes exactly mid-epoch."""

    def __init__(
        self,
        image_size: int = 32,
        num_train: int = 10_000,
        num_val: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        captions: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        for name in ("image_size", "num_train", "num_val", "batch_size"):
            if not isinstance(self.hparams[name], int) or self.hparams[name] <= 0:
                raise ValueError(f"data option {name} must be a positive integer, got {self.hparams[name]!r}")
        if num_workers < 0:
            raise ValueError(f"data option num_workers must be >= 0, got {num_workers}")
        self.train_set: ShapesDataset | None = None
        self.val_set: ShapesDataset | None = None

    def setup(self, stage: str | None = None):
        hp = self.hparams
        if self.train_set is None:
            self.train_set = ShapesDataset(hp.num_train, hp.image_size, hp.seed)
            self.val_set = ShapesDataset(hp.num_val, hp.image_size, hp.seed + 1)

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
