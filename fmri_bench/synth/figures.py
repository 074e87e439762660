"""Figures of chapter 0: designs, activation maps and rest frames on the flat map, FC, spectra.

In: ground-truth records / arrays and vertex data. Out: matplotlib figures (one per call).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fmri_bench.synth import checks


def plot_design(record: dict, ax=None):
    """Design matrix (nilearn, SPM HRF) of a task run record from ground_truth.json."""
    import matplotlib.pyplot as plt
    from nilearn.glm.first_level import make_first_level_design_matrix
    from nilearn.plotting import plot_design_matrix

    ft = np.arange(record["n_frames"]) * record["tr"]
    dm = make_first_level_design_matrix(ft, pd.DataFrame(record["events"])[["onset", "duration", "trial_type"]],
                                        hrf_model="spm", drift_model="cosine", high_pass=0.01)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    plot_design_matrix(dm, axes=ax)
    ax.set_title(f"{record['subject']} {record['run']} (TR {record['tr']} s)")
    return ax.figure


def plot_maps(mapper, maps: np.ndarray, titles: list[str], ncols: int = 3, vlim: float | None = None):
    """Several (V,) maps on the flat map -> figure."""
    import matplotlib.pyplot as plt

    n = len(maps)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 2.3 * nrows), squeeze=False)
    for ax, m, t in zip(axes.ravel(), maps, titles):
        v = vlim or float(np.nanmax(np.abs(m)))
        mapper.plot(np.asarray(m, np.float32), ax=ax, vmin=-v, vmax=v, title=t, colorbar=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_fc(matrices: list[np.ndarray], titles: list[str], node_names=None, vlim: float = 1.0):
    """Side-by-side (K, K) matrices -> figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), 3.6), squeeze=False)
    for ax, m, t in zip(axes[0], matrices, titles):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vlim, vmax=vlim)
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return fig


def plot_tsnr_spectra(runs: dict, node_labels: np.ndarray):
    """runs: {label: ((T, V) data, tr)} -> figure: tSNR histograms and node-series spectra."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    for label, (data, tr) in runs.items():
        a.hist(checks.tsnr(data), bins=80, range=(0, 150), histtype="step", label=label, density=True)
        f, p = checks.spectrum(checks.parcel_means(data, node_labels), tr)
        b.loglog(f[1:], p[1:], label=label)
    a.set(xlabel="tSNR (mean / SD over time)", ylabel="density", title="vertex tSNR")
    from matplotlib.ticker import NullFormatter

    b.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap
    b.set(xlabel="frequency (Hz)", ylabel="power", title="network-node spectra (Welch)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig
