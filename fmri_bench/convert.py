"""Convert fMRI files into flat-map WebDataset shards (what ``fmri-bench flatten`` runs).

In: CIFTI dtseries / dscalar, GIFTI func.gii (both hemispheres, found by name), NIfTI volumes
(read by ``fmri_bench.io.load_run``). Out: ``{out}/shard-{index:06d}.tar`` shards, one sample
per run (``fmri_bench.shards`` layout), and a :class:`FlattenSummary`.

Each run goes through ``fmri_bench.preprocess.preprocess_run`` with the space's
``fmri_bench.flatmap.FlatMapper`` (z-score per vertex, TR -> ``tr``, rasterise, float16); a
3D volume or dscalar is a single-frame map stored as given. A bad input is reported on stderr
as one line naming the file, skipped, and listed in the summary; the others are still
converted. A run enters a shard only once fully converted, and shards are written atomically,
so a failure never leaves a partial shard.

Splitting over independent jobs: job ``i`` of ``n`` converts ``inputs[i::n]`` and writes the
shard indices ``i, i + n, i + 2n, ...``, so jobs never collide and, without failures, together
number their shards ``0 .. N-1``.

Keys: ``run_key`` (the readable ``sample_key`` and a short hash of the input's path relative to
the output folder), so a key belongs to one input path whatever else is listed, in any order.
Each sample's ``meta.json`` records its input (``input``: that path id and a ``version``: a hash
of the size and mtime of every file the run is read from, and the settings).

An output folder that already holds this job's shards is refused unless ``resume`` or
``overwrite``. ``resume`` keeps the shards whose runs are up to date (same input, same version),
converts the runs not in them and numbers new shards after them (an interrupted conversion loses
at most the shard it was filling); a shard holding a run whose input changed since is written
again and then removed (a stale run never counts as done). ``overwrite`` writes anew, then
deletes this job's shards the new call did not write.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fmri_bench.errors import InputError
from fmri_bench.shards import ShardWriter, encode_sample

_SUFFIXES = (".dtseries.nii", ".dscalar.nii", ".func.gii", ".shape.gii", ".nii.gz", ".nii",
             ".gii.gz", ".gii")
_ENTITY_RE = re.compile(r"^([A-Za-z0-9]+)-([A-Za-z0-9]+)$")


@dataclass
class FlattenSummary:
    """What a ``flatten`` call did. failed: (file, one-line message) per skipped input."""

    runs: int = 0
    frames: int = 0  # frames written (after TR resampling)
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    resumed: int = 0  # runs already in this job's shards (resume), not converted again
    stale: int = 0  # runs in this job's shards from inputs changed since (resume): converted again

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"runs={self.runs} frames={self.frames} seconds={self.seconds:.2f} "
                f"frames/s={self.frames_per_s:.1f} failed={len(self.failed)}")
        if self.resumed:
            text += f" resumed={self.resumed}"
        if self.stale:
            text += f" stale={self.stale}"
        if self.failed:
            text += " (" + ", ".join(os.path.basename(f) for f, _ in self.failed) + ")"
        return text


# ----------------------------------------------------------------------------- keys


MAX_TR = 60.0  # seconds; a larger TR is almost surely milliseconds or a typo


def _stem(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sample_key(path: str | os.PathLike) -> str:
    """A webdataset key from a file name: its stem, made of ``[A-Za-z0-9_-]``.

    ``sub-01_task-rest_bold.dtseries.nii`` -> ``sub-01_task-rest_bold``; a GIFTI hemisphere tag
    is dropped; a name without ``sub-`` takes the subject from the nearest parent folder that is
    ``sub-XX`` or all digits (HCP: ``100206/.../tfMRI_WM_LR_Atlas_MSMAll.dtseries.nii`` ->
    ``sub-100206_tfMRI_WM_LR_Atlas_MSMAll``).
    """
    path = Path(path)
    stem = _stem(path.name)
    if path.name.lower().endswith((".gii", ".gii.gz")):  # one key for both hemispheres
        stem = re.sub(r"_?hemi-[LR](?=_|$)", "", stem)
        stem = re.sub(r"\.[LR](?=\.|$)", "", stem)
        stem = re.sub(r"^[lr]h\.|_[lr]h(?=_|$)", "", stem)
    if "sub-" not in stem:
        for parent in path.parents:  # as given: folders above it do not count
            if parent.name.startswith("sub-") or parent.name.isdigit():
                stem = f"sub-{parent.name.removeprefix('sub-')}_{stem}"
                break
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")
    return key or "run"


def _path_id(path: str | os.PathLike, out: str | os.PathLike) -> str:
    """10 hex digits of sha1 of ``path`` relative to ``out`` (both made absolute; symlinks are
    not resolved, so a git-annex / DataLad file keeps its own name)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return hashlib.sha1(rel.encode("utf-8")).hexdigest()[:10]


def run_key(item, out: str | os.PathLike) -> str:
    """The sample key of one input (a path or a (left, right) GIFTI pair) in output folder ``out``.

    ``{sample_key}_{path id}``: the readable name and 10 hex digits of a hash of the input's
    path relative to ``out``. One input path has one key, whatever else a call lists and in
    which order; two paths never share one (``run/`` in ``siteA`` and ``siteB``); moving the
    input and output folders together keeps the keys, and with them the clip draws seeded from
    the key (``fmri_bench.clips.random_starts``).
    """
    path = item[0] if isinstance(item, tuple) else item
    return f"{sample_key(path)}_{_path_id(path, out)}"


def readable_key(key: str) -> str:
    """The ``sample_key`` part of a ``run_key`` (the path id suffix removed); other keys unchanged."""
    return re.sub(r"_[0-9a-f]{10}$", "", key)


def run_keys(items: list, out: str | os.PathLike) -> list[str]:
    """``run_key`` of each input (distinct inputs whose keys collide are an InputError)."""
    keys, seen = [], {}
    for item in items:
        key = run_key(item, out)
        name = os.fspath(item[0] if isinstance(item, tuple) else item)
        if key in seen:
            raise InputError(f"has the same sample key {key!r} as {seen[key]} (a path-hash collision): "
                             "rename one of them", name)
        seen[key] = name
        keys.append(key)
    return keys


def input_record(item, out: str | os.PathLike, events=None, settings: dict | None = None) -> dict:
    """What a sample was made from: {"id": the path id of its key, "version": 16 hex digits of
    a hash of the size and mtime of every file the run is read from (``io.run_files``) and of
    ``settings``}. A resume counts a stored run as done only when both match."""
    from fmri_bench.io import run_files

    path = item[0] if isinstance(item, tuple) else item
    stats = []
    for f in run_files(item, events):
        st = f.stat()
        stats.append([os.path.relpath(os.path.abspath(f), os.path.abspath(out)), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"files": stats, "settings": settings or {}}, sort_keys=True).encode("utf-8")
    return {"id": _path_id(path, out), "version": hashlib.sha1(blob).hexdigest()[:16]}


def _entities(key: str) -> dict[str, str]:
    """BIDS entities in a key (``sub-01_ses-2_task-rest`` -> {sub: 01, ses: 2, task: rest})."""
    out = {}
    for part in key.split("_"):
        m = _ENTITY_RE.match(part)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


# ----------------------------------------------------------------------------- one run

_MAPPERS: dict = {}  # space -> FlatMapper, per process (inherited by forked workers)
_THREADS: int | None = None  # rasteriser threads; 1 inside worker processes


def _mapper(space: str):
    if space not in _MAPPERS:
        from fmri_bench.flatmap import FlatMapper

        _MAPPERS[space] = FlatMapper(space)
    if _THREADS is not None and hasattr(_MAPPERS[space], "threads"):
        _MAPPERS[space].threads = _THREADS
    return _MAPPERS[space]


def _init_worker() -> None:
    """In a forked worker: one rasteriser thread per process (the processes are the
    parallelism), and no thread pool inherited from the parent (its threads did not fork)."""
    global _THREADS
    _THREADS = 1
    import fmri_bench.flatmap as flatmap

    if hasattr(flatmap, "_pool") and hasattr(flatmap._pool, "cache_clear"):
        flatmap._pool.cache_clear()


def _events_records(events) -> list[dict]:
    if events is None or len(events) == 0:
        return []
    records = []
    for onset, duration, trial_type in events[["onset", "duration", "trial_type"]].itertuples(
            index=False):
        if onset != onset:  # NaN: an event without a time cannot be cut out
            continue
        records.append({"onset": float(onset),
                        "duration": float(duration) if duration == duration else None,
                        "trial_type": str(trial_type)})
    return records


def convert_run(item, key: str, space: str | None = None, tr: float = 1.0,
                input_tr: float | None = None, events=None, record: dict | None = None) -> dict:
    """One input (a path or a (left, right) GIFTI pair) -> an encoded shard sample.

    record: the ``input_record`` stored in the meta as ``input``. Raises InputError (naming
    the file) on bad input.
    """
    from fmri_bench.io import load_run
    from fmri_bench.preprocess import preprocess_run

    run = load_run(item, space=space, tr=input_tr, events=events)
    if run.tr is not None and not 0.05 <= run.tr <= MAX_TR:
        src = item[0] if isinstance(item, tuple) else item
        raise InputError(f"header TR {run.tr:g} s is implausible (a GIFTI TimeStep in seconds instead "
                         f"of ms, or a wrong unit?): give the TR in seconds with --input-tr", src)
    mapper = _mapper(run.space)
    bold, tr_out = preprocess_run(run, mapper, tr=tr)  # (T', n_pixels) float16
    meta = {
        "key": key,
        "space": run.space,
        "grid": mapper.grid_meta(),
        "tr": None if tr_out is None else float(tr_out),
        "input_tr": None if run.tr is None else float(run.tr),
        "source": os.path.basename(run.source),
        "is_map": bool(run.is_map),
        "n_pixels": int(mapper.n_pixels),
        "entities": _entities(key),
    }
    if record is not None:
        meta["input"] = record
    return encode_sample(key, bold, mapper.mask, meta, _events_records(run.events))


def _convert_safe(item, key, space, tr, input_tr, events, record=None) -> tuple[dict | None, str | None]:
    """convert_run, with any failure turned into one line naming the file (for the parent)."""
    name = os.fspath(item[0] if isinstance(item, tuple) else item)
    try:
        return convert_run(item, key, space, tr, input_tr, events, record), None
    except InputError as err:
        return None, str(err) if err.path else f"{name}: {err}"
    except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
        text = " ".join(str(err).split())[:200]
        return None, f"{name}: {type(err).__name__}: {text}"


# ----------------------------------------------------------------------------- driver


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"output directory is not writable ({err.strerror or err})", out) from None


def _remove_leftovers(out: Path, prefix: str, shard_index: int, num_shards: int) -> None:
    """Remove what a killed run of this job left in ``out``: its shard temp files
    (``{prefix}-N.tar.tmp``) and the spill folders of flatten processes that are gone."""
    from fmri_bench.paths import remove_dead_work

    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6,}})\.tar\.tmp$")
    for path in out.iterdir():
        if (m := pattern.match(path.name)) and int(m.group(1)) % num_shards == shard_index:
            path.unlink(missing_ok=True)
    remove_dead_work(out, r"\.flatten-(?P<pid>\d+)-.*")


def _existing_shards(out: Path, prefix: str, shard_index: int, num_shards: int) -> dict[int, Path]:
    """This job's finished shards in ``out`` (index -> path, by index)."""
    from fmri_bench.shards import finished_shards

    return {i: p for i, p in finished_shards(out, prefix).items() if i % num_shards == shard_index}


def _resume_plan(existing: dict[int, Path], current: dict[str, str]) -> tuple[set[str], dict[Path, set[str]], set[str]]:
    """Which of this job's runs its shards in ``out`` already hold up to date.

    current: path id -> version of this job's inputs. -> (ids done: in a shard that stays,
    shards to write again -> the ids of their runs that are still up to date, stale ids: runs
    stored from an input that changed since). A shard with a stale run is written again (its
    runs converted anew, the old shard removed afterwards); one that also holds runs of inputs
    not given now, or runs without an input record, is refused: --resume cannot keep it whole.
    """
    from fmri_bench.shards import shard_metas

    done, replace, stale_ids = set(), {}, set()
    for path in existing.values():
        records = {}
        for key, meta in shard_metas(path).items():
            rec = meta.get("input") if isinstance(meta, dict) else None
            if not (isinstance(rec, dict) and {"id", "version"} <= set(rec)):
                raise InputError(f"run {key!r} has no input record (written by an older fmri_bench, or not by "
                                 "flatten): --resume cannot tell whether it is up to date; use --overwrite", path)
            records[key] = rec
        stale = sorted(k for k, r in records.items() if r["id"] in current and r["version"] != current[r["id"]])
        if not stale:
            done |= {r["id"] for r in records.values() if r["id"] in current}
            continue
        others = sorted(k for k, r in records.items() if r["id"] not in current)
        if others:
            raise InputError(f"holds runs whose inputs changed since ({_few(stale)}) beside runs of inputs not "
                             f"given now ({_few(others)}): give those inputs too, or use --overwrite", path)
        replace[path] = {r["id"] for k, r in records.items() if k not in stale}
        stale_ids |= {records[k]["id"] for k in stale}
    return done, replace, stale_ids - done


def _few(names: list[str]) -> str:
    return ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")


def _items(inputs: list, events: list | None) -> tuple[list, list]:
    """Inputs -> conversion items: a GIFTI hemisphere becomes its (left, right) pair, once."""
    from fmri_bench.io import file_kind, gifti_pair

    items, item_events, seen = [], [], set()
    for i, path in enumerate(inputs):
        item = os.fspath(path)
        try:
            if file_kind(item) == "gifti":
                lh, rh = gifti_pair(item)
                if (str(lh), str(rh)) in seen:
                    continue  # the other hemisphere of a pair already listed
                seen.add((str(lh), str(rh)))
                item = (str(lh), str(rh))
        except InputError:
            pass  # load_run reports it, in the job that owns this input
        items.append(item)
        item_events.append(events[i] if events is not None else None)
    return items, item_events


def _spaces(space: str | None, items: list) -> list[str]:
    """The flat maps these items will need, as far as known from the file names."""
    if space is not None:
        return [space]
    from fmri_bench.io import file_kind

    kinds = set()
    for item in items:
        try:
            kinds.add(file_kind(item[0] if isinstance(item, tuple) else item))
        except InputError:
            pass
    return [s for k, s in (("cifti", "fs_LR_32k"), ("nifti", "fsaverage5")) if k in kinds]


def flatten(inputs, out, space: str | None = None, tr: float = 1.0,
            input_tr: float | None = None, events=None, shard_size: int = 32, workers: int = 1,
            shard_index: int = 0, num_shards: int = 1, progress: bool = True,
            prefix: str = "shard", resume: bool = False, overwrite: bool = False) -> FlattenSummary:
    """Convert fMRI files to flat-map shards in ``out``; returns what was done.

    inputs: file paths. space: ``fs_LR_32k`` / ``fsaverage5`` (None: the file's own). tr:
    target TR in seconds; input_tr: overrides the header TR. events: one events path per input
    (None: look beside each run). workers > 1 loads and preprocesses in that many processes;
    the parent writes in input order, so the shards are the same bytes for any ``workers``.
    This job converts ``inputs[shard_index::num_shards]``. resume / overwrite: what to do with
    this job's shards already in ``out`` (see the module docstring; neither: refuse).
    """
    t0 = time.perf_counter()
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike))
                                     else inputs)]
    if shard_size < 1 or workers < 1:
        raise InputError("--shard-size and --workers must be >= 1")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    for name, value in (("--tr", tr), ("--input-tr", input_tr)):
        if value is not None and not 0.05 <= value <= MAX_TR:
            hint = " (that looks like milliseconds: give seconds)" if value > MAX_TR and value != float("inf") else ""
            raise InputError(f"{name} must be a repetition time in seconds in [0.05, {MAX_TR:g}], got {value}{hint}")
    seen_inputs: dict[str, str] = {}
    for p in inputs:
        real = os.path.realpath(p)
        if real in seen_inputs:
            raise InputError(f"given twice (also as {seen_inputs[real]}): list each input once", p)
        seen_inputs[real] = p
    if events is not None:
        events = list(events)
        if len(events) != len(inputs):
            raise InputError(f"--events: {len(events)} files for {len(inputs)} inputs "
                             "(give one per input, in the same order)")
    if resume and overwrite:
        raise InputError("give one of --resume and --overwrite")
    out = Path(out)
    _check_out_dir(out)
    _remove_leftovers(out, prefix, shard_index, num_shards)
    existing = _existing_shards(out, prefix, shard_index, num_shards)
    if existing and not (resume or overwrite):
        names = ", ".join(p.name for p in list(existing.values())[:2]) + (", ..." if len(existing) > 2 else "")
        raise InputError(f"output directory already holds {len(existing)} shards of this job ({names}): "
                         "pass --resume to keep them and convert the rest, or --overwrite to replace them", out)
    items, item_events = _items(inputs, events)
    keys = run_keys(items, out)
    mine = list(range(shard_index, len(items), num_shards))
    settings = {"space": space, "tr": tr, "input_tr": input_tr}
    records = {i: input_record(items[i], out, item_events[i], settings) for i in mine}
    done, replace, stale = set(), {}, set()
    start = shard_index
    if resume and existing:
        done, replace, stale = _resume_plan(existing, {r["id"]: r["version"] for r in records.values()})
        start = max(existing) + num_shards
    n_mine = len(mine)
    mine = [i for i in mine if records[i]["id"] not in done]
    if workers > 1 and len(mine) > 1:
        for s in _spaces(space, [items[i] for i in mine]):
            _mapper(s)  # build / load once, before the workers fork
        from fmri_bench.flatmap import compile_kernel

        compile_kernel()  # and compile the rasteriser once for all of them

    summary = FlattenSummary(resumed=n_mine - len(mine), stale=len(stale))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), disable=not progress, unit="run", file=sys.stderr,
               desc="flatten")
    jobs = [(items[i], keys[i], space, tr, input_tr, item_events[i], records[i]) for i in mine]
    written: set[str] = set()
    sink = ShardWriter(out, shard_size=shard_size, prefix=prefix, start_index=start, index_step=num_shards)
    try:
        with sink:
            for job, (sample, error) in zip(jobs, _run_all(jobs, workers, out)):
                if error is not None:
                    name = job[0][0] if isinstance(job[0], tuple) else job[0]
                    summary.failed.append((name, error))
                    bar.write(f"fmri-bench flatten: error: {error}", file=sys.stderr)
                else:
                    sink.write_encoded(sample)  # a failed write: InputError naming the shard
                    written.add(job[-1]["id"])
                    summary.runs += 1
                    summary.frames += json.loads(sample["meta.json"])["n_frames"]
                bar.update(1)
    except OSError as err:  # a worker's spill file (disk full, ...); the shard being written is dropped
        raise InputError(f"cannot write ({err.strerror or err})", err.filename or out) from None
    finally:
        bar.close()  # an error message starts on a line of its own
    summary.shards = [str(p) for p in sink.paths]
    if overwrite and summary.runs:  # the earlier call's shards this one did not write again
        # (kept when nothing new was written: a mistyped input must not delete earlier work)
        for path in set(existing.values()) - set(sink.paths):
            path.unlink(missing_ok=True)
    for path, valid in replace.items():  # resume: a shard with stale runs, once its valid ones are written anew
        if valid <= written | done:
            path.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_all(jobs: list, workers: int, out: Path):
    """Yield ``_convert_safe`` results in job order; with workers > 1 from a process pool,
    at most ``2 * workers`` runs in flight (a long run is hundreds of MB)."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield _convert_safe(*job)
        return
    # fork: workers inherit the flat-map operators already loaded (and test doubles)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".flatten-{os.getpid()}-") as spill, ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), initializer=_init_worker,
            mp_context=multiprocessing.get_context("fork")) as pool:
        pending: deque = deque()
        todo = iter(jobs)
        try:
            for job in todo:
                pending.append(pool.submit(_convert_spilled, spill, *job))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                sample, error = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_convert_spilled, spill, *nxt))
                yield _unspill(sample), error
        finally:  # interrupted (the consumer stopped): do not wait for runs nobody will write
            for future in pending:
                future.cancel()


def _convert_spilled(spill_dir: str, *job) -> tuple[dict | None, str | None]:
    """``_convert_safe`` in a worker process, with the ``bold.npy`` bytes (nearly all of a
    sample: ~130 MB for an HCP run) left in a file in ``spill_dir`` for the parent, instead of
    pickled through the result pipe (pickling, the pipe and unpickling took ~0.5 CPU-s per
    HCP run, half of it in the parent, which also writes the shards)."""
    sample, error = _convert_safe(*job)
    if sample is not None:
        fd, path = tempfile.mkstemp(dir=spill_dir, suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            f.write(sample["bold.npy"])
        sample["bold.npy"] = _Spilled(path)
    return sample, error


@dataclass(frozen=True)
class _Spilled:
    path: str


def _unspill(sample: dict | None) -> dict | None:
    """The sample with its spilled ``bold.npy`` read back (and the file removed)."""
    if sample is not None and isinstance(sample["bold.npy"], _Spilled):
        path = sample["bold.npy"].path
        with open(path, "rb") as f:
            sample["bold.npy"] = f.read()
        os.unlink(path)
    return sample
