"""The paper's optimisation, shared by Transfusion and Chameleon: AdamW, linear warm-up, cosine decay.

Weight decay applies to matrices only (not norms or biases); the learning rate decays to
``lr * min_lr_ratio`` over the trainer's estimated steps (paper: 3e-4 -> 1.5e-5 for Transfusion).
"""

from __future__ import annotations

import math

import torch


def adamw_cosine(params, lr: float, betas, eps: float, weight_decay: float, warmup_steps: int,
                 min_lr_ratio: float, total_steps: int) -> dict:
    """``configure_optimizers`` output for ``params`` (trainable only)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
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
