"""Flat-map runs as WebDataset shards, and 16-frame clips read back from them.

Out (writer): ``.tar`` shards, one sample per run, in the upstream flat-map layout
(MedARC-AI/fmri-fm ``main_generate_hcp_flat.py``), so published flat-map shards and ours read
with the same code. Members of a sample with key ``K``:

- ``K.bold.npy``: (T, n_pixels) float16, the in-mask pixels in the mask's row-major order;
- ``K.mask.npz``: the (H, W) bool pixel mask as a scipy sparse COO ``.npz`` (arrays ``row``,
  ``col``, ``data``, ``shape``, ``format``), as upstream writes it; ``scipy.sparse.load_npz``
  reads it. A dense npz with a ``mask`` array is accepted on reading too;
- ``K.meta.json``: what the run is: key, space, grid (shape, bbox, pixel_size), tr, source,
  n_frames, ... (upstream HCP shards hold sub / mod / task / mag / dir / n_frames);
- ``K.events.json``: a list of BIDS-like events ``{"onset", "duration", "trial_type"}`` (s).

Shards are written atomically (``name.tar.tmp``, fsync, rename) and byte-reproducibly (fixed
member mtimes, owners and zip timestamps), so the same inputs give the same bytes.

In (reader): shard paths, a directory, a glob or a brace pattern. ``iter_samples`` yields the
decoded runs; ``ClipDataset`` (a torch ``IterableDataset``) cuts them into clips
``{"bold": (1, T, H, W) float32, "mask": (H, W) bool, "key", "start", ["label"]}`` with the
per-frame z-score over in-mask pixels and clipping at +-3 of the paper (arXiv 2510.13768),
split over DDP ranks and DataLoader workers at the shard level.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from fmri_bench.errors import InputError

MEMBERS = ("bold.npy", "mask.npz", "meta.json", "events.json")
CLIP_MODES = ("random", "sequential", "event")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip member timestamp: reproducible .npz bytes


# ----------------------------------------------------------------------------- encoding


def _npy_bytes(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes, in one copy (write_array into BytesIO takes three)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be stored")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return b"".join([header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))])


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` like ``np.savez``, but with fixed timestamps (reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), _npy_bytes(array))
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) bool -> ``mask.npz`` bytes in scipy's sparse COO layout (the upstream format)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    row, col = np.nonzero(mask)  # row-major order: the pixel order of bold.npy
    return _npz_bytes({
        "row": row.astype(np.int32),
        "col": col.astype(np.int32),
        "format": np.array(b"coo"),
        "shape": np.array(mask.shape, dtype=np.int64),
        "data": np.ones(len(row), dtype=bool),
    })


def decode_mask(data: bytes) -> np.ndarray:
    """``mask.npz`` bytes (sparse COO as upstream, or dense under ``mask``) -> (H, W) bool."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if "mask" in npz.files:
            return np.asarray(npz["mask"], dtype=bool)
        shape = tuple(int(s) for s in npz["shape"])
        mask = np.zeros(shape, dtype=bool)
        mask[npz["row"], npz["col"]] = npz["data"].astype(bool)
    return mask


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, allow_nan=False).encode("utf-8")


def encode_sample(key: str, bold: np.ndarray, mask: np.ndarray, meta: dict,
                  events: list[dict] | None = None) -> dict[str, bytes | str]:
    """One run -> the members of a WebDataset sample (bytes), checked.

    bold: (T, n_pixels) float16 with n_pixels == mask.sum(); mask: (H, W) bool.
    """
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r}: use letters, digits, '-' and '_' only "
                         "(webdataset splits member names at the first '.')")
    bold = np.asarray(bold)
    mask = np.asarray(mask, dtype=bool)
    if bold.dtype != np.float16 or bold.ndim != 2:
        raise ValueError(f"{key}: bold must be (T, n_pixels) float16, "
                         f"got {bold.dtype} {bold.shape}")
    if bold.shape[1] != int(mask.sum()):
        raise ValueError(f"{key}: bold has {bold.shape[1]} pixels, the mask {int(mask.sum())}")
    meta = {**meta, "n_frames": int(bold.shape[0])}
    return {
        "__key__": key,
        "bold.npy": _npy_bytes(bold),
        "mask.npz": encode_mask(mask),
        "meta.json": _json_bytes(meta),
        "events.json": _json_bytes(list(events or [])),
    }


def decode_sample(raw: dict) -> dict:
    """Raw webdataset sample (member name -> bytes) -> {key, bold, mask, meta, events, url}.

    bold: (T, n_pixels) as stored (float16); mask: (H, W) bool.
    """
    key = raw["__key__"]
    missing = [m for m in ("bold.npy", "mask.npz") if m not in raw]
    if missing:
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key} lacks {', '.join(missing)}")
    bold = np.load(io.BytesIO(raw["bold.npy"]), allow_pickle=False)
    mask = decode_mask(raw["mask.npz"])
    if bold.ndim != 2 or bold.shape[1] != int(mask.sum()):
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key}: bold {bold.shape} does not "
                         f"match the mask's {int(mask.sum())} pixels")
    meta = json.loads(raw["meta.json"]) if "meta.json" in raw else {}
    events = json.loads(raw["events.json"]) if "events.json" in raw else []
    return {"key": key, "bold": bold, "mask": mask, "meta": meta, "events": events,
            "url": raw.get("__url__")}


# ----------------------------------------------------------------------------- writer


def finished_shards(out_dir, prefix: str = "shard") -> dict[int, Path]:
    """The finished ``{prefix}-{index:06d}.tar`` shards of a ShardWriter in ``out_dir``, by index
    (temp files of a shard being written do not count)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6,}})\.tar$")
    found = {int(m.group(1)): path for path in Path(out_dir).iterdir() if (m := pattern.match(path.name))}
    return dict(sorted(found.items()))


class ShardWriter:
    """Write samples into ``{prefix}-{index:06d}.tar`` shards of ``shard_size`` runs each.

    Each shard is written to ``name.tar.tmp``, fsynced and renamed when full or on close, so a
    ``.tar`` in ``out_dir`` is always complete. If the ``with`` block raises, the shard being
    written is deleted. Indices go ``start_index, start_index + index_step, ...``: independent
    jobs ``i`` of ``n`` use ``start_index=i, index_step=n`` and never collide.

        with ShardWriter("out", shard_size=32) as sink:
            sink.write(key, bold, mask, meta, events)
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 32, prefix: str = "shard",
                 start_index: int = 0, index_step: int = 1, mtime: float = 0.0):
        if shard_size < 1 or index_step < 1 or start_index < 0:
            raise ValueError("shard_size and index_step must be >= 1, start_index >= 0")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.prefix = prefix
        self.index_step = index_step
        self.mtime = mtime
        self.paths: list[Path] = []  # finished shards
        self.n_samples = 0
        self._index = start_index
        self._tar = None
        self._file = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def write(self, key: str, bold: np.ndarray, mask: np.ndarray, meta: dict,
              events: list[dict] | None = None) -> Path:
        """Add one run; returns the final path of the shard it goes into."""
        return self.write_encoded(encode_sample(key, bold, mask, meta, events))

    def write_encoded(self, sample: dict) -> Path:
        """Add a sample already made by :func:`encode_sample` (e.g. in a worker process)."""
        key = sample["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._keys.add(key)
        self._in_shard += 1
        self.n_samples += 1
        path = self.shard_path(self._index)
        if self._in_shard >= self.shard_size:
            self._finish()
        return path

    def close(self) -> None:
        """Finish the current shard (if it holds any sample)."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written: its temp file is removed, no ``.tar`` appears."""
        tmp, tar, file = self._tmp, self._tar, self._file
        try:
            if tar is not None:
                tar.close()
        finally:
            if file is not None:
                file.close()
            self._tar = self._file = self._tmp = None
            if tmp is not None and tmp.exists():
                tmp.unlink()

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self.shard_path(self._index).with_suffix(".tar.tmp")
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=self.mtime,
                                  user="", group="", mode=0o444)
        self._in_shard = 0

    def _finish(self) -> None:
        path = self.shard_path(self._index)
        self._tar.close()  # writes the tar end blocks; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, path)
        _fsync_dir(self.out_dir)
        self.paths.append(path)
        self._tar = self._file = self._tmp = None
        self._index += self.index_step


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reader


def expand_urls(urls: str | os.PathLike | Iterable) -> list[str]:
    """Shard paths from a list, a directory (its ``*.tar``), a glob or a brace pattern.

    Remote URLs (``http://``, ``pipe:``, ...) pass through unchanged for webdataset.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    out: list[str] = []
    for url in urls:
        url = os.fspath(url)
        if os.path.isdir(url):
            out.extend(sorted(str(p) for p in Path(url).glob("*.tar")))
        elif "{" in url:
            import braceexpand

            for u in braceexpand.braceexpand(url):
                out.extend(expand_urls(u))
        elif any(c in url for c in "*?["):
            out.extend(sorted(globlib.glob(url)))
        else:
            out.append(url)
    return out


def _raw_samples(shards: list[str]) -> Iterator[dict]:
    if not shards:
        return iter(())
    # our own rank / worker split happens before this (split_shards): wds must not split again
    return iter(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None,
                               workersplitter=None, empty_check=False))


def shard_keys(path) -> set[str]:
    """The sample keys in one shard file, from its tar headers (the data are not read)."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            return {name.split(".", 1)[0] for name in tar.getnames()}
    except (OSError, tarfile.TarError) as err:
        raise InputError(f"cannot read shard ({err})", path) from None


def iter_samples(urls) -> Iterator[dict]:
    """Decoded runs ``{key, bold (T, n_pixels) float16, mask (H, W) bool, meta, events, url}``."""
    for raw in _raw_samples(expand_urls(urls)):
        yield decode_sample(raw)


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


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


class ClipDataset(IterableDataset):
    """Clips of ``clip_len`` frames cut from the runs in flat-map shards.

    Modes (as upstream): ``random``: ``int(oversample * T / clip_len)`` (at least 1) clips at
    uniform random starts per run, sorted; ``sequential``: non-overlapping windows from frame 0
    (step ``stride``, default ``clip_len``); ``event``: one clip per event starting at frame
    ``round((onset + hrf_delay) / tr)``, halves up (``tr`` from the sample's meta, else 1.0 s,
    the flat-map TR; upstream truncates instead of rounding), events whose clip leaves the run
    are dropped; label = ``trial_type``, mapped to an int by ``label_map`` when given (events
    not in the map are dropped). In the other modes
    ``label_key`` names a meta field (e.g. ``"task"``) to use as the label.

    Each clip is z-scored per frame over the in-mask pixels and clipped to +-``clip``, then
    unmasked into the (H, W) grid (zeros outside the mask). Yields
    ``{"bold": (1, clip_len, H, W) float32, "mask": (H, W) bool, "key": str, "start": int}``
    plus ``"label"`` (str or int) in event mode or with ``label_key``. ``downsample=f`` pools
    f x f blocks before the grid is made (the mean of a block's brain pixels; a block is brain if
    any of its pixels is: ``fmri_bench.train.downsample``'s numbers, without the full-size grid),
    so ``bold`` is (1, clip_len, H / f, W / f) and ``mask`` (H / f, W / f).

    Randomness: the random starts of a run come from ``np.random.default_rng((seed, epoch,
    crc32(key)))``, so they do not depend on how shards are split over ranks and workers; call
    ``set_epoch`` each epoch for fresh clips. ``shuffle=True`` also permutes the shard order
    per epoch (same permutation on every rank) and mixes clips through a seeded buffer.
    Runs shorter than ``clip_len`` are skipped and counted in ``self.stats`` (per process).
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
        self._grid_cache: tuple | None = None  # (mask key, grid) of the last mask seen
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
        from fmri_bench.preprocess import normalize_frames

        for raw in _raw_samples(shards):
            sample = decode_sample(raw)
            bold, mask, key = sample["bold"], sample["mask"], sample["key"]
            n_frames = bold.shape[0]
            self.stats["runs"] += 1
            if n_frames < self.clip_len:
                self.stats["skipped_short"] += 1
                continue
            grid = self._grid(mask, sample.get("url"))
            for start, label in self._starts(sample, n_frames):
                frames = torch.from_numpy(bold[start:start + self.clip_len])  # (clip_len, P) float16
                frames = normalize_frames(frames, clip=self.clip)
                if grid["pool"] is not None:  # block sums of the brain pixels / their counts
                    pool, inv_count = grid["pool"]
                    frames = torch.zeros((self.clip_len, len(inv_count))).index_add_(1, pool, frames) * inv_count
                image = torch.zeros((self.clip_len, grid["mask"].numel()), dtype=torch.float32)
                image.index_copy_(1, grid["flat"], frames)
                out = {"bold": image.view(1, self.clip_len, *grid["mask"].shape), "mask": grid["mask"],
                       "key": key, "start": int(start)}
                if label is not None:
                    out["label"] = label
                self.stats["clips"] += 1
                yield out

    def _grid(self, mask: np.ndarray, url) -> dict:
        """Output mask (H/f, W/f), its pixels' row-major indices, and for f > 1 the block of each
        input mask pixel (index into the output mask pixels) with 1 / brain pixels per block."""
        key = (mask.shape, mask.tobytes())
        if self._grid_cache is None or self._grid_cache[0] != key:
            f, (H, W) = self.downsample, mask.shape
            if H % f or W % f:
                raise ValueError(f"{url}: flat map {H} x {W} is not divisible by downsample={f}")
            pool = None
            if f > 1:
                rows, cols = np.nonzero(mask)
                block = (rows // f) * (W // f) + cols // f  # row-major block of each mask pixel
                out = np.zeros((H // f) * (W // f), dtype=bool)
                out[block] = True
                pos = np.searchsorted(np.flatnonzero(out), block)
                count = np.bincount(pos, minlength=int(out.sum()))
                pool = (torch.from_numpy(pos), torch.from_numpy((1.0 / count).astype(np.float32)))
                mask = out.reshape(H // f, W // f)
            self._grid_cache = (key, {"mask": torch.from_numpy(mask), "pool": pool,
                                      "flat": torch.from_numpy(np.flatnonzero(mask.ravel()))})
        return self._grid_cache[1]

    def _starts(self, sample: dict, n_frames: int) -> Iterator[tuple[int, object]]:
        last = n_frames - self.clip_len  # last valid start
        meta = sample["meta"]
        if self.mode == "event":
            tr = self.tr or meta.get("tr") or 1.0
            for event in sample["events"]:
                # nearest frame, halves up (Python's round() would send 2.5 to 2)
                start = int(np.floor((float(event["onset"]) + self.hrf_delay) / tr + 0.5))
                if not 0 <= start <= last:
                    continue
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
            for start in range(0, last + 1, self.stride):
                yield start, label
        else:
            n_clips = max(1, int(self.oversample * n_frames / self.clip_len))
            rng = np.random.default_rng((self.seed, self.epoch, _key_seed(sample["key"])))
            for start in np.sort(rng.integers(0, last + 1, size=n_clips)):
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
