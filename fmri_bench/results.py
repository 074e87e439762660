"""Benchmark result records: numbers with their uncertainty, their chance and their source.

In: per-seed or per-split scores of one method on one task. Out: a ``Record`` (mean, 95 % CI,
chance level, synthetic ground-truth ceiling where one exists, and whether the number was
measured here, ``synthetic``, or quoted from a paper, ``paper``), a results JSON, and a
markdown table for the book chapters.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from fmri_bench.paths import atomic_save

SOURCES = ("synthetic", "real", "paper")


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of ``values`` -> (mean, low, high).

    Re-splits of one cohort share subjects, so this interval is optimistic about
    generalisation to new cohorts; it describes split-to-split variation only.
    One value gives a zero-width interval.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) == 1:
        return m, m, m
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


@dataclass
class Record:
    """One row of a benchmark table. Scores are fractions in [0, 1] (accuracy-like)."""

    task: str
    method: str
    mean: float
    ci_low: float
    ci_high: float
    n: int
    metric: str = "accuracy"
    source: str = "synthetic"
    chance: float | None = None
    ceiling: float | None = None
    values: list[float] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")


def summarize(task: str, method: str, values, metric: str = "accuracy", source: str = "synthetic",
              chance: float | None = None, ceiling: float | None = None, notes: str = "") -> Record:
    """Record from per-seed / per-split scores (mean and 95 % CI over them). Scores are
    fractions, so the interval is cut to [0, 1] (a t interval over 2-3 splits can leave it)."""
    values = [float(v) for v in np.atleast_1d(values)]
    m, lo, hi = mean_ci(values)
    lo, hi = max(lo, 0.0), min(hi, 1.0)  # NaN (no finite value) stays NaN
    return Record(task, method, m, lo, hi, len(values), metric, source, chance, ceiling, values, notes)


def paper_record(task: str, method: str, value: float, metric: str = "accuracy",
                 chance: float | None = None, notes: str = "") -> Record:
    """A number quoted from a paper (no CI available): labelled ``source='paper'``."""
    return Record(task, method, value, math.nan, math.nan, 0, metric, "paper", chance, None, [], notes)


# CortexMAE / Brainmarks frozen test accuracy, HCP 21-class task state (PAPERS.md section 1).
PAPER_HCP_TASK21 = {
    "CortexMAE flat map": 0.990, "CortexMAE parcel": 0.977, "parcel MLP baseline": 0.943,
    "FC linear baseline": 0.824, "chance": 0.169,
}


def paper_records_task21() -> list[Record]:
    return [paper_record("state21", m, v, chance=PAPER_HCP_TASK21["chance"],
                         notes="HCP real data, CortexMAE/Brainmarks analysis")
            for m, v in PAPER_HCP_TASK21.items() if m != "chance"]


def write_results(records: list[Record], path) -> Path:
    text = json.dumps([_clean(asdict(r)) for r in records], indent=1)
    return atomic_save(lambda tmp: tmp.write_text(text), path)


def read_results(path) -> list[Record]:
    rows = json.loads(Path(path).read_text())
    return [Record(**{k: (math.nan if v is None and k in ("mean", "ci_low", "ci_high") else v)
                      for k, v in row.items()}) for row in rows]


def _clean(d: dict) -> dict:
    # JSON has no NaN: write null
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _pct(x) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def to_markdown(records: list[Record]) -> str:
    """Markdown table, one row per record; scores in percent, CI in brackets."""
    lines = ["| task | method | source | metric | mean | 95% CI | n | chance | ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ci = f"[{_pct(r.ci_low)}, {_pct(r.ci_high)}]" if r.n > 1 else ""
        lines.append(f"| {r.task} | {r.method} | {r.source} | {r.metric} | {_pct(r.mean)} | {ci} | "
                     f"{r.n or ''} | {_pct(r.chance)} | {_pct(r.ceiling)} |")
    return "\n".join(lines)
