"""Preprocessing: z-score, TR resampling (exactness, anti-alias, frame count), per-frame
normalisation, and preprocess_run's order and refusals (with a tiny mapper and the real one)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fmri_bench.errors import InputError
from fmri_bench.io import Run
from fmri_bench.preprocess import (
    antialias, antialias_gain, n_frames_out, normalize_frames, preprocess_run, resample_tr,
    zscore_resample, zscore_time,
)


class TinyMapper:
    """The FlatMapper contract on 6 vertices -> 4 pixels; records what it was given."""

    space = "tiny"
    n_vertices = 6

    def __init__(self, scale: float = 1.0):
        w = np.array([[1, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0], [0, 0, 0.2, 0.3, 0.5, 0], [0, 0, 0, 0, 0, 1]])
        self.operator = sp.csr_matrix(w * scale, dtype=np.float32)
        self.n_pixels = 4
        self.calls = []

    def to_pixels(self, x):
        x = np.atleast_2d(x)
        self.calls.append(x.copy())
        return np.asarray((self.operator @ x.T).T, dtype=np.float32)


def _run(data, tr=2.0, is_map=False, space="tiny"):
    return Run(np.asarray(data, np.float32), space, tr, "sub-01_run.dtseries.nii", is_map=is_map)


def test_zscore_time(rng):
    x = rng.standard_normal((50, 4)) * [1, 10, 0.1, 0] + [0, 5, -3, 7]
    z = zscore_time(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :3].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z[:, :3].std(0), 1, atol=1e-5)
    assert (z[:, 3] == 0).all()  # a constant vertex becomes 0


@pytest.mark.parametrize(
    "T,tr_in,tr_out,expect",
    [(100, 0.72, 1.0, 72), (1200, 0.72, 1.0, 864), (10, 2.0, 1.0, 19), (11, 0.5, 1.0, 6), (5, 1.0, 1.0, 5)],
)
def test_frame_count(T, tr_in, tr_out, expect, rng):
    assert n_frames_out(T, tr_in, tr_out) == expect == int(np.floor((T - 1) * tr_in / tr_out + 1e-9)) + 1
    assert resample_tr(rng.standard_normal((T, 3)), tr_in, tr_out).shape == (expect, 3)


@pytest.mark.parametrize("tr_in,tol", [(0.72, 1e-3), (2.0, 6e-3)])
def test_resample_slow_sinusoid_exact(tr_in, tol):
    """A 0.02 Hz sinusoid survives resampling to 1 s to within PCHIP's error (which grows with
    the input step: its slopes are shape-preserving, not cubic-exact), and input samples that
    fall on output times come back unchanged."""
    f = 0.02
    t = np.arange(400) * tr_in
    x = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t + 0.3)], 1)
    y = resample_tr(x, tr_in, 1.0)
    t_out = np.arange(len(y)) * 1.0
    ref = np.stack([np.sin(2 * np.pi * f * t_out), np.cos(2 * np.pi * f * t_out + 0.3)], 1)
    assert np.abs(y - ref).max() < tol
    if tr_in == 2.0:  # upsampling: every other output frame is an input frame
        np.testing.assert_allclose(y[::2], x.astype(np.float32), atol=1e-6)
    np.testing.assert_array_equal(resample_tr(x, tr_in, tr_in), x.astype(np.float32))


@pytest.mark.parametrize("tr_in,tr_out", [(2.0, 1.0), (0.72, 0.5), (1.0, 0.3)])
def test_resample_is_scipy_pchip(rng, tr_in, tr_out):
    """Upsampling (no filter): the same numbers as scipy's PchipInterpolator, incl. flat runs,
    monotone ramps and a constant vertex."""
    from scipy.interpolate import PchipInterpolator

    x = rng.standard_normal((50, 40)).astype(np.float32)
    x[:, 0] = np.linspace(0, 1, 50)
    x[:, 1] = 3.0
    x[10:20, 2] = 0.5
    y = resample_tr(x, tr_in, tr_out)
    t_out = np.arange(len(y)) * tr_out
    ref = PchipInterpolator(np.arange(50) * tr_in, x.astype(np.float64), axis=0)(t_out)
    np.testing.assert_allclose(y, ref, atol=2e-6)


def test_antialias_attenuates_above_new_nyquist():
    tr_in, tr_out = 0.25, 1.0  # Nyquist 2 Hz -> 0.5 Hz
    t = np.arange(800) * tr_in
    fast = np.sin(2 * np.pi * 0.8 * t)[:, None]  # 0.8 Hz: would alias to 0.2 Hz at 1 s
    y = resample_tr(fast, tr_in, tr_out)
    naive = fast[:: int(tr_out / tr_in)]
    assert naive.std() > 0.5  # plain decimation keeps the full alias
    assert y[10:-10].std() < 0.01  # interior: filtered out (< -40 dB)
    slow = np.sin(2 * np.pi * 0.1 * t)[:, None]  # passband, 0.1 Hz
    ys = resample_tr(slow, tr_in, tr_out)
    assert np.abs(ys - np.sin(2 * np.pi * 0.1 * np.arange(len(ys)))[:, None])[10:-10].max() < 1e-2


def _dst_antialias(x, tr_in, tr_out):
    """The exact filter ``antialias`` approximates: the line through the end frames set aside,
    the rest low-passed in the DST-I domain, the line added back (float64)."""
    from scipy import fft

    x = np.asarray(x, np.float64)
    line = x[:1] + np.linspace(0.0, 1.0, len(x))[:, None] * (x[-1:] - x[:1])
    r = fft.dst((x - line)[1:-1], type=1, axis=0) * antialias_gain(len(x) - 2, tr_in, tr_out)[:, None]
    out = line.copy()
    out[1:-1] += fft.idst(r, type=1, axis=0)
    return out


@pytest.mark.parametrize("T", [3, 4, 5, 7, 10, 299, 300])
@pytest.mark.parametrize("tr_in,tr_out", [(0.72, 1.0), (0.25, 1.0), (0.5, 0.8)])
def test_antialias_banded_operator_matches_dst_filter(rng, T, tr_in, tr_out):
    """The cached banded operator (far diagonals dropped) gives the DST filter's numbers."""
    x = rng.standard_normal((T, 16)) + np.linspace(0, 3, T)[:, None] + 10.0
    np.testing.assert_allclose(antialias(x, tr_in, tr_out), _dst_antialias(x, tr_in, tr_out), atol=1e-3)


@pytest.mark.parametrize("T,tr_in,tr_out", [(300, 0.72, 1.0), (7, 0.5, 1.3), (40, 2.0, 1.0), (30, 1.0, 1.0)])
def test_zscore_resample_is_zscore_then_resample(rng, T, tr_in, tr_out):
    """Fused (resampled, then divided by the std of the original frames) = z-score, then
    resample: the filter is linear and PCHIP commutes with a positive scale. Raw BOLD levels,
    a constant vertex, either memory order."""
    x = (1e4 + 100 * np.cumsum(rng.standard_normal((T, 600)), axis=0)).astype(np.float32)
    x[:, 3] = 5.0
    expect = resample_tr(zscore_time(x), tr_in, tr_out)
    for data in (x, np.asfortranarray(x)):
        got = zscore_resample(data, tr_in, tr_out)
        assert got.shape == expect.shape == (n_frames_out(T, tr_in, tr_out), 600)
        np.testing.assert_allclose(got, expect, atol=2e-5)
        assert (got[:, 3] == 0).all()


def test_normalize_frames(rng):
    x = rng.standard_normal((3, 2, 500)) * 4 + 2
    x[0, 0, 0] = 100.0
    y = normalize_frames(x, clip=3.0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.max() == 3.0 and y[0, 0, 0] == 3.0
    np.testing.assert_allclose(y[1].mean(-1), 0, atol=0.05)
    ref = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)  # float64, unclipped
    inside = np.abs(ref) < 3
    np.testing.assert_allclose(y[inside], ref[inside], atol=1e-5)
    assert (np.abs(y[~inside]) == 3).all()
    half = normalize_frames(x[1].astype(np.float16))  # shard frames are float16
    np.testing.assert_allclose(half, normalize_frames(x[1].astype(np.float16).astype(np.float32)), atol=0)
    yt = normalize_frames(torch.from_numpy(x), clip=3.0)
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-5)
    assert (normalize_frames(np.ones((2, 5))) == 0).all()


def test_preprocess_run_order(rng):
    data = rng.standard_normal((40, 6)) * 3 + 10
    data[:, 5] = 4.0  # constant vertex
    mapper = TinyMapper()
    bold, tr_out = preprocess_run(_run(data, tr=2.0), mapper, tr=1.0)
    assert tr_out == 1.0 and bold.dtype == np.float16 and bold.shape == (79, 4)
    # the mapper received z-scored, resampled vertices: rasterising comes after both
    (given,) = mapper.calls
    expect_vertices = resample_tr(zscore_time(data), 2.0, 1.0)
    np.testing.assert_allclose(given, expect_vertices, atol=1e-6)
    np.testing.assert_allclose(given[::2, :5].std(0), 1, atol=1e-4)  # original frames keep std 1
    np.testing.assert_array_equal(bold, mapper.to_pixels(expect_vertices).astype(np.float16))
    assert (bold[:, 3] == 0).all()  # the pixel on the constant vertex


def test_preprocess_map_is_stored_as_given(rng):
    data = rng.standard_normal((1, 6)) * 50
    mapper = TinyMapper()
    bold, tr_out = preprocess_run(_run(data, tr=None, is_map=True), mapper)
    assert tr_out is None and bold.shape == (1, 4)
    np.testing.assert_array_equal(bold, mapper.to_pixels(data).astype(np.float16))  # no z-score


def test_preprocess_refusals(rng):
    m = TinyMapper()
    good = rng.standard_normal((20, 6))
    cases = [
        (_run(np.full((20, 6), 3.0)), "zero-variance run"),
        (_run(np.where(np.arange(6) == 2, np.nan, good)), "NaN/Inf"),
        (_run(good, tr=None), "no TR"),
        (_run(good[:, :5]), "wrong vertex count"),
        (_run(good, space="fs_LR_32k"), "fs_LR_32k"),
        (_run(np.zeros((1, 6)), is_map=True), "zero-variance map"),
    ]
    for run, match in cases:
        with pytest.raises(InputError, match=match) as info:
            preprocess_run(run, m)
        assert "sub-01_run.dtseries.nii" in str(info.value)
    with pytest.raises(InputError, match=r"\|x\|"):
        preprocess_run(_run(good), TinyMapper(scale=500.0))


def test_preprocess_with_real_mapper(rng):
    """fsaverage5 on a coarse grid with the real FlatMapper: pixels agree with its operator."""
    from fmri_bench.flatmap import FlatMapper

    mapper = FlatMapper("fsaverage5", pixel_size=4.0)
    data = rng.standard_normal((12, mapper.n_vertices)).astype(np.float32)
    bold, tr_out = preprocess_run(Run(data, "fsaverage5", 1.5, "x.nii.gz"), mapper, tr=1.0)
    assert bold.dtype == np.float16 and bold.shape == (n_frames_out(12, 1.5, 1.0), mapper.n_pixels)
    expect = mapper.operator @ resample_tr(zscore_time(data), 1.5, 1.0).T
    np.testing.assert_allclose(bold.astype(np.float32), expect.T, atol=5e-3, rtol=2e-3)
