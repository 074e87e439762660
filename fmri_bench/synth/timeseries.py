"""Latent source time series: BOLD-like 1/f spectra and network-correlated sources.

In: a ``np.random.Generator``, sizes, TR (s) and, for network sources, a (K, K) correlation.
Out: ``(T, n)`` float32 series, zero mean and unit variance per column.
The spectrum is shaped in Hz (not in frames), so the same source looks alike at TR 0.72 s and
2.0 s: power ~ 1 / (f + f0)^alpha, low-passed by a hemodynamic-like roll-off at ``f_cut``.
"""

from __future__ import annotations

import numpy as np


def colored_noise(rng: np.random.Generator, n: int, n_t: int, tr: float, alpha: float = 1.0,
                  f0: float = 0.01, f_cut: float = 0.12) -> np.ndarray:
    """n independent series with a 1/f-like spectrum -> (n_t, n) float32, z-scored per column."""
    pad = n_t + int(np.ceil(100.0 / tr))  # discard the start: avoids the FFT's circular wrap
    white = rng.standard_normal((n, pad))
    f = np.fft.rfftfreq(pad, d=tr)
    gain = (f + f0) ** (-alpha / 2.0) / (1.0 + (f / f_cut) ** 4)
    gain[0] = 0.0
    x = np.fft.irfft(np.fft.rfft(white, axis=1) * gain, n=pad, axis=1)[:, -n_t:]
    x -= x.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True) + 1e-12
    return x.T.astype(np.float32)


def ar1(rng: np.random.Generator, n: int, n_t: int, phi: float) -> np.ndarray:
    """AR(1) series x_t = phi x_{t-1} + e_t -> (n_t, n) float32 with unit stationary variance."""
    e = rng.standard_normal((n_t, n)) * np.sqrt(1.0 - phi**2)
    x = np.empty_like(e)
    x[0] = rng.standard_normal(n)
    for t in range(1, n_t):
        x[t] = phi * x[t - 1] + e[t]
    return x.astype(np.float32)


def network_sources(rng: np.random.Generator, corr: np.ndarray, n_t: int, tr: float,
                    alpha: float = 1.0) -> np.ndarray:
    """Sources with correlation ``corr`` (K, K) -> (n_t, K) float32.

    Independent 1/f series share one spectrum, so mixing them with the Cholesky factor keeps
    that spectrum and gives the population correlation ``corr`` exactly.
    """
    z = colored_noise(rng, corr.shape[0], n_t, tr, alpha=alpha).astype(np.float64)
    chol = np.linalg.cholesky(corr)
    return (z @ chol.T).astype(np.float32)
