"""Per-step random numbers that a resumed run draws exactly as an uninterrupted one would.

The global RNG's state is not in Lightning checkpoints (and differs in every data worker and rank), so
training noise comes from a generator seeded by (seed, global step, batch index, rank) instead: a pure
function of where training is, whatever happened before.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch


def step_generator(module: L.LightningModule, batch_idx: int, seed: int) -> torch.Generator:
    """A generator on the module's device for this training step (gradient-accumulation batches differ)."""
    key = [seed, module.global_step, batch_idx, module.global_rank]
    state = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)  # mixed bits, fits int64
    return torch.Generator(module.device).manual_seed(state)
