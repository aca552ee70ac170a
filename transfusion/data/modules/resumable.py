"""Exact mid-epoch resume for any map-style dataset.

The order of an epoch is a pure function of (seed, epoch): a permutation of the dataset's indices,
dealt round-robin to the ranks. A data module derived from :class:`ResumableDataModule` counts the
rows of the current epoch that were trained on (in ``on_before_batch_transfer``, which Lightning calls in the
main process just before a batch's step, never for a batch a worker or the fetcher only read ahead) and
stores them in its ``state_dict``, which Lightning keeps in every checkpoint; after ``--ckpt_path`` the
sampler starts where the killed run stopped. With rows that are
themselves a pure function of their index (``TransfusionRows``), a resumed run sees exactly the data
an uninterrupted one would have.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation, sharded over ranks, that can start part-way through an epoch.

    ``len()`` is always a full epoch's share of one rank (Lightning counts the restored batches against
    it); iteration yields only what is left after ``start_row`` global rows. A ``DistributedSampler``
    so that Lightning does not wrap it in another one under DDP.
    """

    def __init__(self, num_rows: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if num_rows <= 0:
            raise ValueError(f"the dataset is empty (num_rows={num_rows})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        # no super().__init__: it would query torch.distributed; we take ranks from the trainer
        self.num_rows, self.shuffle, self.seed = num_rows, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_row = 0, 0
        self.drop_last = True  # DistributedSampler's attributes, for code that reads them
        self.num_samples, self.total_size = len(self), len(self) * num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_row = epoch, 0  # a new epoch starts at its beginning

    def __len__(self) -> int:
        return self.num_rows // self.num_replicas  # equal on every rank (the tail is dropped)

    def order(self) -> torch.Tensor:
        """Global index order of the current epoch."""
        if not self.shuffle:
            return torch.arange(self.num_rows)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def __iter__(self):
        usable = len(self) * self.num_replicas
        order = self.order()[self.start_row:usable]
        return iter(order[self.rank::self.num_replicas].tolist())


class ResumableDataModule(L.LightningDataModule):
    """Base for data modules whose training order survives a kill: use :meth:`train_sampler`.

    The checkpointed position is ``{"epoch", "rows"}``: the epoch and the global rows of it already
    trained on (batches x batch size x ranks). Resuming with another batch size or number of ranks
    continues from the same row, but exact equality with an uninterrupted run needs both unchanged.
    """

    def __init__(self):
        super().__init__()
        self._resume_from: dict | None = None
        self._train_sampler: ResumableSampler | None = None
        self._trained = {"epoch": -1, "rows": 0}  # global rows trained on in the epoch that ran last

    def train_sampler(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True) -> ResumableSampler:
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(num_rows, shuffle=shuffle, seed=seed, num_replicas=replicas, rank=rank)
        self._batch_size = batch_size
        if self._resume_from is not None:
            # the fit loop builds its iterator before it calls set_epoch: start in the right epoch and row
            sampler.epoch, sampler.start_row = self._resume_from["epoch"], self._resume_from["rows"]
            self._resume_from = None
        self._train_sampler = sampler
        return sampler

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer  # a training batch about to be stepped (each micro-batch of an accumulation)
        if trainer is not None and trainer.training and self._train_sampler is not None:
            if self._trained["epoch"] != trainer.current_epoch:  # the first batch of an epoch
                self._trained = {"epoch": trainer.current_epoch, "rows": 0}
            self._trained["rows"] += self._batch_size * self._train_sampler.num_replicas
        return batch

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or self._train_sampler is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        # the rows of the epoch that ran last, in the trainer's epoch count (which max_steps may have advanced)
        epoch, rows, sampler = trainer.current_epoch, self._trained["rows"], self._train_sampler
        if rows >= len(sampler) * sampler.num_replicas:  # the epoch is done: the next one starts at 0
            return {"epoch": epoch + 1, "rows": 0}
        return {"epoch": epoch, "rows": rows}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._resume_from = {"epoch": int(state_dict["epoch"]), "rows": int(state_dict["rows"])}
            self._trained = dict(self._resume_from)
