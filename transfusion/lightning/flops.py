"""Counting training FLOPs in a LightningModule (the accounting itself is ``transfusion.flops``)."""

from __future__ import annotations

import torch

from transfusion.flops import attention_pairs


class FlopAccounting:
    """LightningModule mixin for modules with a ``flop_counter``: counts each training batch, logs the
    cumulative ``train/flops`` (6ND), ``train/flops_exact`` and ``train/tokens``, and writes
    ``checkpoint["flops"]`` (the counter's summary) for sweeps to read."""

    def count_flops(self, doc_ids: torch.Tensor, image_ids: torch.Tensor, real: torch.Tensor, bidirectional: bool):
        doc_ids, image_ids, real = doc_ids.cpu(), image_ids.cpu(), real.cpu()  # one transfer, then CPU bookkeeping
        stats = torch.tensor([int(real.sum()), attention_pairs(doc_ids, image_ids, real, bidirectional)],
                             dtype=torch.float64)
        if self.trainer.world_size > 1:  # every process trains on its own rows
            stats = self.trainer.strategy.reduce(stats.to(self.device), reduce_op="sum").cpu()
        self.flop_counter.add(*(int(s) for s in stats.tolist()))
        self.log("train/flops", self.flop_counter.flops, batch_size=doc_ids.shape[0])
        self.log("train/flops_exact", self.flop_counter.exact_flops, batch_size=doc_ids.shape[0])
        self.log("train/tokens", float(self.flop_counter.tokens), batch_size=doc_ids.shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["flops"] = self.flop_counter.summary()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})  # checkpoints from before FLOP accounting start at zero
        for name in ("tokens", "pairs"):
            state.setdefault(f"flop_counter.{name}", torch.zeros((), dtype=torch.long))
