"""Datasets and runs: where a benchmark reads from, and who / which state each run is.

In: a data directory: a simulated cohort (``fmri_bench.synth``; its CIFTI runs are flattened once
into shards, cached under ``paths.data_dir()``), a streamed cohort (shards already beside its
``ground_truth.json``), or any directory of flat-map shards with a ``participants.tsv``
(subject, sex, age, fluid_iq, family_id) in it or its parent. Out: a ``Dataset``: the shard
URLs, one ``RunInfo`` per run (read from the shards' ``meta.json`` / ``events.json`` members
only) and the participants table. ``cohort_shards`` also gives pretraining its subject split.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save


@dataclass(frozen=True)
class RunInfo:
    """One run of a shard: who, which state, how long. kind: "rest" | "task"."""

    key: str
    shard: str
    subject: str
    kind: str
    session: str  # REST1 / REST2 / the task name
    paradigm: str | None
    n_frames: int
    tr: float
    events: tuple = ()


_HCP_RUN = re.compile(r"(rfMRI|tfMRI)_([A-Za-z0-9]+)")
_BIDS_TASK = re.compile(r"task-([A-Za-z0-9]+)")
_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")
_MOD = re.compile(r"mod-(rfMRI|tfMRI)")


def run_identity(key: str, meta: dict) -> tuple[str | None, str, str, str | None]:
    """(subject, kind, session, paradigm) of a run from its shard meta / key.

    HCP names (``rfMRI_REST1_LR``, ``tfMRI_MOTOR_RL``), the upstream flat-map shards' entities
    (``sub-100307_mod-rfMRI_task-REST1_mag-3T_dir-LR``; meta ``sub`` / ``mod`` / ``task``) or
    BIDS entities (``task-rest``).
    """
    ent = meta.get("entities") or {}
    subject = meta.get("subject") or meta.get("sub") or ent.get("sub")
    if subject is None:
        m = _SUBJECT.search(key)
        subject = m.group(1) if m else None
    name = f"{meta.get('run', '')} {meta.get('source', '')} {key}"
    # the upstream flat-map shards' keys: sub-100307_mod-rfMRI_task-REST1_mag-3T_dir-LR
    mod = meta.get("mod") or ent.get("mod") or (_MOD.search(name).group(1) if _MOD.search(name) else None)
    task = meta.get("task") or ent.get("task") or (_BIDS_TASK.search(name).group(1) if _BIDS_TASK.search(name) else None)
    if mod in ("rfMRI", "tfMRI") and task:
        rest = mod == "rfMRI"
        return str(subject) if subject else None, "rest" if rest else "task", str(task).upper(), \
            None if rest else str(task).upper()
    m = _HCP_RUN.search(name)
    if m:
        rest = m.group(1) == "rfMRI"
        return str(subject) if subject else None, "rest" if rest else "task", m.group(2), \
            None if rest else m.group(2).upper()
    task = ent.get("task") or (_BIDS_TASK.search(name).group(1) if _BIDS_TASK.search(name) else None)
    if task is None:
        return str(subject) if subject else None, "unknown", "", None
    session = f"{task}{ent.get('ses', '')}{ent.get('run', '')}"
    if task.lower() == "rest":
        return str(subject) if subject else None, "rest", session.upper(), None
    return str(subject) if subject else None, "task", task.upper(), task.upper()


def scan_runs(urls) -> list[RunInfo]:
    """Read only the meta and events members of each shard (tar headers are skipped past)."""
    from fmri_bench.shards import expand_urls, tar_problem

    shards = expand_urls(urls)
    if not shards:
        raise InputError(f"no shards (*.tar) found at {urls!r}")
    parts: dict[str, dict] = defaultdict(dict)
    for shard in shards:
        try:
            with tarfile.open(shard) as tf:
                for member in tf:
                    key, _, ext = member.name.partition(".")
                    if ext in ("meta.json", "events.json"):
                        parts[key][ext] = json.load(tf.extractfile(member))
                        parts[key]["shard"] = shard
        except tarfile.TarError as err:
            raise InputError(f"cannot read shard: {tar_problem(err)}", shard) from None
    runs = []
    for key, p in parts.items():
        meta = p.get("meta.json", {})
        subject, kind, session, paradigm = run_identity(key, meta)
        if subject is None:
            raise InputError(f"run {key!r} names no subject (meta 'subject' / entities 'sub' / "
                             "'sub-' in the key): subject-disjoint splits need one", p["shard"])
        runs.append(RunInfo(key, p["shard"], subject, kind, session, paradigm,
                            int(meta.get("n_frames", 0)), float(meta.get("tr") or 1.0),
                            tuple(p.get("events.json", []))))
    return sorted(runs, key=lambda r: (r.subject, r.key))


@dataclass
class Dataset:
    """Where a benchmark reads from: shards, the participants table, the synthetic truth."""

    root: Path
    urls: list[str]
    runs: list[RunInfo]
    participants: pd.DataFrame | None
    cohort: Path | None = None  # a simulated cohort: its ground truth

    @property
    def synthetic(self) -> bool:
        return self.cohort is not None


def load_dataset(path=None, progress: bool = False) -> Dataset:
    """A simulated cohort (flattened into shards once, cached), a directory of shards, or an HCP /
    fMRIPrep tree (``harness.adapters``: flattened once, participants from its behavioural CSV /
    participants.tsv).

    path None: the smoke cohort (``synth.ensure_cohort("smoke")``); a name from the dataset
    catalogue (``data/datasets.yaml``, e.g. ``synth-book``) is its directory. A shard directory is searched
    recursively for ``*.tar``; ``participants.tsv`` (subject, sex, age, fluid_iq, family_id) is
    read from it or its parent when present.
    """
    from fmri_bench.catalog import resolve
    from fmri_bench.synth import ensure_cohort

    root = resolve(path) if path is not None else ensure_cohort("smoke", seed=0)
    labels = root  # where participants.tsv is looked for first
    if not root.exists():
        raise InputError("data directory not found", root)
    if (root / "ground_truth.json").is_file() and (root / "shards").is_dir():  # streamed cohort
        urls, cohort = [str(root / "shards")], root
    elif (root / "ground_truth.json").is_file():
        urls, cohort = list(cohort_shards(root, progress=progress).values()), root
    else:
        from fmri_bench.harness.adapters import detect_layout, real_shards

        urls, cohort = sorted(str(p) for p in root.rglob("*.tar")), None
        if not urls and detect_layout(root) is not None:  # an HCP or fMRIPrep tree: flattened once
            labels = real_shards(root, progress=progress)
            urls = sorted(str(p) for p in labels.rglob("*.tar"))
        if not urls:
            raise InputError("no flat-map shards (*.tar), no HCP or fMRIPrep runs and no simulated cohort here",
                             root)
    participants = None
    for cand in (labels / "participants.tsv", root / "participants.tsv", root.parent / "participants.tsv"):
        if cand.is_file():
            participants = pd.read_csv(cand, sep="\t", dtype={"subject": str, "family_id": str})
            break
    return Dataset(root, urls, scan_runs(urls), participants, cohort)


def cohort_fingerprint(cohort_dir: str | os.PathLike) -> str:
    """sha256 of a simulated cohort's ``ground_truth.json`` (generator version, seed, every run):
    caches built from a cohort carry it, so a regenerated cohort is never read through stale ones."""
    import hashlib

    path = Path(cohort_dir) / "ground_truth.json"
    if not path.is_file():
        raise InputError("no ground_truth.json here: not a simulated cohort", cohort_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cifti_runs(cohort_dir: Path) -> list[dict]:
    """The run records of a simulated cohort's ground_truth.json that have a CIFTI file."""
    path = cohort_dir / "ground_truth.json"
    if not path.is_file():
        raise InputError("no ground_truth.json here: not a simulated cohort (run fmri-bench simulate)", cohort_dir)
    runs = [r for r in json.loads(path.read_text())["runs"] if r.get("path")]
    if not runs:
        raise InputError("the cohort has no CIFTI runs (a streamed profile? its shards are already flat maps)",
                         cohort_dir)
    return runs


def pretraining_split(cohort_dir: str | os.PathLike, val_frac: float = 0.25, seed: int = 0) -> dict[str, str]:
    """subject -> "train" | "val" | "val_ood" for pretraining on a simulated cohort.

    In-distribution = the site with the most subjects: its families are split (seeded) into
    ``train`` and ``val``, so no held-out subject has a sibling in training (family ids from the
    cohort's participants.tsv; without one each subject is its own family); every other site
    is ``val_ood``.
    """

    cohort_dir = Path(cohort_dir)
    runs = _cifti_runs(cohort_dir)
    site_of = {r["subject"]: r["site"] for r in runs}
    family = {s: s for s in site_of}
    tsv = cohort_dir / "participants.tsv"
    if tsv.is_file():
        df = pd.read_csv(tsv, sep="\t", dtype={"subject": str, "family_id": str})
        if "family_id" in df:
            family.update({s: f for s, f in zip(df["subject"], df["family_id"]) if s in family})
    sites = sorted(set(site_of.values()), key=lambda s: (-list(site_of.values()).count(s), s))
    home = sorted({family[s] for s, site in site_of.items() if site == sites[0]})
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_frac * len(home))))
    val_families = set(rng.permutation(home)[:n_val].tolist())
    return {s: ("val_ood" if site_of[s] != sites[0] else "val" if family[s] in val_families else "train")
            for s in site_of}


def cohort_shards(cohort_dir: str | os.PathLike, out: str | os.PathLike | None = None, val_frac: float = 0.25,
                  seed: int = 0, progress: bool = False) -> dict[str, str]:
    """Flat-map shards of a simulated cohort (``fmri_bench.synth``), split for pretraining by
    ``pretraining_split`` (family-grouped train / val on the main site, val_ood the others).

    Each split is flattened (``fmri_bench.convert.flatten``) into ``out/<split>`` once and reused
    while the cohort is the same one (``cohort_fingerprint``); a regenerated cohort is flattened
    again (default ``out``: ``paths.data_dir() / "pretrain_shards" / <cohort directory name>``).
    -> {"train": dir, "val": dir, "val_ood": dir}, ready for ``data.train_urls`` etc.
    """
    from fmri_bench.convert import flatten
    from fmri_bench.paths import data_dir

    cohort_dir = Path(cohort_dir)
    out = Path(out) if out is not None else data_dir() / "pretrain_shards" / cohort_dir.name
    split_of = pretraining_split(cohort_dir, val_frac, seed)
    runs = _cifti_runs(cohort_dir)
    stamp = cohort_fingerprint(cohort_dir)
    dirs = {}
    for split in ("train", "val", "val_ood"):
        inputs = [str(cohort_dir / r["path"]) for r in runs if split_of[r["subject"]] == split]
        dirs[split] = str(out / split)
        done = out / split / "inputs.json"
        record = {"cohort": stamp, "inputs": inputs}
        if done.exists() and json.loads(done.read_text()) == record:
            continue
        if not inputs:
            raise InputError(f"no subjects for the {split} split (the cohort has sites "
                             f"{sorted({r['site'] for r in runs})})", cohort_dir)
        summary = flatten(inputs, out / split, progress=progress, shard_size=8, overwrite=True)
        if summary.failed:
            raise InputError(f"{len(summary.failed)} runs failed to flatten for {split}", out / split)
        atomic_save(lambda tmp: tmp.write_text(json.dumps(record)), done)
    return dirs


def pretraining_subjects(checkpoint: str | os.PathLike) -> frozenset[str] | None:
    """The subjects an MAE checkpoint was pretrained on, from the ``config.yaml`` of its run
    directory (``data.train_urls``, whose shards' meta name the subjects); None when that is not
    known (no run config beside the checkpoint, synthetic-stream pretraining, shards moved)."""
    import yaml

    cfg_path = Path(checkpoint).parent / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        urls = (cfg.get("data") or {}).get("train_urls") or []
    except (yaml.YAMLError, AttributeError):
        return None
    if not urls:
        return None
    try:
        return frozenset(r.subject for r in scan_runs(urls))
    except InputError:
        return None
