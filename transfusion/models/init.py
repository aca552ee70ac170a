"""Seeded initialisation of a network built on the meta device (Transfusion, Chameleon).

``init_weights(model, seed)`` gives every parameter its value from ``seed`` and its index alone, one full tensor
at a time on the CPU: a network built on the meta device and sharded (FSDP2: parameters are DTensors) gets exactly
the values of an unsharded one, so 1 process, DDP and FSDP2 start from the same weights. Matrices: N(0, 0.02)
(residual outputs scaled with depth) in the transformer, embedding and LM head, PyTorch's default
(Kaiming-uniform) elsewhere (patch layers); zeros for the layers named in ``zero`` and for biases; ones for norm
weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, zero: tuple[str, ...] = ()) -> None:
    """Initialise ``model`` (with ``embedding``, ``transformer`` and ``lm_head``) from ``seed``; parameters whose
    names start with a prefix in ``zero`` start at zero."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    # frozen text's trained rows (lmfusion.SpecialRows, made before FSDP2 shards) are copies of their table's
    params = [(n, p) for n, p in model.named_parameters() if not n.endswith(".special_rows")]
    for i, (name, p) in enumerate(params):  # the same index, so the same draw, with or without them
        full = torch.empty(p.shape, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        if name.startswith(zero) or name.endswith("bias"):
            full.zero_()
        elif p.dim() == 1:
            full.fill_(1.0)
        elif name.startswith("transformer."):
            full.normal_(0.0, model.transformer.init_std(name), generator=generator)
        elif name.startswith(("embedding.", "lm_head.")):
            full.normal_(0.0, 0.02, generator=generator)
        else:
            nn.init.kaiming_uniform_(full, a=5**0.5, generator=generator)
        if isinstance(p, DTensor):  # keep this rank's shard; every rank drew the same full tensor
            full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(full.to_local())
        else:
            p.copy_(full)
    for module in model.modules():
        if hasattr(module, "init_special_rows"):
            module.reset_index()  # after to_empty
            module.init_special_rows()
