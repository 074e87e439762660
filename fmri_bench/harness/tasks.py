"""Tasks: the clips each benchmark question reads, its labels, and its subject-disjoint splits.

In: a ``Dataset`` (``harness.datasets``). Out: ``Clips`` (one row per clip: run, start, label or
trait value, subject, family, brain state) and the splits over them. A task is one entry of
``TASKS`` (name -> kind); a new question (for example the language model's zero- and few-shot
questions) is added there and in ``task_clips``.

- ``state21`` (kind "state"): event-locked 16 s clips of task runs, one per event of a class in
  ``fmri_bench/data/hcp_task_classes.json`` (only the classes present are used, renumbered, so the
  smoke cohort, MOTOR only, has 5). Flat-map MAE paper (arXiv 2510.13768), "HCP 21-class task
  state decoding on event-locked 16 s clips with subject-disjoint, family-grouped splits".
- ``sex``, ``age`` (quartiles), ``fluid_iq`` (tertiles) (kind "trait"): consecutive 16 s clips
  of rest and task runs, each with its subject's value (Brainmarks trait benchmarks: traits
  across brain states).
- ``identify`` (kind "identify"): consecutive clips of the first two rest sessions of every
  subject who has two (connectome fingerprinting, Finn et al. 2015).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fmri_bench.clips import event_starts, sequential_starts
from fmri_bench.errors import InputError
from fmri_bench.paths import package_data
from fmri_bench.harness.datasets import Dataset, RunInfo
from fmri_bench.splits import check_disjoint, resplits

TASKS = {"state21": "state", "sex": "trait", "age": "trait", "fluid_iq": "trait", "identify": "identify"}
TRAITS = {"sex": None, "age": 4, "fluid_iq": 3}  # quantile classes (None: categorical)
CLIP_LEN = 16


@dataclass
class Clips:
    """The clips of one task, in a fixed order. All arrays (N,)."""

    task: str
    run_keys: np.ndarray
    starts: np.ndarray
    labels: np.ndarray  # int class, -1 where the task has none (traits use ``values``)
    subjects: np.ndarray
    families: np.ndarray
    states: np.ndarray  # "rest" | "task"
    sessions: np.ndarray
    values: np.ndarray  # float trait value per clip (NaN when not a trait task)
    class_names: list[str] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)  # index in hcp_task_classes.json
    clip_len: int = CLIP_LEN

    def __len__(self) -> int:
        return len(self.run_keys)

    @property
    def ids(self) -> np.ndarray:
        return np.asarray([f"{k}@{s}" for k, s in zip(self.run_keys, self.starts)])

    def subset(self, keep: np.ndarray) -> "Clips":
        """The clips where ``keep`` (N,) bool is True, in the same order."""
        keep = np.asarray(keep, bool)
        arrays = {f: getattr(self, f)[keep] for f in ("run_keys", "starts", "labels", "subjects", "families",
                                                       "states", "sessions", "values")}
        return Clips(self.task, **arrays, class_names=self.class_names, class_ids=self.class_ids,
                     clip_len=self.clip_len)


def class_map() -> dict[tuple[str, str], tuple[int, str]]:
    """(PARADIGM, condition) -> (class index, class name), from hcp_task_classes.json."""
    d = json.loads(package_data("hcp_task_classes.json").read_text())
    return {(c["paradigm"].upper(), c["condition"]): (int(c["index"]), c["name"]) for c in d["classes"]}


def _families(subjects, participants: pd.DataFrame | None) -> np.ndarray:
    if participants is None or "family_id" not in participants:
        return np.asarray(subjects)
    from fmri_bench.splits import families_for

    return families_for(subjects, participants)


def _windows(run: RunInfo, clip_len: int) -> range:
    return sequential_starts(run.n_frames, clip_len)


def _state_rows(data: Dataset, clip_len: int, hrf_delay: float):
    """One clip per event of a class (at its onset); labels renumbered over the classes present."""
    if not any(r.kind == "task" for r in data.runs):
        raise InputError("state21 needs task runs with events; the data hold none", data.root)
    cmap = class_map()
    rows, found = [], {}
    for r in data.runs:
        if r.kind != "task":
            continue
        for start, ev in event_starts(r.events, r.n_frames, clip_len, r.tr, hrf_delay):
            hit = cmap.get((r.paradigm or "", str(ev.get("trial_type"))))
            if hit:
                found[hit[0]] = hit[1]
                rows.append((r.key, start, hit[0], r.subject, "task", r.session, math.nan))
    if len(found) < 2:
        raise InputError(f"state21 needs at least 2 task-state classes with full {clip_len}-frame "
                         f"clips; the data hold {len(found)} ({sorted(found.values())})", data.root)
    ids = sorted(found)
    relabel = {c: i for i, c in enumerate(ids)}
    return [(k, s, relabel[c], *rest) for k, s, c, *rest in rows], [found[i] for i in ids], ids


def _trait_rows(task: str, data: Dataset, clip_len: int):
    """Consecutive clips of every rest and task run, each with its subject's trait value."""
    if data.participants is None or task not in data.participants:
        raise InputError(f"trait {task!r} needs a participants.tsv with a {task!r} column", data.root)
    states = {r.kind for r in data.runs}
    if not {"rest", "task"} <= states:
        raise InputError(f"{task} across brain states needs rest and task runs; the data hold "
                         f"only {sorted(states - {'unknown'}) or 'unlabelled'} runs", data.root)
    value = dict(zip(data.participants["subject"].astype(str), data.participants[task]))
    rows = []
    for r in data.runs:
        if r.kind in ("rest", "task") and r.subject in value:
            v = float(value[r.subject] == "M") if task == "sex" else float(value[r.subject])
            rows += [(r.key, s, -1, r.subject, r.kind, r.session, v) for s in _windows(r, clip_len)]
    if task == "sex" and len({x[-1] for x in rows}) < 2:
        raise InputError("sex decoding needs both sexes in the data", data.root)
    return rows


def _identify_rows(data: Dataset, clip_len: int):
    """Consecutive clips of the first two rest sessions of every subject who has two."""
    sessions = defaultdict(set)
    for r in data.runs:
        if r.kind == "rest" and list(_windows(r, clip_len)):
            sessions[r.subject].add(r.session)
    both = {s: sorted(ses)[:2] for s, ses in sessions.items() if len(ses) >= 2}
    if len(both) < 2:
        raise InputError(f"identify needs at least 2 subjects with two rest sessions "
                         f"(REST1 and REST2); found {len(both)}", data.root)
    return [(r.key, s, -1, r.subject, "rest", r.session, math.nan) for r in data.runs
            if r.kind == "rest" and r.session in both.get(r.subject, ()) for s in _windows(r, clip_len)]


def task_clips(task: str, data: Dataset, clip_len: int = CLIP_LEN, hrf_delay: float = 0.0) -> Clips:
    """The clips a task reads; InputError when the data cannot support the task.

    hrf_delay (s) shifts the state21 clips after the event onset (upstream: 0).
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    names: list[str] = []
    ids: list[int] = []
    kind = TASKS[task]
    if kind == "state":
        rows, names, ids = _state_rows(data, clip_len, hrf_delay)
    elif kind == "trait":
        rows = _trait_rows(task, data, clip_len)
    else:
        rows = _identify_rows(data, clip_len)
    if not rows:
        raise InputError(f"no {clip_len}-frame clips for task {task!r} in the data", data.root)
    keys, starts, labels, subjects, states, sessions, values = map(np.asarray, zip(*rows))
    subjects = subjects.astype(str)
    return Clips(task, keys.astype(str), starts.astype(np.int64), labels.astype(np.int64), subjects,
                 _families(subjects, data.participants), states.astype(str), sessions.astype(str),
                 values.astype(float), names, ids, clip_len)


def splits_for(clips: Clips, n_splits: int, seed: int = 0, exclude=None):
    """Subject-disjoint, family-grouped re-splits of the clips (checked). exclude: subjects (an
    encoder's pretraining subjects) that, with their families, only ever train the probe."""
    try:
        out = resplits(clips.subjects, clips.families, n_splits=n_splits, seed=seed, exclude=exclude)
    except InputError as err:
        raise InputError(f"task {clips.task}: {err.problem}") from None
    for s in out:
        check_disjoint(s, clips.subjects, clips.families, exclude=exclude)
    return out


def trait_folds(clips: Clips, test_frac: float = 0.2) -> int:
    """Grouped CV folds for the trait logistic: up to 5, fewer when the families run short."""
    n_fam = len(np.unique(clips.families))
    n_test = max(1, int(round(test_frac * n_fam)))
    folds = min(5, n_fam - n_test)
    if folds < 2:
        raise InputError(f"task {clips.task}: too few families for subject-disjoint trait decoding: "
                         f"need at least {n_test + 2}, found {n_fam} from {len(np.unique(clips.subjects))} subjects")
    return folds


