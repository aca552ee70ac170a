"""Validation and test losses as means over the whole epoch and every process, each weighted by what it is a mean
of (text targets, images, image codes): the figure of one pass over the data whatever the batch size, the number
of processes or a short last batch (a mean of per-batch means would weigh a batch of 3 text targets as one of
3,000)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torchmetrics import MeanMetric


class EvalLosses(nn.Module):
    """Named running means (torchmetrics ``MeanMetric``: states summed across processes at ``compute``)."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.means = nn.ModuleDict({name: MeanMetric() for name in names})  # a NaN is dropped with a warning

    def update(self, name: str, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        """Add ``value``, a mean over ``weight`` items (a loss and its count of targets), or a tensor of per-item
        values at weight 1 each."""
        weight = torch.as_tensor(weight, dtype=torch.float32, device=value.device)
        self.means[name].update(torch.where(weight > 0, value.detach().float(), 0.0), weight)

    def compute(self) -> dict[str, torch.Tensor]:
        """Every mean over all processes (NaN where nothing was added), then reset. Each process must call it: it
        synchronises."""
        values = {}
        with warnings.catch_warnings():  # a mean without updates (tiny runs) computes NaN and says so
            warnings.simplefilter("ignore")
            for name, mean in self.means.items():
                values[name] = mean.compute()
                mean.reset()
        return values
