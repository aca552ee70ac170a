"""Key/value cache for one attention layer.

Called by ``Attention.forward`` with the new positions' keys and values (B, H, Lq, Dh); returns them
appended to the cached ones. With ``commit`` False (a diffusion step over noisy patches) the new
entries are used but not kept, so noisy states never enter the cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self):
        self.k: torch.Tensor | None = None  # (B, H, S, Dh)
        self.v: torch.Tensor | None = None
        self.commit = True

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if self.commit:
            self.k, self.v = k, v
        return k, v


def make_caches(n_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(n_layers)]


def set_commit(caches: list[KVCache], commit: bool) -> None:
    for cache in caches:
        cache.commit = commit
