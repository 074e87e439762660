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
decoded runs; ``fmri_bench.clips`` cuts them into clips.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

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

    bold: (T, n_pixels) as stored (float16); mask: (H, W) bool. A missing or unreadable member
    is an InputError naming the shard and the sample.
    """
    key, url = raw["__key__"], raw.get("__url__")
    missing = [m for m in ("bold.npy", "mask.npz") if m not in raw]
    if missing:
        raise InputError(f"sample {key} lacks {', '.join(missing)}", url)

    def read(member: str, decode, what: str):
        try:
            return decode(raw[member])
        except (ValueError, OSError, EOFError, KeyError, IndexError, zipfile.BadZipFile) as err:
            raise InputError(f"sample {key}: {member} is not {what} ({_short(err)})", url) from None

    bold = read("bold.npy", lambda b: np.load(io.BytesIO(b), allow_pickle=False), "a readable .npy array")
    mask = read("mask.npz", decode_mask, "a readable pixel mask")
    if bold.ndim != 2 or bold.shape[1] != int(mask.sum()):
        raise InputError(f"sample {key}: bold {bold.shape} does not match the mask's {int(mask.sum())} pixels", url)
    meta = read("meta.json", json.loads, "valid JSON") if "meta.json" in raw else {}
    events = read("events.json", json.loads, "valid JSON") if "events.json" in raw else []
    return {"key": key, "bold": bold, "mask": mask, "meta": meta, "events": events, "url": url}


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


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
        path = self.shard_path(self._index)
        with self._writing(path):
            if self._tar is None:
                self._open()
            self._tar.write(sample)
            self._keys.add(key)
            self._in_shard += 1
            self.n_samples += 1
            if self._in_shard >= self.shard_size:
                self._finish()
        return path

    def close(self) -> None:
        """Finish the current shard (if it holds any sample)."""
        if self._tar is not None:
            with self._writing(self.shard_path(self._index)):
                self._finish()

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A failed write (disk full, quota, permissions) drops the shard being written and is an
        InputError naming it: nothing half-written stays."""
        try:
            yield
        except OSError as err:
            self.abort()
            raise InputError(f"cannot write the shard ({err.strerror or err})", path) from None

    def abort(self) -> None:
        """Drop the shard being written: its temp file is removed, no ``.tar`` appears."""
        tmp, tar, file = self._tmp, self._tar, self._file
        self._tar = self._file = self._tmp = None
        try:
            if tar is not None:
                tar.close()  # writes the end blocks: fails again on a full disk
        except OSError:
            pass
        finally:
            try:
                if file is not None:
                    file.close()
            except OSError:
                pass
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


def tar_problem(err: BaseException) -> str:
    """What a tar reader's error (tarfile's, or webdataset's wrapping of it) says about the file,
    in one line."""
    text = str(err.args[0]) if err.args else str(err)
    text = text.split(" @ ", 1)[0]  # webdataset appends the open file object
    if "unexpected end of data" in text or "truncated header" in text:
        return "truncated (the file ends inside a member: an interrupted write or copy; write it again)"
    if "could not be opened successfully" in text or "empty file" in text:
        return "not a tar file (a shard is a .tar of webdataset samples)"
    if "invalid header" in text or "bad checksum" in text:
        return "not a tar file, or corrupt (invalid tar header)"
    return " ".join(text.split())


def _raw_samples(shards: list[str]) -> Iterator[dict]:
    """Raw samples of each shard in turn; a shard that cannot be read is an InputError naming it."""
    # our own rank / worker split happens before this (split_shards): wds must not split again
    for shard in shards:
        try:
            yield from wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                      empty_check=False)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise InputError(f"cannot read shard: {tar_problem(err)}", shard) from None


def shard_keys(path) -> set[str]:
    """The sample keys in one shard file, from its tar headers (the data are not read)."""
    return set(shard_metas(path))


def shard_metas(path) -> dict[str, dict | None]:
    """key -> the sample's ``meta.json`` (None when it has none) of one shard file; only the
    meta members are read, the others are skipped past."""
    metas: dict[str, dict | None] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                metas.setdefault(key, None)
                if ext == "meta.json":
                    metas[key] = json.load(tar.extractfile(member))
    except (OSError, tarfile.TarError) as err:
        raise InputError(f"cannot read shard: {tar_problem(err)}", path) from None
    except ValueError as err:  # meta.json that is not JSON
        raise InputError(f"cannot read shard: a meta.json is not valid JSON ({_short(err)})", path) from None
    return metas


def iter_samples(urls) -> Iterator[dict]:
    """Decoded runs ``{key, bold (T, n_pixels) float16, mask (H, W) bool, meta, events, url}``."""
    for raw in _raw_samples(expand_urls(urls)):
        yield decode_sample(raw)
