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


def high_pass(series: np.ndarray, tr: float, cutoff_hz: float = 0.01) -> np.ndarray:
    """Remove the mean and the discrete-cosine drifts below ``cutoff_hz`` from each column of
    series (T, n) -> (T, n) float64: the standard fMRI high-pass (SPM / nilearn "cosine" drift
    model, 128 s ~ 0.008 Hz by default there; 0.01 Hz as in the FC literature)."""
    t = len(series)
    k = int(np.floor(2 * t * tr * cutoff_hz))  # cosines with period longer than 1 / cutoff
    n = np.arange(t)
    x = np.column_stack([np.ones(t)] + [np.cos(np.pi * (n + 0.5) * j / t) for j in range(1, k + 1)])
    y = np.asarray(series, np.float64)
    return y - x @ np.linalg.lstsq(x, y, rcond=None)[0]


def regress_global(series: np.ndarray) -> np.ndarray:
    """Remove the mean over columns (the global signal) from every column by least squares:
    (T, n) -> (T, n); Finn et al. 2015 regressed the global signal before fingerprinting."""
    g = series.mean(1, keepdims=True)
    g = g - g.mean()
    y = series - series.mean(0)
    return y - g @ ((g.T @ y) / max(float((g * g).sum()), 1e-12))


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


def ev_correlations(data: np.ndarray, events: pd.DataFrame, tr: float, conditions: list[str]) -> np.ndarray:
    """Pearson r of every vertex's series with each condition's HRF-convolved EV (nilearn SPM
    HRF), after a 0.01 Hz high-pass of both: data (T, V) -> (len(conditions), V)."""
    from fmri_bench.synth.tasks import regressors

    x = high_pass(regressors(events, conditions, len(data), tr), tr)
    y = high_pass(data, tr)
    x /= np.linalg.norm(x, axis=0, keepdims=True) + 1e-12
    y /= np.linalg.norm(y, axis=0, keepdims=True) + 1e-12
    return (x.T @ y).astype(np.float32)


def top_fraction_inside(values: np.ndarray, inside: np.ndarray, frac: float = 0.01) -> np.ndarray:
    """Share of each row's top ``frac`` vertices that lie in ``inside``: values (C, V), inside (V,) bool -> (C,)."""
    k = max(1, int(round(frac * values.shape[1])))
    top = np.argpartition(-values, k - 1, axis=1)[:, :k]
    return inside[top].mean(1)


def event_clip_counts(runs, clip_len: int = 16, tr_out: float = 1.0) -> dict[str, int]:
    """Event-locked clips per state21 class that a run plan yields once flattened to ``tr_out``
    (as the benchmarks cut them: ``fmri_bench.clips.event_starts``) -> {"PARADIGM_condition": n}.

    runs: ``Synthesizer.runs`` (RunSpec with events) or ground_truth.json run records.
    """
    from fmri_bench.clips import event_starts
    from fmri_bench.preprocess import n_frames_out
    from fmri_bench.synth.tasks import class_map

    names = {(c["paradigm"], c["condition"]): c["name"] for c in class_map()["classes"]}
    counts = {n: 0 for n in names.values()}
    for r in runs:
        get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
        if get("kind") != "task":
            continue
        ev = get("events")
        ev = ev.to_dict("records") if isinstance(ev, pd.DataFrame) else ev
        n = n_frames_out(get("n_frames"), get("tr"), tr_out)
        for _, e in event_starts(ev, n, clip_len, tr_out):
            name = names.get((get("paradigm"), str(e["trial_type"])))
            if name:
                counts[name] += 1
    return counts


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


def load_parcel_run(root, record: dict, parcels: str = "nodes") -> np.ndarray:
    """(T, P) parcel series of a run: ``parcels`` "mmp" (Glasser 360) or "nodes" (the generator's
    network nodes), from the parcel-level copy beside the CIFTI (computed from the CIFTI when the
    copy is missing)."""
    from pathlib import Path

    from fmri_bench.synth.writer import parcel_copy, parcels_path

    if parcels not in ("mmp", "nodes"):
        raise ValueError(f"parcels must be 'mmp' or 'nodes', got {parcels!r}")
    path = parcels_path(Path(root) / record["path"])
    if path.is_file():
        with np.load(path) as z:
            return z[parcels]
    return parcel_copy(load_cifti_run(root, record))[parcels]


def session_runs(gt: dict, session: str) -> dict[str, list[dict]]:
    """Run records of a run name ("rfMRI_REST1_LR") or a whole session ("REST1": its LR and RL
    runs) -> {subject: [records]}."""
    out: dict[str, list[dict]] = {}
    for rec in gt["runs"]:
        name = rec["run"]
        if rec.get("path") and (name == session or name.startswith(f"rfMRI_{session}_")):
            out.setdefault(rec["subject"], []).append(rec)
    return out


def cohort_fc(root, gt: dict, arrays: dict, run: str, parcels: str = "nodes",
              cutoff_hz: float | None = 0.01, global_signal: bool = False) -> tuple[list[str], np.ndarray]:
    """FC (Fisher z) of every subject's ``run`` -> (subjects, (S, P, P)).

    run: a run name ("rfMRI_REST1_LR") or a session ("REST1": Fisher z averaged over its LR and
    RL runs). parcels: "nodes" (K generator nodes) or "mmp" (360). Each run's parcel series is
    high-passed at ``cutoff_hz`` first (None: only the mean removed), as HCP FC analyses do, and
    with ``global_signal`` the global signal is regressed out.
    """
    subjects, fcs = [], []
    for subject, recs in session_runs(gt, run).items():
        zs = []
        for rec in recs:
            x = load_parcel_run(root, rec, parcels)
            x = high_pass(x, rec["tr"], cutoff_hz) if cutoff_hz else x
            zs.append(fc(regress_global(x) if global_signal else x))
        fcs.append(np.mean(zs, 0))
        subjects.append(subject)
    return subjects, np.array(fcs)


def fingerprint_sessions(root, gt: dict, arrays: dict, parcels: str = "mmp", subjects=None,
                         a: str = "REST1", b: str = "REST2") -> tuple[float, int]:
    """Connectome identification between two rest sessions (each its LR + RL runs) on
    ``parcels`` -> (accuracy, number of subjects); ``subjects`` limits it to those. Series are
    high-passed (0.01 Hz) and the global signal regressed out, as Finn et al. 2015 did."""
    s1, fa = cohort_fc(root, gt, arrays, a, parcels, global_signal=True)
    s2, fb = cohort_fc(root, gt, arrays, b, parcels, global_signal=True)
    keep = [s for s in s2 if s in s1 and (subjects is None or s in subjects)]
    fa = fa[[s1.index(s) for s in keep]]
    fb = fb[[s2.index(s) for s in keep]]
    return fingerprint_accuracy(upper(fa), upper(fb)), len(keep)


def subject_condition_maps(gt: dict, arrays: dict, subject: str) -> np.ndarray:
    """(C, V) float32 condition maps of one subject (group maps under the subject's deformation)."""
    from fmri_bench.synth.deform import Deformation
    from fmri_bench.synth.writer import deform_params

    i = list(arrays["subjects"]).index(subject)
    k = arrays["node_maps"].shape[0]
    group = np.concatenate([arrays["node_maps"], arrays["condition_maps"]]).astype(np.float32)
    return Deformation.from_params(deform_params(arrays, i)).apply(group)[k:]


def recovery_report(root, gt: dict, arrays: dict, max_task_runs: int = 12) -> dict:
    """The headline checks on a written cohort: fingerprinting across REST1/REST2 (each session
    its LR + RL runs; MMP-360 and generator nodes), observed vs true FC, trait slopes, GLM map
    correlation of the task runs with the subject's own maps, tSNR per site -> flat dict."""
    from fmri_bench.synth.tasks import PARADIGMS

    out = {}
    s1, a = cohort_fc(root, gt, arrays, "REST1")
    s2, b = cohort_fc(root, gt, arrays, "REST2")
    keep = [s for s in s2 if s in s1]
    a, b = a[[s1.index(s) for s in keep]], b[[s2.index(s) for s in keep]]
    out["n_subjects"] = len(keep)
    out["fingerprint_acc"], _ = fingerprint_sessions(root, gt, arrays, "mmp")
    out["fingerprint_acc_nodes"] = fingerprint_accuracy(upper(a), upper(b))
    out["fingerprint_chance"] = 1.0 / len(keep)
    subj_index = {s: i for i, s in enumerate(arrays["subjects"])}
    true = arrays["corr"][[subj_index[s] for s in keep]]
    out["fc_obs_vs_true_r"] = float(np.corrcoef(upper((a + b) / 2).ravel(),
                                                upper(np.arctanh(np.clip(true, -.999, .999))).ravel())[0, 1])
    traits = {k: np.array([next(x for x in gt["subjects"] if x["subject"] == s)[k] for s in keep]) for k in
              ("sex", "age", "fluid_iq")}
    from fmri_bench.synth.cohort import standardized_traits

    std = standardized_traits(pd.DataFrame(traits))
    for e, mask in zip(gt["trait_effects"], arrays["effect_masks"]):
        slope, se = trait_slope((a + b) / 2, std[e["trait"]], mask)
        name = f"{e['trait']}_{e['net_a']}-{e['net_b']}".replace(" ", "")
        out[f"trait_{name}_beta"] = e["beta"]
        out[f"trait_{name}_slope"] = slope
        out[f"trait_{name}_se"] = se
    rs = []
    names = [f"{c['paradigm']}/{c['condition']}" for c in gt["conditions"]]
    maps: dict[str, np.ndarray] = {}
    for rec in [r for r in gt["runs"] if r["kind"] == "task" and r["path"]][:max_task_runs]:
        conds = list(PARADIGMS[rec["paradigm"]].conditions)
        betas = glm(load_cifti_run(root, rec), pd.DataFrame(rec["events"]), rec["tr"], conds)
        if rec["subject"] not in maps:
            maps = {rec["subject"]: subject_condition_maps(gt, arrays, rec["subject"])}
        truth = maps[rec["subject"]][[names.index(f"{rec['paradigm']}/{c}") for c in conds]]
        r = spatial_corr(betas.astype(np.float64), truth.astype(np.float64))
        rs.extend(r[np.isfinite(r)].tolist())
    out["glm_map_r_mean"] = float(np.mean(rs)) if rs else float("nan")  # single run, vertex level
    for site in sorted({r["site"] for r in gt["runs"]}):
        out[f"tsnr_site_{site}"] = float(np.median([r["tsnr_median"] for r in gt["runs"] if r["site"] == site]))
    return out
