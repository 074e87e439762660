"""Clips: which windows of a run are read, and the one way they are read from shards.

In: flat-map shards (``fmri_bench.shards``: one sample per run, ``bold`` (T, P) float16 on the
sample's mask). Out: clips of ``clip_len`` frames, each z-scored per frame over the in-mask
pixels and clipped at +-3 (arXiv 2510.13768, section 2: "per-frame z-score, clip to 3"),
optionally pooled f x f, and unmasked into the (H / f, W / f) grid (``fmri_bench.grid``).

Where clips start (the sampler; the same rules for pretraining and the benchmarks):
- ``random``: ``int(oversample * T / clip_len)`` (at least 1) uniform random starts per run,
  sorted (upstream oversamples x4 per run for pretraining);
- ``sequential``: non-overlapping windows from frame 0 (step ``stride``, default ``clip_len``);
- ``event``: one clip per event, at frame ``event_frame(onset, tr, hrf_delay)``: the nearest
  frame, halves up (upstream truncates instead of rounding); events whose clip leaves the run
  are dropped.

Readers: ``ClipDataset`` streams clips for training (a torch ``IterableDataset``, split over DDP
ranks and DataLoader workers at the shard level); ``read_clips`` reads a fixed list of
(run, start) clips for the benchmarks. Both go through ``clip_frames`` and a ``FlatGrid``.
"""

from __future__ import annotations

import os
import zlib
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fmri_bench.grid import FlatGrid, grid_of
from fmri_bench.shards import _raw_samples, decode_sample, expand_urls

CLIP_MODES = ("random", "sequential", "event")


# ----------------------------------------------------------------------------- the sampler
def event_frame(onset: float, tr: float, hrf_delay: float = 0.0) -> int:
    """Frame of an event onset (s): nearest frame, halves up (``round`` would send 2.5 to 2)."""
    return int(np.floor((float(onset) + hrf_delay) / tr + 0.5))


def sequential_starts(n_frames: int, clip_len: int, stride: int | None = None) -> range:
    """Starts of the non-overlapping (or ``stride``-spaced) windows of a run."""
    return range(0, n_frames - clip_len + 1, stride or clip_len)


def random_starts(key: str, n_frames: int, clip_len: int, oversample: float, seed: int,
                  epoch: int = 0) -> np.ndarray:
    """Sorted random starts of a run, from ``default_rng((seed, epoch, crc32(key)))``, so they do
    not depend on how shards are split over ranks and workers."""
    n_clips = max(1, int(oversample * n_frames / clip_len))
    rng = np.random.default_rng((seed, epoch, zlib.crc32(key.encode("utf-8"))))
    return np.sort(rng.integers(0, n_frames - clip_len + 1, size=n_clips))


def event_starts(events: list[dict], n_frames: int, clip_len: int, tr: float,
                 hrf_delay: float = 0.0) -> Iterator[tuple[int, dict]]:
    """(start, event) for each event whose clip lies inside the run."""
    for event in events:
        start = event_frame(event["onset"], tr, hrf_delay)
        if 0 <= start <= n_frames - clip_len:
            yield start, event


# ----------------------------------------------------------------------------- reading
def clip_frames(bold, start: int, clip_len: int, clip: float = 3.0) -> torch.Tensor:
    """bold: (T, P) stored frames -> (clip_len, P) float32, z-scored per frame and clipped."""
    from fmri_bench.preprocess import normalize_frames

    frames = bold[start:start + clip_len]
    frames = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    return normalize_frames(frames, clip=clip)


def clip_image(frames: torch.Tensor, grid: FlatGrid, downsample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """frames: (T, P) on ``grid`` -> image (1, T, H / f, W / f), mask (H / f, W / f)."""
    coarse = grid.coarse(downsample)
    image = coarse.unmask(grid.pool(frames, downsample))
    return image.unsqueeze(0), coarse.mask


def read_clips(urls, wanted: dict[str, list[tuple[int, int]]], clip_len: int,
               clip: float = 3.0) -> Iterator[tuple[int, torch.Tensor, FlatGrid]]:
    """A fixed set of clips, in shard order.

    wanted: run key -> [(start, index)] -> yields (index, frames (clip_len, P) float32, grid).
    """
    for raw in _raw_samples(expand_urls(urls)):
        key = raw["__key__"]
        if key not in wanted:
            continue
        sample = decode_sample(raw)
        grid = grid_of(sample["mask"])
        for start, index in wanted[key]:
            yield index, clip_frames(sample["bold"], start, clip_len, clip), grid


def clip_requests(run_keys, starts) -> dict[str, list[tuple[int, int]]]:
    """Parallel arrays of run keys and starts -> ``read_clips``'s ``wanted``."""
    wanted: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, (k, s) in enumerate(zip(run_keys, starts)):
        wanted[str(k)].append((int(s), i))
    return wanted


# ----------------------------------------------------------------------------- streaming
def split_shards(shards: list, rank: int = 0, world_size: int = 1, worker_id: int = 0,
                 num_workers: int = 1) -> list:
    """This process's shards: rank ``r`` of ``w`` takes ``shards[r::w]``, then its DataLoader
    worker ``k`` of ``n`` takes every ``n``-th of those from ``k``. Over all (rank, worker) pairs
    every shard is taken exactly once."""
    if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
        raise ValueError(f"bad split: rank {rank}/{world_size}, worker {worker_id}/{num_workers}")
    return list(shards)[rank::world_size][worker_id::num_workers]


def current_split() -> tuple[int, int, int, int]:
    """(rank, world_size, worker_id, num_workers) of the calling process.

    Rank from an initialised ``torch.distributed`` group, else the ``RANK`` / ``WORLD_SIZE``
    variables torchrun sets; worker from ``torch.utils.data.get_worker_info()``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, n_workers


class ClipDataset(IterableDataset):
    """Clips of ``clip_len`` frames cut from the runs in flat-map shards (modes: see the module).

    Event mode labels a clip with its event's ``trial_type`` (mapped to an int by ``label_map``
    when given; events not in the map are dropped). In the other modes ``label_key`` names a meta
    field (e.g. ``"task"``) to use as the label. Event clips use the sample's meta ``tr``, else
    ``tr``, else 1.0 s (the flat-map TR).

    Yields ``{"bold": (1, clip_len, H / f, W / f) float32, "mask": (H / f, W / f) bool, "key": str,
    "start": int}`` plus ``"label"`` in event mode or with ``label_key``; ``downsample=f`` pools
    f x f blocks (``FlatGrid.pool``) before the image is made.

    Randomness: ``random_starts`` per run and epoch; call ``set_epoch`` each epoch for fresh
    clips. ``shuffle=True`` also permutes the shard order per epoch (same permutation on every
    rank) and mixes clips through a seeded buffer. Runs shorter than ``clip_len`` are skipped and
    counted in ``self.stats`` (per process).
    """

    def __init__(self, urls, clip_len: int = 16, mode: str = "random", oversample: float = 4.0,
                 stride: int | None = None, seed: int = 0, clip: float = 3.0,
                 tr: float | None = None, hrf_delay: float = 0.0,
                 label_map: dict[str, int] | None = None, label_key: str | None = None,
                 shuffle: bool = False, buffer_size: int = 256,
                 rank: int | None = None, world_size: int | None = None, downsample: int = 1):
        super().__init__()
        if mode not in CLIP_MODES:
            raise ValueError(f"mode must be one of {CLIP_MODES}, got {mode!r}")
        if clip_len < 1 or oversample <= 0 or (stride is not None and stride < 1) or downsample < 1:
            raise ValueError("clip_len, stride and downsample must be >= 1, oversample > 0")
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ValueError(f"no shards found at {urls!r}")
        missing = [u for u in self.shards if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
        if missing:
            raise ValueError(f"{missing[0]}: no such shard file or directory")
        self.clip_len = clip_len
        self.mode = mode
        self.oversample = oversample
        self.stride = stride or clip_len
        self.seed = seed
        self.clip = clip
        self.tr = tr
        self.hrf_delay = hrf_delay
        self.label_map = label_map
        self.label_key = label_key if label_key is not None else (
            "trial_type" if mode == "event" else None)
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.rank, self.world_size = rank, world_size
        self.downsample = int(downsample)
        self.epoch = 0
        self.stats = {"runs": 0, "clips": 0, "skipped_short": 0}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def my_shards(self) -> list[str]:
        """The shards this process reads (after the per-epoch shuffle and rank/worker split)."""
        rank, world, worker, n_workers = current_split()
        if self.rank is not None:
            rank, world = self.rank, self.world_size or 1
        shards = list(self.shards)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(shards))
            shards = [shards[i] for i in order]
        return split_shards(shards, rank, world, worker, n_workers)

    def __iter__(self) -> Iterator[dict]:
        clips = self._clips(self.my_shards())
        if self.shuffle and self.buffer_size > 1:
            rank, _, worker, _ = current_split()
            rng = np.random.default_rng((self.seed, self.epoch, rank, worker, 1))
            clips = _buffer_shuffle(clips, self.buffer_size, rng)
        return clips

    def _clips(self, shards: list[str]) -> Iterator[dict]:
        for raw in _raw_samples(shards):
            sample = decode_sample(raw)
            bold, key = sample["bold"], sample["key"]
            self.stats["runs"] += 1
            if bold.shape[0] < self.clip_len:
                self.stats["skipped_short"] += 1
                continue
            grid = grid_of(sample["mask"])
            try:
                grid.coarse(self.downsample)
            except ValueError as err:
                raise ValueError(f"{sample.get('url')}: {err}") from None
            for start, label in self._starts(sample, bold.shape[0]):
                image, mask = clip_image(clip_frames(bold, start, self.clip_len, self.clip), grid,
                                         self.downsample)
                out = {"bold": image, "mask": mask, "key": key, "start": int(start)}
                if label is not None:
                    out["label"] = label
                self.stats["clips"] += 1
                yield out

    def _starts(self, sample: dict, n_frames: int) -> Iterator[tuple[int, object]]:
        meta = sample["meta"]
        if self.mode == "event":
            tr = self.tr or meta.get("tr") or 1.0
            for start, event in event_starts(sample["events"], n_frames, self.clip_len, tr, self.hrf_delay):
                label = event.get(self.label_key)
                if self.label_map is not None:
                    if label not in self.label_map:
                        continue
                    label = self.label_map[label]
                yield start, label
            return
        label = None
        if self.label_key is not None:
            label = meta.get(self.label_key)
            if self.label_map is not None:
                if label not in self.label_map:
                    return
                label = self.label_map[label]
        if self.mode == "sequential":
            starts = sequential_starts(n_frames, self.clip_len, self.stride)
        else:
            starts = random_starts(sample["key"], n_frames, self.clip_len, self.oversample, self.seed, self.epoch)
        for start in starts:
            yield int(start), label


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def collate(batch: list[dict]) -> dict:
    """Stack clips: bold (B, 1, T, H, W), mask (B, H, W), start (B,), key list, label
    (B,) long tensor for int labels or a list of str."""
    out = {
        "bold": torch.stack([b["bold"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "start": torch.tensor([b["start"] for b in batch], dtype=torch.long),
        "key": [b["key"] for b in batch],
    }
    if "label" in batch[0]:
        labels = [b["label"] for b in batch]
        out["label"] = (torch.tensor(labels, dtype=torch.long)
                        if all(isinstance(x, (int, np.integer)) for x in labels) else labels)
    return out
