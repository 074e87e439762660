"""Benchmark result records: numbers with their uncertainty, their chance and their source.

In: per-seed or per-split scores of one method on one task. Out: a ``Record`` (mean, 95 % CI,
chance level, the score of the known truth where the synthetic cohort has one, and whether the number was
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


def bootstrap_ci(values, statistic=None, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap interval of ``statistic`` -> (estimate, low, high).

    values: (N,) or (N, m); rows are resampled with replacement, together (a paired bootstrap
    when the m columns belong to the same unit, e.g. one clip's loss under m predictors).
    statistic: rows (N, ...) -> float; default the mean. Seeded (``np.random.default_rng(seed)``).
    Fewer than two rows or ``n_boot=0``: the interval is NaN (unknown, not zero-width).
    """
    v = np.asarray(values, dtype=float)
    stat = statistic or (lambda rows: float(np.mean(rows)))
    est = float(stat(v))
    if len(v) < 2 or n_boot <= 0:
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.array([stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n_boot)], dtype=float)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return est, math.nan, math.nan
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return est, float(lo), float(hi)


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
    truth: float | None = None  # the same question answered from the generating truth (synthetic
    # cohort): a reference beside the scores, not an upper bound
    values: list[float] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")


def summarize(task: str, method: str, values, metric: str = "accuracy", source: str = "synthetic",
              chance: float | None = None, truth: float | None = None, notes: str = "") -> Record:
    """Record from per-seed / per-split scores (mean and 95 % CI over them). Scores are
    fractions, so the interval is cut to [0, 1] (a t interval over 2-3 splits can leave it)."""
    values = [float(v) for v in np.atleast_1d(values)]
    m, lo, hi = mean_ci(values)
    lo, hi = max(lo, 0.0), min(hi, 1.0)  # NaN (no finite value) stays NaN
    return Record(task, method, m, lo, hi, len(values), metric, source, chance, truth, values, notes)


def paper_record(task: str, method: str, value: float, metric: str = "accuracy",
                 chance: float | None = None, notes: str = "") -> Record:
    """A number quoted from a paper (no CI available): labelled ``source='paper'``."""
    return Record(task, method, value, math.nan, math.nan, 0, metric, "paper", chance, None, [], notes)


# CortexMAE / Brainmarks frozen test accuracy, HCP 21-class task state (the CortexMAE / Brainmarks
# analysis of the flat-map line, not arXiv 2510.13768 itself).
PAPER_HCP_TASK21 = {
    "CortexMAE flat map": 0.990, "CortexMAE parcel": 0.977, "parcel MLP baseline": 0.943,
    "FC linear baseline": 0.824, "chance": 0.169,
}


def paper_records_task21() -> list[Record]:
    return [paper_record("state21", m, v, chance=PAPER_HCP_TASK21["chance"],
                         notes="HCP real data, CortexMAE/Brainmarks analysis")
            for m, v in PAPER_HCP_TASK21.items() if m != "chance"]


def write_results(records: list[Record], path) -> Path:
    text = json.dumps([_clean(asdict(r)) for r in records], indent=1, allow_nan=False)
    return atomic_save(lambda tmp: tmp.write_text(text), path)


def read_results(path) -> list[Record]:
    rows = json.loads(Path(path).read_text())
    return [Record(**{("truth" if k == "ceiling" else k):  # files written before the rename
                      (math.nan if v is None and k in ("mean", "ci_low", "ci_high") else v)
                      for k, v in row.items()}) for row in rows]


def _clean(v):
    """JSON has no NaN: null, also inside lists."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _pct(x):
    return None if x is None or not math.isfinite(x) else round(100 * x, 1)


def table_rows(records: list[Record]) -> list[dict]:
    """Records -> the one table format of the book and the CLI: flat rows, scores in percent
    (one decimal), the CI cut to [0, 100] (a t interval over few splits can leave it)."""
    def ci(r):
        return f"[{_pct(max(r.ci_low, 0.0))}, {_pct(min(r.ci_high, 1.0))}]" if r.n > 1 else ""

    return [{"task": r.task, "method": r.method, "source": r.source, "metric": r.metric,
             "mean %": _pct(r.mean), "95% CI": ci(r), "n": r.n, "chance %": _pct(r.chance),
             "truth %": _pct(r.truth), "notes": r.notes} for r in records]


def _cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    """rows (dicts) -> a GitHub-flavoured markdown table; floats to 4 significant digits."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell_text(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(records: list[Record]) -> str:
    """Records as a markdown table (``markdown_table`` of ``table_rows``)."""
    return markdown_table(table_rows(records))
