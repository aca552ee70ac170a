"""Key/value cache for one attention layer, in a preallocated buffer.

Called by ``Attention.forward`` with the new positions' keys and values (B, Hkv, Lq, Dh): with grouped-query
attention only the Hkv key/value heads are stored, never repeated to the H query heads; writes them after the
cached ones and returns views of all of them (no concatenation: a decoding step copies only its own Lq
positions). With ``commit`` False (a diffusion step over noisy patches) the new entries are written past the
committed length but not counted, so the next call overwrites them: noisy states never enter the cache.
The buffer grows by doubling when it is full.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 256


class KVCache:
    def __init__(self):
        self.k: torch.Tensor | None = None  # (B, Hkv, capacity, Dh); positions [0, len) are committed
        self.v: torch.Tensor | None = None
        self.length = 0
        self.commit = True

    def __len__(self) -> int:
        return self.length

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2] or self.k.dtype != k.dtype:
            self._grow(end, k)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        if self.commit:
            self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        B, H, _, Dh = like.shape
        capacity = max(needed, MIN_CAPACITY, 2 * (0 if self.k is None else self.k.shape[2]))
        k, v = (like.new_empty(B, H, capacity, Dh) for _ in range(2))
        if self.k is not None:
            k[:, :, :self.length] = self.k[:, :, :self.length]
            v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k, self.v = k, v


def make_caches(n_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(n_layers)]


def set_commit(caches: list[KVCache], commit: bool) -> None:
    for cache in caches:
        cache.commit = commit
