"""Training data streams: endless batches of clips for pretraining, and fixed validation batches.

In: a ``TrainConfig`` (``fmri_bench.train``): flat-map shard URLs or ``data.synthetic=true``.
Out: iterators of batches ``{"bold": (B, 1, T, H, W), "mask": (B, H, W), "key": [str]}`` with a
``state_dict`` (epoch, batches consumed) that is enough to resume exactly: every stream is a
deterministic function of (seed, epoch), so a resumed run replays and skips what was consumed.
``SyntheticClips`` are in-memory clips for tests and benchmarks (no files).
"""

from __future__ import annotations

import numpy as np
import torch

from fmri_bench.errors import InputError


class SyntheticClips:
    """Deterministic in-memory flat-map clips for tests and benchmarks: clip ``i`` of a site is a
    function of (seed, site, i) only, so any split over ranks sees the same global batches.

    Two ellipses stand in for the hemispheres; each clip mixes ``n_networks`` fixed smooth spatial
    maps (shared by all sites) with random smooth time courses, plus noise; a site changes the
    noise level and the time scale. Frames are z-scored over the mask and clipped at +-3, like
    real clips. ``clip(i)`` -> bold (1, T, H, W) float32, mask (H, W) bool.
    """

    def __init__(self, img_size: tuple[int, int], num_frames: int, seed: int = 0, site: int = 0,
                 n_networks: int = 8):
        H, W = img_size
        self.num_frames, self.seed, self.site = num_frames, seed, site
        yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
        def ellipse(cx):
            return ((xx - cx) / 0.45) ** 2 + (yy / 0.85) ** 2 < 1

        self.mask = ellipse(-0.5) | ellipse(0.5)
        rng = np.random.default_rng((seed, 7))
        maps = []
        for _ in range(n_networks):
            m = np.zeros((H, W))
            for cx, cy, s in zip(rng.uniform(-0.9, 0.9, 3), rng.uniform(-0.8, 0.8, 3), rng.uniform(0.1, 0.3, 3)):
                m += rng.choice([-1, 1]) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s ** 2))
            maps.append(m * self.mask)
        self.maps = torch.from_numpy(np.stack(maps).reshape(n_networks, -1).astype(np.float32))  # (K, H*W)
        self.mask = torch.from_numpy(self.mask)
        self.mask_flat = self.mask.reshape(-1)
        self.noise = (0.3, 0.6)[site % 2]
        self.timescale = (4.0, 2.0)[site % 2]

    def clip(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(np.random.SeedSequence((self.seed, self.site, int(i))).generate_state(1, np.uint64)[0] >> 1)
        g = torch.Generator().manual_seed(seed)
        K, T = self.maps.shape[0], self.num_frames
        drive = torch.randn(K, 1, T + 7, generator=g)
        kernel = torch.exp(-torch.arange(8.0) / self.timescale).flip(0).view(1, 1, 8)
        courses = torch.nn.functional.conv1d(drive, kernel)[:, 0].T  # (T, K) smooth time courses
        x = courses @ self.maps + self.noise * torch.randn(T, self.maps.shape[1], generator=g)
        inside = x[:, self.mask_flat]
        x = (x - inside.mean(1, keepdim=True)) / inside.std(1, keepdim=True)
        x = x.clamp(-3, 3) * self.mask_flat
        return x.reshape(1, T, *self.mask.shape), self.mask

    def batch(self, indices) -> dict:
        clips = [self.clip(i) for i in indices]
        return {"bold": torch.stack([c[0] for c in clips]), "mask": torch.stack([c[1] for c in clips]),
                "key": [f"synthetic-site{self.site}-{i}" for i in indices]}


class SyntheticStream:
    """This rank's slice of each global batch of ``SyntheticClips``; position = batches taken."""

    def __init__(self, source: SyntheticClips, batch_size: int, rank: int = 0, world_size: int = 1,
                 offset: int = 0):
        self.source, self.B, self.rank, self.world, self.offset = source, batch_size, rank, world_size, offset
        self.epoch, self.position = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.B // self.world
        start = self.offset + self.position * self.B + self.rank * b
        self.position += 1
        return self.source.batch(range(start, start + b))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ShardStream:
    """Endless batches of random clips from this rank's shards, epoch after epoch.

    Epoch ``e`` is ``ClipDataset(..., seed, shuffle=True).set_epoch(e)``: deterministic, so the
    position (epoch, batches consumed) is enough to resume exactly (consumed batches replayed).
    """

    def __init__(self, urls: list[str], clip_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int = 0, oversample: float = 4.0, shuffle_buffer: int = 256, downsample: int = 1):
        from fmri_bench.clips import ClipDataset

        try:
            self.dataset = ClipDataset(urls, clip_len=clip_len, mode="random", oversample=oversample, seed=seed,
                                       shuffle=True, buffer_size=shuffle_buffer, rank=rank, world_size=world_size,
                                       downsample=downsample)
        except ValueError as err:
            raise InputError(f"training shards: {err}") from None
        self.batch_size, self.num_workers, self.rank = batch_size, num_workers, rank
        self.epoch, self.position = 0, 0
        self._it = None

    def __iter__(self):
        return self

    def _open(self):
        from torch.utils.data import DataLoader

        from fmri_bench.clips import collate

        self.dataset.set_epoch(self.epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate, drop_last=True)
        it = iter(loader)
        for i in range(self.position):  # replay what the checkpointed run consumed
            if next(it, None) is None:
                raise InputError(f"cannot resume: epoch {self.epoch} of rank {self.rank} now has {i} batches, "
                                 f"the checkpoint consumed {self.position} (did the shards change?)")
        return it

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._it = self._open()
            try:
                batch = next(self._it, None)
            except ValueError as err:  # a bad sample or grid, found while reading
                raise InputError(f"training shards: {err}") from None
            if batch is not None:
                self.position += 1
                return batch
            if self.position == 0:
                raise InputError(f"rank {self.rank} got no full batch of {self.batch_size} clips from its shards "
                                 f"({len(self.dataset.shards)} shards in all): add shards or lower batch_size")
            self.epoch, self.position, self._it = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


def val_batches(cfg, which: str, model_cfg) -> list[dict] | None:
    """The fixed validation batches ``which`` = "val" (same site) or "val_ood" (second site)."""
    n, b = cfg.data.val_batches, cfg.batch_size
    T, (H, W), ds = model_cfg.num_frames, model_cfg.img_size, cfg.data.downsample
    if cfg.data.synthetic:
        site = 0 if which == "val" else 1
        stream = SyntheticStream(SyntheticClips((H * ds, W * ds), T, cfg.seed, site), b, offset=10 ** 9)
        return [next(stream) for _ in range(n)]
    urls = cfg.data.val_urls if which == "val" else cfg.data.val_ood_urls
    if not urls:
        return None
    from torch.utils.data import DataLoader

    from fmri_bench.clips import ClipDataset, collate

    try:
        ds_ = ClipDataset(urls, clip_len=T, mode="sequential", seed=cfg.seed, rank=0, world_size=1, downsample=ds)
    except ValueError as err:
        raise InputError(f"{which} shards: {err}") from None
    out = []
    for batch in DataLoader(ds_, batch_size=b, collate_fn=collate):
        out.append(batch)
        if len(out) == n:
            break
    return out


