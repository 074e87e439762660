"""The flat-map grid: which pixels are brain, and the two moves every clip makes on it.

In: an (H, W) bool pixel mask, as stored with every shard sample (``mask.npz``). Out: a
``FlatGrid`` that turns in-mask pixel vectors ``(..., P)`` (the layout of ``bold.npy``: the mask's
pixels in row-major order) into images ``(..., H, W)`` with zeros outside the brain (``unmask``),
and pools f x f blocks (``coarse(f)``, the pooled grid, and ``pool(x, f)``, the mean of each
block's brain pixels; a block is brain if any of its pixels is).

Pretraining, the benchmarks and the scaling sweep read clips through ``fmri_bench.clips``,
which holds one ``FlatGrid`` per mask; ``downsample`` applies the same pooling to clips that
are already full images (in-memory synthetic clips).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


class FlatGrid:
    """The pixel geometry of one flat-map mask. mask: (H, W) bool."""

    def __init__(self, mask):
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"a flat-map mask is (H, W), got shape {mask.shape}")
        self.shape: tuple[int, int] = (int(mask.shape[0]), int(mask.shape[1]))
        self.mask = torch.from_numpy(mask.copy())
        self.flat = torch.from_numpy(np.flatnonzero(mask.ravel()))  # (P,) row-major pixel indices
        self._pools: dict[int, tuple[FlatGrid, torch.Tensor, torch.Tensor]] = {}

    @property
    def n_pixels(self) -> int:
        return len(self.flat)

    def unmask(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (..., P) -> (..., H, W) float32, zeros outside the mask."""
        if pixels.shape[-1] != self.n_pixels:
            raise ValueError(f"{pixels.shape[-1]} pixel values for a mask of {self.n_pixels} pixels")
        lead = pixels.shape[:-1]
        rows = pixels.reshape(-1, self.n_pixels)
        image = torch.zeros((rows.shape[0], self.shape[0] * self.shape[1]), dtype=torch.float32)
        image.index_copy_(1, self.flat, rows.float())
        return image.view(*lead, *self.shape)

    def _pooling(self, factor: int) -> tuple["FlatGrid", torch.Tensor, torch.Tensor]:
        """(coarse grid, block of each pixel (P,) as an index into the coarse pixels, 1 / brain
        pixels per coarse pixel)."""
        if factor not in self._pools:
            (H, W), f = self.shape, factor
            if f < 1 or H % f or W % f:
                raise ValueError(f"flat map {H} x {W} is not divisible by downsample={f}")
            rows, cols = np.nonzero(self.mask.numpy())
            block = (rows // f) * (W // f) + cols // f  # row-major block of each mask pixel
            out = np.zeros((H // f) * (W // f), dtype=bool)
            out[block] = True
            pos = np.searchsorted(np.flatnonzero(out), block)
            count = np.bincount(pos, minlength=int(out.sum()))
            self._pools[f] = (FlatGrid(out.reshape(H // f, W // f)), torch.from_numpy(pos),
                              torch.from_numpy((1.0 / count).astype(np.float32)))
        return self._pools[factor]

    def coarse(self, factor: int) -> "FlatGrid":
        """The grid pooled by ``factor`` in both directions (itself for 1)."""
        return self if factor == 1 else self._pooling(factor)[0]

    def pool(self, pixels: torch.Tensor, factor: int) -> torch.Tensor:
        """pixels: (..., P) -> (..., P_f): block sums of the brain pixels / their counts."""
        if factor == 1:
            return pixels
        _, pos, inv_count = self._pooling(factor)
        lead = pixels.shape[:-1]
        rows = pixels.reshape(-1, pixels.shape[-1]).float()
        out = torch.zeros((rows.shape[0], len(inv_count))).index_add_(1, pos, rows) * inv_count
        return out.view(*lead, len(inv_count))

    def __repr__(self) -> str:
        return f"FlatGrid({self.shape[0]} x {self.shape[1]}, {self.n_pixels} brain pixels)"


@lru_cache(maxsize=16)
def _grid_of(shape: tuple[int, int], data: bytes) -> FlatGrid:
    return FlatGrid(np.frombuffer(data, dtype=bool).reshape(shape))


def grid_of(mask) -> FlatGrid:
    """The FlatGrid of a mask, shared between calls with an equal mask (a few are kept)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.numpy()
    mask = np.ascontiguousarray(mask, dtype=bool)
    return _grid_of(tuple(mask.shape), mask.tobytes())


def downsample(bold: torch.Tensor, mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-image clips pooled like ``FlatGrid.pool``.

    bold (N, C, T, H, W), mask (N, H, W) bool -> (N, C, T, H / f, W / f), (N, H / f, W / f).
    """
    if factor == 1:
        return bold, mask
    N, C, T, H, W = bold.shape
    out, masks = [], []
    for b in range(N):
        grid = grid_of(mask[b])
        coarse = grid.coarse(factor)
        pixels = bold[b].reshape(C * T, H * W)[:, grid.flat]
        out.append(coarse.unmask(grid.pool(pixels, factor)).view(C, T, *coarse.shape))
        masks.append(coarse.mask)
    return torch.stack(out), torch.stack(masks)
