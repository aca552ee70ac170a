"""The base of the DataModules that serve Transfusion / Chameleon rows: the sequence layout taken from the model
being trained, loaders of ``collate_rows`` batches, and a training order that resumes exactly mid-epoch."""

from __future__ import annotations

from torch.utils.data import DataLoader

from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.data.modules.resumable import ResumableDataModule
from transfusion.data.rows.sequences import TransfusionRows, collate_rows


class RowsDataModule(ResumableDataModule):
    """Loaders of ``TransfusionRows``: a subclass sets ``train_set`` and ``val_set`` in ``setup`` and has the
    hyper-parameters ``batch_size``, ``num_workers`` and ``seed``."""

    def _resolve_layout(self) -> None:
        """The sequence layout of the model being trained, unless one was passed."""
        if self.layout is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "sequence_layout"):
                raise ValueError(f"{type(self).__name__} needs a layout: pass `layout=` or train a TransfusionModule "
                                 "with it")
            self.layout = module.sequence_layout()

    def caption_rows(self, **options) -> TransfusionRows:
        """Embedded caption-image rows (caption first or image first, no text rows) to mix into a fine-tune, so that
        captioning and document endings are not forgotten; ``options`` go to ``TransfusionRows``."""
        hp = self.hparams
        return TransfusionRows(ShapesDataset(10_000, self.layout.image_size, seed=hp.seed), None, self.layout,
                               seq_len=hp.seq_len, num_rows=hp.rows_per_epoch, text_ratio=0.0,
                               image_first_max_t=hp.image_first_max_t, seed=hp.seed, **options)

    def _loader(self, dataset, sampler=None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.hparams.num_workers, collate_fn=collate_rows,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams  # a seeded per-epoch order, sharded over ranks, resumable mid-epoch
        return self._loader(self.train_set, self.train_sampler(len(self.train_set), hp.batch_size, hp.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
