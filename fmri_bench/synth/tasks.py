"""HCP-like task paradigms: block timings, events, HRF-convolved regressors, the class map.

In: a paradigm name, how many blocks per condition, a TR and a ``np.random.Generator``.
Out: an events table (onset, duration, trial_type in seconds, BIDS style; trial_type = the HCP
EV name), the run length, and the ``(T, C)`` regressors convolved with nilearn's SPM HRF.
Timings follow the HCP task protocols (Barch et al. 2013): e.g. motor 3 s cue + 12 s movement,
working memory 2.5 s cue + 25 s block, relational 16 s, emotion 18 s, social 23 s clips.
The 21 state classes come from the committed ``fmri_bench/data/hcp_task_classes.json``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fmri_bench.paths import package_data


@dataclass(frozen=True)
class Paradigm:
    """One HCP task: its block conditions, block length, the cue before each block, fixation."""

    name: str
    conditions: tuple[str, ...]
    block_s: float
    cue_s: float = 0.0
    fixation_s: float = 15.0
    fixation_every: int = 2  # a fixation block after every n task blocks
    block_group: int = 1  # conditions that share one "slot" (WM: a block is one load x category)


PARADIGMS: dict[str, Paradigm] = {p.name: p for p in (
    Paradigm("EMOTION", ("fear", "neut"), 18.0, cue_s=3.0, fixation_s=8.0, fixation_every=6),
    Paradigm("GAMBLING", ("win", "loss"), 28.0, fixation_s=15.0, fixation_every=1),
    Paradigm("LANGUAGE", ("story", "math"), 30.0, fixation_s=4.0, fixation_every=8),
    Paradigm("MOTOR", ("lf", "lh", "rf", "rh", "t"), 12.0, cue_s=3.0, fixation_s=15.0, fixation_every=3),
    Paradigm("RELATIONAL", ("relation", "match"), 16.0, fixation_s=16.0, fixation_every=2),
    Paradigm("SOCIAL", ("mental", "rnd"), 23.0, fixation_s=15.0, fixation_every=1),
    Paradigm("WM", ("0bk_body", "0bk_faces", "0bk_places", "0bk_tools",
                    "2bk_body", "2bk_faces", "2bk_places", "2bk_tools"), 25.0, cue_s=2.5,
             fixation_s=15.0, fixation_every=2, block_group=2),
)}


@functools.lru_cache(maxsize=1)
def class_map() -> dict:
    """The committed class map: {"classes": [{index, paradigm, condition, name}], ...}."""
    return json.loads(package_data("hcp_task_classes.json").read_text())


def class_index(paradigm: str, condition: str) -> int | None:
    """Class of an HCP EV (paradigm, condition), None where the condition is not a class."""
    for c in class_map()["classes"]:
        if c["paradigm"] == paradigm and c["condition"] == condition:
            return int(c["index"])
    return None


def all_conditions() -> tuple[tuple[str, str], ...]:
    """Every simulated (paradigm, condition), in a fixed order (maps and gains use it)."""
    return tuple((p.name, c) for p in PARADIGMS.values() for c in p.conditions)


def make_events(paradigm: str, reps: int, rng: np.random.Generator,
                lead_s: float = 6.0, tail_s: float = 10.0) -> tuple[pd.DataFrame, float]:
    """Block design of one run -> (events, run duration in s).

    reps: blocks per condition (WM: per stimulus category, the load alternating 0/2-back, so
    reps=2 gives the HCP run of 8 blocks). Block order is shuffled by ``rng``; the cue (if any)
    is an event of its own (trial_type "cue"), as in the HCP EVs.
    """
    p = PARADIGMS[paradigm]
    if paradigm == "WM":
        # each category alternates its load across reps, so reps=2 covers all 8 EVs once
        cats = ("body", "faces", "places", "tools")
        shift = int(rng.integers(2))
        blocks = [f"{('0bk', '2bk')[(r + c + shift) % 2]}_{cats[c]}"
                  for r in range(reps) for c in rng.permutation(len(cats))]
    else:
        blocks = [c for _ in range(reps) for c in rng.permutation(p.conditions).tolist()]
    rows, t = [], lead_s
    for i, cond in enumerate(blocks):
        if p.cue_s:
            rows.append((t, p.cue_s, "cue"))
            t += p.cue_s
        rows.append((t, p.block_s, cond))
        t += p.block_s
        if (i + 1) % p.fixation_every == 0 and i + 1 < len(blocks):
            t += p.fixation_s
    ev = pd.DataFrame(rows, columns=["onset", "duration", "trial_type"])
    return ev, t + tail_s


def regressors(events: pd.DataFrame, conditions: list[str], n_t: int, tr: float) -> np.ndarray:
    """HRF-convolved (SPM HRF, nilearn) block regressors -> (n_t, len(conditions)) float32.

    Frame times are the centres of acquisition (HCP convention t = i * tr).
    """
    from nilearn.glm.first_level import compute_regressor

    frame_times = np.arange(n_t) * tr
    out = np.zeros((n_t, len(conditions)), np.float32)
    for j, cond in enumerate(conditions):
        ev = events[events.trial_type == cond]
        if len(ev):
            cond_info = np.vstack([ev.onset.to_numpy(), ev.duration.to_numpy(), np.ones(len(ev))])
            reg, _ = compute_regressor(cond_info, "spm", frame_times, oversampling=16)
            out[:, j] = reg[:, 0]
    return out
