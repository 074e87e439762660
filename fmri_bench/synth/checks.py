"""Analyses that show the ground truth is in the simulated data (used by tests and chapter 0).

In: vertex data ``(T, V)``, events, ground-truth arrays. Out: parcel series, FC matrices, GLM
maps, identification accuracy, trait-effect slopes, tSNR and spectra, as plain numbers/arrays.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def parcel_means(data: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """data (T, V), labels (V,) int (-1 = none) -> (T, P) mean series of parcels 0..P-1."""
    n = int(labels.max()) + 1
    ok = labels >= 0
    onehot = np.zeros((ok.sum(), n), np.float32)
    onehot[np.arange(ok.sum()), labels[ok]] = 1.0
    onehot /= onehot.sum(0, keepdims=True)
    return data[:, ok] @ onehot


def fc(series: np.ndarray, fisher: bool = True) -> np.ndarray:
    """series (T, P) -> (P, P) Pearson correlation (Fisher z when ``fisher``; diagonal 0)."""
    c = np.corrcoef(series.T)
    if fisher:
        c = np.arctanh(np.clip(c, -0.999999, 0.999999))
        np.fill_diagonal(c, 0.0)
    return c


def upper(m: np.ndarray) -> np.ndarray:
    """(..., P, P) -> (..., P (P-1) / 2) upper-triangle edges."""
    i, j = np.triu_indices(m.shape[-1], 1)
    return m[..., i, j]


def glm(data: np.ndarray, events: pd.DataFrame, tr: float, conditions: list[str]) -> np.ndarray:
    """OLS GLM with nilearn's SPM-HRF design (+ cosine drifts) -> betas (len(conditions), V).

    Conditions absent from ``events`` get NaN maps. data is converted to percent signal change of each vertex's mean first.
    """
    from nilearn.glm.first_level import make_first_level_design_matrix

    frame_times = np.arange(data.shape[0]) * tr
    dm = make_first_level_design_matrix(frame_times, events[["onset", "duration", "trial_type"]],
                                        hrf_model="spm", drift_model="cosine", high_pass=0.01)
    x = dm.to_numpy()
    y = 100 * (data / data.mean(0) - 1)
    beta = np.linalg.pinv(x) @ y  # (n_regressors, V); pinv: one small SVD for all vertices
    cols = list(dm.columns)
    nan = np.full(data.shape[1], np.nan)
    return np.stack([beta[cols.index(c)] if c in cols else nan for c in conditions]).astype(np.float32)


def spatial_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of maps a (C, V) and b (C, V) -> (C,)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def fingerprint_accuracy(edges_a: np.ndarray, edges_b: np.ndarray) -> float:
    """Connectome identification (Finn et al. 2015): edges (S, E) of session A and B ->
    fraction of subjects whose session-B FC correlates best with their own session-A FC
    (averaged over both directions). Chance = 1 / S."""
    za = (edges_a - edges_a.mean(1, keepdims=True)) / edges_a.std(1, keepdims=True)
    zb = (edges_b - edges_b.mean(1, keepdims=True)) / edges_b.std(1, keepdims=True)
    r = za @ zb.T / za.shape[1]
    idx = np.arange(len(r))
    return float(((r.argmax(1) == idx).mean() + (r.argmax(0) == idx).mean()) / 2)


def trait_slope(fcs: np.ndarray, trait: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Regress the mean Fisher-z FC over the ``mask`` (K, K) edges on the trait.

    fcs (S, K, K), trait (S,) -> (slope, standard error)."""
    y = fcs[:, mask].mean(1)
    x = np.column_stack([np.ones_like(trait), trait])
    coef, res, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = max(len(y) - 2, 1)
    sigma2 = float(((y - x @ coef) ** 2).sum()) / dof
    se = float(np.sqrt(sigma2 * np.linalg.inv(x.T @ x)[1, 1]))
    return float(coef[1]), se


def attenuation(fcs: np.ndarray, true_corr: np.ndarray) -> float:
    """Slope of observed Fisher-z FC on true Fisher-z correlation over all edges and subjects:
    how much parcel averaging and noise shrink FC (to put trait slopes on the truth's scale)."""
    zt = upper(np.arctanh(np.clip(true_corr, -0.999999, 0.999999))).ravel()
    zo = upper(fcs).ravel()
    zt = zt - zt.mean()
    return float((zt * (zo - zo.mean())).sum() / (zt * zt).sum())


def tsnr(data: np.ndarray) -> np.ndarray:
    """(T, V) -> (V,) temporal SNR: mean / SD over time."""
    return data.mean(0) / (data.std(0) + 1e-6)


def spectrum(series: np.ndarray, tr: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, n) -> (freqs (F,) Hz, mean power (F,)) by Welch's method over the columns."""
    from scipy.signal import welch

    f, p = welch(series - series.mean(0), fs=1.0 / tr, axis=0, nperseg=min(128, len(series)))
    return f, p.mean(1)


def parcel_map_corr(betas: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Spatial correlation after averaging maps (C, V) within parcels (labels (V,), -1 none) -> (C,)."""
    return spatial_corr(parcel_means(betas, labels).astype(np.float64),
                        parcel_means(truth, labels).astype(np.float64))


# --------------------------------------------------------------------- a written cohort
def load_cifti_run(root, record: dict) -> np.ndarray:
    """(T, 59412) data of a run record from ground_truth.json, read with fmri_bench.io."""
    from pathlib import Path

    from fmri_bench.io import load_run

    return load_run(Path(root) / record["path"]).data


def cohort_fc(root, gt: dict, arrays: dict, run: str) -> tuple[list[str], np.ndarray]:
    """Node FC (Fisher z) of every subject's ``run`` (e.g. "rfMRI_REST1_LR") -> (subjects, (S, K, K))."""
    subjects, fcs = [], []
    for rec in gt["runs"]:
        if rec["run"] == run and rec["path"]:
            data = load_cifti_run(root, rec)
            fcs.append(fc(parcel_means(data, arrays["node_labels"].astype(np.int64))))
            subjects.append(rec["subject"])
    return subjects, np.array(fcs)


def recovery_report(root, gt: dict, arrays: dict, max_task_runs: int = 12) -> dict:
    """The headline checks on a written cohort: fingerprinting across REST1/REST2, observed vs
    true FC, trait slopes, GLM map correlation of the task runs, tSNR per site -> flat dict."""
    from fmri_bench.synth.tasks import PARADIGMS

    out = {}
    s1, a = cohort_fc(root, gt, arrays, "rfMRI_REST1_LR")
    s2, b = cohort_fc(root, gt, arrays, "rfMRI_REST2_LR")
    order = [s1.index(s) for s in s2]
    a = a[order]
    out["n_subjects"] = len(s2)
    out["fingerprint_acc"] = fingerprint_accuracy(upper(a), upper(b))
    out["fingerprint_chance"] = 1.0 / len(s2)
    subj_index = {s: i for i, s in enumerate(arrays["subjects"])}
    true = arrays["corr"][[subj_index[s] for s in s2]]
    out["fc_obs_vs_true_r"] = float(np.corrcoef(upper((a + b) / 2).ravel(),
                                                upper(np.arctanh(np.clip(true, -.999, .999))).ravel())[0, 1])
    traits = {k: np.array([next(x for x in gt["subjects"] if x["subject"] == s)[k] for s in s2]) for k in
              ("sex", "age", "fluid_iq")}
    from fmri_bench.synth.cohort import standardized_traits

    std = standardized_traits(pd.DataFrame(traits))
    for e, mask in zip(gt["trait_effects"], arrays["effect_masks"]):
        slope, se = trait_slope((a + b) / 2, std[e["trait"]], mask)
        out[f"trait_{e['trait']}_beta"] = e["beta"]
        out[f"trait_{e['trait']}_slope"] = slope
        out[f"trait_{e['trait']}_se"] = se
    rs = []
    names = [f"{c['paradigm']}/{c['condition']}" for c in gt["conditions"]]
    for rec in [r for r in gt["runs"] if r["kind"] == "task" and r["path"]][:max_task_runs]:
        conds = list(PARADIGMS[rec["paradigm"]].conditions)
        betas = glm(load_cifti_run(root, rec), pd.DataFrame(rec["events"]), rec["tr"], conds)
        truth = arrays["condition_maps"][[names.index(f"{rec['paradigm']}/{c}") for c in conds]]
        r = spatial_corr(betas.astype(np.float64), truth.astype(np.float64))
        rs.extend(r[np.isfinite(r)].tolist())
    out["glm_map_r_mean"] = float(np.mean(rs)) if rs else float("nan")  # single run, vertex level
    for site in sorted({r["site"] for r in gt["runs"]}):
        out[f"tsnr_site_{site}"] = float(np.median([r["tsnr_median"] for r in gt["runs"] if r["site"] == site]))
    return out
