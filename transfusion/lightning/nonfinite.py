"""Numerical faults: a non-finite loss or gradient never reaches the weights.

:class:`NonFiniteGuard` looks at the gradients after backward (after they are reduced across ranks,
so every rank decides alike) and before the optimizer step. On a NaN or Inf it either

* ``action="skip"``: drops the step's gradients, so the optimizer leaves weights and moments alone
  (the learning-rate schedule still advances, as with AMP's skipped steps), warns naming the step,
  batch and parameters, counts the skip (logged as ``train/skipped_steps``, kept in checkpoints) and
  stops after ``max_consecutive_skips`` skips in a row, which means training has diverged; or
* ``action="stop"``: raises at once, naming the step, batch and parameters.

With fp16 mixed precision the gradients are checked after unscaling, so GradScaler's overflow steps
are counted as skips too (bf16 and fp32 have no overflow steps).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient it was configured not to skip."""


class NonFiniteGuard(L.Callback):
    def __init__(self, action: str = "skip", max_consecutive_skips: int = 20):
        if action not in ("skip", "stop"):
            raise ValueError(f"NonFiniteGuard action must be 'skip' or 'stop', got {action!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.action, self.max_consecutive_skips = action, max_consecutive_skips
        self.skipped, self.consecutive = 0, 0
        self._batch_idx, self._loss = -1, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        finite = torch.stack([g.isfinite().all() for _, g in named])  # one device sync for all of them
        if bool(finite.all()):
            self.consecutive = 0
            return
        bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
        loss = float(self._loss) if self._loss is not None else float("nan")
        where = (f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}): loss {loss:.4g}, "
                 f"non-finite gradient in {len(bad)} of {len(named)} parameters: {', '.join(bad[:5])}"
                 + (", ..." if len(bad) > 5 else ""))
        if self.action == "stop":
            raise NonFiniteError(f"non-finite values at {where}")
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(f"{self.consecutive} consecutive steps skipped for non-finite values; "
                                 f"training has diverged. Last: {where}")
        rank_zero_warn(f"skipping {where} (skipped so far: {self.skipped})")
        for p in pl_module.parameters():
            p.grad = None  # AdamW/SGD leave parameters without a gradient untouched (no decay, no moments)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])
