"""Result records: mean and CI, JSON round trip, markdown table, paper numbers labelled."""

import math

import numpy as np
import pytest
from scipy import stats

from fmri_bench.results import (
    Record, mean_ci, paper_records_task21, read_results, summarize, table_rows, to_markdown, write_results,
)


def test_mean_ci_t_interval():
    v = [0.8, 0.9, 1.0]
    m, lo, hi = mean_ci(v)
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3)
    assert m == pytest.approx(0.9) and hi - m == pytest.approx(half) and m - lo == pytest.approx(half)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_roundtrip_and_markdown(tmp_path):
    recs = [summarize("state21", "MAE cls", [0.9, 0.92, 0.94], chance=1 / 21, truth=0.98)]
    recs += paper_records_task21()
    path = write_results(recs, tmp_path / "res.json")
    back = read_results(path)
    assert back[0].values == [0.9, 0.92, 0.94] and back[0].truth == 0.98
    assert back[1].source == "paper" and math.isnan(back[1].ci_low)
    md = to_markdown(back)
    assert "| state21 | MAE cls | synthetic | accuracy | 92 | [87.0, 97.0] | 3 | 4.8 | 98 |" in md
    assert "| state21 | CortexMAE flat map | paper | accuracy | 99 |  | 0 | 16.9 |" in md
    with pytest.raises(ValueError):
        Record("t", "m", 0.5, 0.4, 0.6, 3, source="guess")


def test_nan_values_are_left_out_and_written_as_null(tmp_path):
    rec = summarize("t", "m", [0.5, math.nan, 0.7])
    assert rec.mean == pytest.approx(0.6) and rec.n == 3 and math.isnan(rec.values[1])
    empty = summarize("t", "m2", [math.nan])
    path = write_results([rec, empty], tmp_path / "r.json")
    assert "NaN" not in path.read_text()  # JSON has no NaN: null
    back = read_results(path)
    assert back[0].values[1] is None and math.isnan(back[1].mean) and back[0].mean == pytest.approx(0.6)
    row = table_rows([empty])[0]
    assert row["mean %"] is None and row["95% CI"] == ""


def test_summarize_cuts_the_interval_to_fractions():
    wide = summarize("state21", "m", [0.6667, 1.0])  # a t interval over two splits: about [-1.3, 3.0]
    m, lo, hi = mean_ci([0.6667, 1.0])
    assert lo < 0 and hi > 1
    assert (wide.ci_low, wide.ci_high) == (0.0, 1.0) and wide.mean == pytest.approx(m)
    assert math.isnan(summarize("t", "m", [math.nan]).ci_low)
