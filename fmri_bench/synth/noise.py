"""Scanner and physiological noise of the two sites, as (T, M) series times (M, V) maps.

In: a :class:`Site` (TR and noise levels), a ``np.random.Generator``, the run length and the
cohort's smooth noise fields ``(B, V)``.
Out: series and maps (both per run: the maps are random mixes of a cohort bank of smooth fields,
:func:`run_fields`) whose product is the run's noise in percent signal change:
spatially smooth physiological noise (1/f series on smooth random fields), slow drift (low
order cosines on smooth fields), occasional motion spikes (single-frame global + smooth
jumps); thermal (vertex-independent) noise is drawn separately by :func:`thermal`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmri_bench.synth.maps import smooth
from fmri_bench.synth.timeseries import colored_noise


# Scanner drift lives below ~0.01 Hz (Smith et al. 1999 NeuroImage 9:526, phantom and human
# drift; hence SPM's 128 s high-pass): its slowest period is at least 2 x 256 s here.
DRIFT_MIN_S = 256.0


@dataclass(frozen=True)
class Site:
    """Acquisition and noise of one site; amplitudes are SDs in percent of the baseline signal."""

    name: str
    tr: float
    thermal: float  # vertex-wise white noise
    smooth_noise: float  # spatially smooth, 1/f (physiological) noise
    drift: float  # slow drift amplitude over the run
    spike_rate: float  # motion spikes per frame
    spike_amp: float
    network_amp: float = 0.7  # SD (%) of the network sources
    task_amp: float = 2.5  # peak task response (%) for a map value of 1 (HCP motor: ~2-3 %)


SITES = {
    # HCP-like: multiband TR 0.72 s, 2 mm, high thermal noise per frame (tSNR ~ 40-60).
    "A": Site("A", tr=0.72, thermal=1.6, smooth_noise=0.5, drift=0.6, spike_rate=0.004, spike_amp=2.0),
    # Second site (OOD): conventional TR 2.0 s, less thermal noise per frame, more physiological
    # noise aliased into the band, stronger drift and more motion.
    "B": Site("B", tr=2.0, thermal=0.7, smooth_noise=0.8, drift=1.2, spike_rate=0.015, spike_amp=3.0),
}


def smooth_fields(rng: np.random.Generator, n: int, n_vertices: int, n_smooth: int = 20) -> np.ndarray:
    """n random spatially smooth fields, unit RMS -> (n, V) float32."""
    f = smooth(rng.standard_normal((n_vertices, n)).astype(np.float32), n_smooth).T
    f /= np.sqrt((f**2).mean(1, keepdims=True))
    return f.astype(np.float32)


def run_fields(rng: np.random.Generator, bank: np.ndarray, n: int) -> np.ndarray:
    """n fields of one run: random Gaussian mixes of the cohort's smooth ``bank`` (B, V), unit
    RMS -> (n, V) float32. Still smooth (a mix of smooth fields), different in every run."""
    mix = rng.standard_normal((n, bank.shape[0])).astype(np.float32)
    f = mix @ bank
    f /= np.sqrt((f**2).mean(1, keepdims=True))
    return f.astype(np.float32)


def noise_maps(fields: np.ndarray) -> np.ndarray:
    """Spatial maps of the structured noise -> (M, V): physiological fields, 3 drift fields, spikes.

    fields: (B, V) unit-RMS smooth fields; the last 4 serve drift (3) and the spike pattern.
    """
    n_phys = fields.shape[0] - 4
    glob = np.ones((1, fields.shape[1]), np.float32)
    return np.concatenate([fields[:n_phys] / np.sqrt(8), fields[n_phys:n_phys + 3],
                           0.5 * glob + 0.5 * fields[-1:]], 0).astype(np.float32)


def noise_series(site: Site, rng: np.random.Generator, n_t: int, n_fields: int) -> np.ndarray:
    """Structured noise series of one run -> (T, M) float32 for :func:`noise_maps` (% signal)."""
    n_phys = n_fields - 4
    # unit-variance series on n_phys fields scaled by 1/sqrt(8): per-vertex SD = site.smooth_noise
    phys = colored_noise(rng, n_phys, n_t, site.tr, alpha=0.7, f_cut=0.5) * (site.smooth_noise / np.sqrt(n_phys / 8))
    # drift: the first 3 cosines over max(run, DRIFT_MIN_S), so it stays below ~0.006 Hz in
    # absolute time (a short run sees the slow start of a drift, not a faster one)
    t = (np.arange(n_t) + 0.5) * site.tr / max(n_t * site.tr, DRIFT_MIN_S)
    cos = np.stack([np.cos(np.pi * k * t) for k in (1, 2, 3)], 1)
    drift = (cos @ rng.standard_normal((3, 3))) * site.drift / 2
    spikes = np.zeros((n_t, 1), np.float32)
    hit = rng.random(n_t) < site.spike_rate
    spikes[hit, 0] = site.spike_amp * rng.choice([-1.0, 1.0], hit.sum())
    return np.concatenate([phys, drift, spikes], 1).astype(np.float32)


def thermal(site: Site, rng: np.random.Generator, n_t: int, n_vertices: int) -> np.ndarray:
    """Vertex-independent white noise -> (T, V) float32, percent signal change."""
    x = rng.standard_normal((n_t, n_vertices), dtype=np.float32)
    x *= site.thermal
    return x
