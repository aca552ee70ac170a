"""The paper's optimisation, shared by Transfusion and Chameleon: AdamW, linear warm-up, cosine decay.

Weight decay applies to matrices only (not norms or biases); the learning rate decays to
``lr * min_lr_ratio`` over the trainer's estimated steps (paper: 3e-4 -> 1.5e-5 for Transfusion). Parameters may
come in groups of their own learning rate (``text_lr``: pretrained text weights); one schedule scales every group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimizerConfig:
    """AdamW and its schedule, checked once when a module is built (errors name the model option)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.05
    text_lr: float | None = None  # of the pretrained text weights (the module forms their group); None: lr

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"model option lr must be > 0, got {self.lr}")
        if self.text_lr is not None and self.text_lr <= 0:
            raise ValueError(f"model option text_lr must be > 0 (or null: lr), got {self.text_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"model option betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("eps", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"model option {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"model option min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def configure(self, params, total_steps: int) -> dict:
        """``configure_optimizers`` output for ``params`` (tensors or ``{"params", "lr"}`` groups) over ``total_steps``."""
        return adamw_cosine(params, self.lr, self.betas, self.eps, self.weight_decay, self.warmup_steps,
                            self.min_lr_ratio, total_steps)


def adamw_cosine(params, lr: float, betas, eps: float, weight_decay: float, warmup_steps: int,
                 min_lr_ratio: float, total_steps: int) -> dict:
    """``configure_optimizers`` output for ``params`` (trainable only): tensors, or groups ``{"params": tensors,
    "lr": their learning rate}`` (``lr`` where a group has none); each splits into a decayed and an undecayed group,
    and the schedule scales each group's learning rate by the same factor."""
    params = list(params)
    sets = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = []
    for group in sets:
        trainable = [p for p in group["params"] if p.requires_grad]
        group_lr = group.get("lr", lr)
        groups += [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0, "lr": group_lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    total = max(int(total_steps), 1)
    warmup = min(warmup_steps, total)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
