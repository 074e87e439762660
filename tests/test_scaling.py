"""Scaling-law fits recover planted constants; sizes; the plot labels the paper's fits."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fmri_bench.errors import InputError
from fmri_bench.scaling import (
    PAPER_FITS, fit_offset, fit_paper, geometric_sizes, paper_fit, paper_points, plot_scaling,
)


def test_paper_form_recovers_constants(rng):
    # the paper's HCP constants, 12 sizes, 0.1 % multiplicative noise
    a, b = 15.0, -0.014
    n = geometric_sizes(1e5, 1e8, 12)
    loss = (n / a) ** b * np.exp(rng.normal(scale=1e-3, size=len(n)))
    fit = fit_paper(n, loss, n_boot=500, seed=1)
    assert fit.params["b"] == pytest.approx(b, abs=1.5e-3)
    assert fit.ci["b"][0] <= b <= fit.ci["b"][1]
    assert fit.ci["a"][0] <= a <= fit.ci["a"][1]
    assert fit.r2 > 0.9
    np.testing.assert_allclose(fit.predict(n), (n / fit.params["a"]) ** fit.params["b"])


def test_paper_form_exact_on_clean_points():
    n = np.array([1e5, 1e6, 1e7])
    fit = fit_paper(n, (n / 7.0) ** -0.017, n_boot=0)
    assert fit.params["a"] == pytest.approx(7.0, rel=1e-6)
    assert fit.params["b"] == pytest.approx(-0.017, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_paper_on_a_flat_sweep_stays_finite():
    # a sweep where data size does not matter: b ~ 0 sends a to 0 or inf, the fit stays usable
    n = np.array([100.0, 1000.0, 10000.0] * 2)
    loss = np.array([0.81, 0.79, 0.81, 0.80, 0.80, 0.80])  # symmetric in log N: slope ~1e-17
    fit = fit_paper(n, loss, n_boot=50, seed=0)
    assert abs(fit.exponent) < 0.01
    pred = fit.predict(n)
    assert np.all(np.isfinite(pred)) and np.allclose(pred, loss.mean(), rtol=0.02)
    assert np.isfinite(fit.r2) and fit.r2 <= 1
    assert fit.label().startswith("L = 0.80") and "inf" not in fit.label()


def test_offset_form_recovers_constants(rng):
    l_inf, n_c, alpha = 0.5, 1e3, 0.3
    n = geometric_sizes(1e4, 1e8, 10)
    loss = (l_inf + (n / n_c) ** -alpha) * np.exp(rng.normal(scale=2e-3, size=len(n)))
    fit = fit_offset(n, loss, n_boot=60, seed=2)
    assert fit.params["alpha"] == pytest.approx(alpha, rel=0.15)
    assert fit.params["L_inf"] == pytest.approx(l_inf, abs=0.02)
    for k, truth in (("alpha", alpha), ("L_inf", l_inf)):
        assert fit.ci[k][0] <= truth <= fit.ci[k][1]
    assert fit.r2 > 0.99
    assert fit.exponent == -fit.params["alpha"]


def test_paper_numbers_are_consistent():
    # the paper's fitted HCP curve passes near its own table (within 1 %)
    n, loss = paper_points("HCP val")
    np.testing.assert_allclose(paper_fit("HCP val").predict(n), loss, rtol=0.01)
    assert paper_fit("NSD val").source == "paper" and PAPER_FITS["NSD val"]["b"] == -0.017


def test_geometric_sizes():
    s = geometric_sizes(10, 1000, 3)
    assert s.tolist() == [10, 100, 1000]
    assert geometric_sizes(1, 3, 10).tolist() == [1, 2, 3]  # deduplicated
    with pytest.raises(InputError):
        geometric_sizes(0, 10, 3)


def test_bad_points():
    with pytest.raises(InputError, match="distinct"):
        fit_offset([1, 2, 3], [1, 0.9, 0.8])
    with pytest.raises(InputError, match="positive"):
        fit_paper([1, 2], [1, -1])


def test_plot_labels_paper(rng):
    n = geometric_sizes(1e4, 1e6, 5)
    loss = (n / 15) ** -0.02
    fits = [fit_paper(n, loss, n_boot=20, name="ours")]
    ax = plot_scaling({"synthetic": (n, loss)}, fits, paper_lines=True)
    text = "\n".join(t.get_text() for t in ax.texts)
    assert "paper v2" in text and "-0.014" in text and "-0.020" in text
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(lbl.startswith("paper v2 HCP val") for lbl in labels)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
