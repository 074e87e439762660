"""Imaging-derived descriptors of a scan, z-scored against training subjects, rendered as text.

In: :class:`fmri_bench.parcels.ParcelSeries` (one per scan). Out: per scan a record
``{"scan", "subject", "numbers", "z", "text"}``, the corpus fMRI-LM aligns its tokenizer with
and generates (Wei et al. 2025, fMRI-LM section 3.2 and appendix on descriptors):

- FC: Pearson r (Fisher z) between parcels at TR 2.0 s, averaged within / between networks
  (``fc.A|B``); the text names the three most elevated and the three most reduced pairs.
- Functional gradients: BrainSpace diffusion map (3 components, normalized-angle kernel) of
  the FC matrix, Procrustes-aligned to the gradients of the training subjects' mean FC;
  range and variance of each, network means of each.
- Graph metrics on the top 10 % edges (weighted): global efficiency, Louvain modularity
  (bctpy, seeded), mean clustering, mean strength, strength per network.
- Amplitude: SD (percent of the parcel mean when the series carry a baseline), ALFF
  (0.01-0.08 Hz) and fALFF, low/high frequency power ratio (0.01-0.1 vs > 0.1 Hz), lag-1
  autocorrelation, outlier fraction (|robust z| > 3).

``DescriptorNorm.fit(train_records)`` takes the mean and SD of every number over the training
scans only; ``transform`` gives z, binned at +-1 / +-2 SD in the text with z printed. The
upstream code z-scores over the whole cohort, test subjects included, and words modularity the
wrong way round (high Q as "integrated"); we follow the paper: training subjects only, high
modularity = more segregated networks. No text names the scan, its task or state, or any
subject trait (sex, age, fluid intelligence): ``label_leaks`` checks a text for that.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmri_bench.errors import InputError

TR = 2.0
TOP_EDGES = 0.10
N_GRADIENTS = 3


def _pair(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def fc_matrix(x: np.ndarray) -> np.ndarray:
    """x: (T, R) -> (R, R) Pearson r, diagonal 0; constant parcels give 0."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    sd = np.sqrt((x * x).sum(0))
    sd[sd == 0] = np.inf
    x = x / sd
    c = np.clip(x.T @ x, -1.0, 1.0)
    np.fill_diagonal(c, 0.0)
    return c


def network_fc(c: np.ndarray, networks) -> dict[str, float]:
    """Mean Fisher-z FC within / between networks -> {"A|B": value} (A == B: within)."""
    z = np.arctanh(np.clip(c, -0.999999, 0.999999))
    nets = np.asarray(networks)
    names = sorted(set(nets) - {"none", "Subcortical", "unassigned"})
    out = {}
    for i, a in enumerate(names):
        for b in names[i:]:
            m = np.outer(nets == a, nets == b)
            m = m | m.T
            np.fill_diagonal(m, False)
            if m.any():
                out[_pair(a, b)] = float(z[m].mean())
    return out


def global_efficiency(w: np.ndarray) -> float:
    """Weighted global efficiency (lengths 1 / w), as bctpy's ``efficiency_wei``: mean over
    ordered pairs of 1 / shortest path length. scipy's Dijkstra (C) instead of bctpy's Python."""
    from scipy.sparse.csgraph import shortest_path

    n = len(w)
    length = np.zeros_like(w)
    nz = w > 0
    length[nz] = 1.0 / w[nz]
    d = shortest_path(length, method="D", directed=False)
    with np.errstate(divide="ignore"):
        inv = 1.0 / d
    np.fill_diagonal(inv, 0.0)
    inv[~np.isfinite(inv)] = 0.0
    return float(inv.sum() / (n * n - n))


def graph_metrics(c: np.ndarray, networks, seed: int = 0) -> dict[str, float]:
    import bct

    w = bct.threshold_proportional(np.clip(c, 0, None), TOP_EDGES)
    _, q = bct.modularity_louvain_und(w, seed=seed)
    strength = w.sum(0)
    out = {"graph.efficiency": global_efficiency(w), "graph.modularity": float(q),
           "graph.clustering": float(bct.clustering_coef_wu(w).mean()), "graph.strength": float(strength.mean())}
    nets = np.asarray(networks)
    for n in sorted(set(nets) - {"none", "unassigned"}):
        out[f"strength.{n}"] = float(strength[nets == n].mean())
    return out


def _gradients(c: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    from brainspace.gradient import GradientMaps

    gm = GradientMaps(n_components=N_GRADIENTS, approach="dm", kernel="normalized_angle", random_state=0,
                      alignment="procrustes" if reference is not None else None)
    # BrainSpace keeps each row's top 10 % of entries; small atlases (yeo7) keep at least 2
    gm.fit(c, reference=reference, sparsity=min(0.9, 1.0 - 2.0 / len(c)))
    return np.asarray(gm.aligned_ if reference is not None else gm.gradients_)


def gradient_features(c: np.ndarray, networks, reference: np.ndarray | None) -> dict[str, float]:
    g = _gradients(c, reference)
    nets = np.asarray(networks)
    out = {}
    for k in range(N_GRADIENTS):
        out[f"gradient{k + 1}.range"] = float(np.ptp(g[:, k]))
        out[f"gradient{k + 1}.variance"] = float(g[:, k].var())
        for n in sorted(set(nets) - {"none", "unassigned"}):
            out[f"gradient{k + 1}.{n}"] = float(g[nets == n, k].mean())
    return out


def amplitude_features(x: np.ndarray, tr: float, networks) -> dict[str, float]:
    """x: (T, R) parcel series at ``tr`` s, file units."""
    from fmri_bench.parcels import robust_zscore

    x = np.asarray(x, np.float64)
    mean, sd = x.mean(0), x.std(0)
    percent = bool((mean > 0).all() and (mean > 5 * sd).all())
    amp = sd / mean * 100 if percent else sd
    xc = x - mean
    f = np.fft.rfftfreq(len(x), tr)
    a = np.abs(np.fft.rfft(xc, axis=0))  # (F, R)
    band = (f >= 0.01) & (f <= 0.08)
    alff = a[band].sum(0)
    total = a[1:].sum(0)
    alff_level = 2 * a[band].mean(0) / len(x)  # mean amplitude in the band, signal units
    if percent:
        alff_level = alff_level / mean * 100
    low, high = (a[(f >= 0.01) & (f <= 0.1)] ** 2).sum(0), (a[f > 0.1] ** 2).sum(0)
    ac1 = (xc[1:] * xc[:-1]).sum(0) / np.maximum((xc * xc).sum(0), 1e-12)
    out = {"amplitude.sd": float(amp.mean()),
           "amplitude.alff": float(alff_level.mean()),
           "amplitude.falff": float((alff / np.maximum(total, 1e-12)).mean()),
           "amplitude.low_high_ratio": float(np.log10(np.maximum(low, 1e-12) / np.maximum(high, 1e-12)).mean()),
           "amplitude.autocorr1": float(ac1.mean()),
           "amplitude.outliers": float((np.abs(robust_zscore(x)) > 3).mean())}
    nets = np.asarray(networks)
    for n in sorted(set(nets) - {"none", "unassigned"}):
        out[f"sd.{n}"] = float(amp[nets == n].mean())
    return out


def scan_numbers(series, reference: np.ndarray | None = None, tr: float = TR, seed: int = 0) -> dict[str, float]:
    """ParcelSeries -> {descriptor: value}. The series is resampled to ``tr`` (anti-aliased,
    ``preprocess.resample_tr``); ``reference``: (R, 3) gradients to align to (``gradient_reference``)."""
    from fmri_bench.preprocess import resample_tr

    x = resample_tr(np.asarray(series.data, np.float32), series.tr, tr) if tr else np.asarray(series.data)
    if len(x) < 8:
        raise InputError(f"{len(x)} frames at TR {tr} s: too short for descriptors (need >= 8)", series.source)
    c = fc_matrix(x)
    nets = series.networks
    out = {f"fc.{k}": v for k, v in network_fc(c, nets).items()}
    out.update(gradient_features(c, nets, reference))
    out.update(graph_metrics(c, nets, seed))
    out.update(amplitude_features(x, tr or series.tr, nets))
    return out


def gradient_reference(train_series, tr: float = TR) -> np.ndarray:
    """(R, 3) gradients of the mean FC over training scans: the frame every scan aligns to."""
    from fmri_bench.preprocess import resample_tr

    cs = [fc_matrix(resample_tr(np.asarray(s.data, np.float32), s.tr, tr)) for s in train_series]
    return _gradients(np.tanh(np.mean(np.arctanh(np.clip(cs, -0.999999, 0.999999)), 0)), None)


@dataclass
class DescriptorNorm:
    """Mean and SD of every descriptor over the training scans (fit), z of any scan (transform)."""

    mean: dict[str, float] = field(default_factory=dict)
    sd: dict[str, float] = field(default_factory=dict)
    n: int = 0

    @classmethod
    def fit(cls, train_records) -> "DescriptorNorm":
        recs = list(train_records)
        if len(recs) < 2:
            raise InputError(f"z-scores need >= 2 training scans, got {len(recs)}")
        keys = sorted(set.intersection(*(set(r["numbers"]) for r in recs)))
        vals = np.array([[r["numbers"][k] for k in keys] for r in recs], np.float64)
        sd = vals.std(0, ddof=1)
        sd[~(sd > 0)] = 1.0
        return cls(dict(zip(keys, vals.mean(0).tolist())), dict(zip(keys, sd.tolist())), len(recs))

    def transform(self, record) -> dict[str, float]:
        return {k: round((record["numbers"][k] - m) / self.sd[k], 3) for k, m in self.mean.items()
                if k in record["numbers"]}


# ----------------------------------------------------------------------------- text

_BINS = ((-np.inf, -2, "markedly lower than typical"), (-2, -1, "lower than typical"), (-1, 1, "typical"),
         (1, 2, "higher than typical"), (2, np.inf, "markedly higher than typical"))


def bin_word(z: float) -> str:
    for lo, hi, word in _BINS:
        if lo <= z < hi:
            return word
    return "typical"


_TEMPLATES = {
    # no run length: task and rest runs differ in length, so it would hint at the scan's state
    "info": ["Parcellated fMRI scan: {n} regions ({atlas}), sampled every {tr:g} s.",
             "Scan summary: a {tr:g} s repetition time over {n} {atlas} regions."],
    "fc_up": ["Connectivity is elevated for {pairs}.", "The strongest increases in coupling are {pairs}."],
    "fc_down": ["Connectivity is reduced for {pairs}.", "The clearest decreases in coupling are {pairs}."],
    "gradient": ["The principal gradient range is {w} (z = {z:+.1f}).",
                 "Gradient 1 spans a {w} range (z = {z:+.1f})."],
    "modularity": ["Modularity is {w} (z = {z:+.1f}), i.e. networks are {seg}.",
                   "Network segregation (modularity) is {w} (z = {z:+.1f}): {seg} networks."],
    "graph": ["Global efficiency is {w1} (z = {z1:+.1f}) and clustering {w2} (z = {z2:+.1f}).",
              "Efficiency: {w1} (z = {z1:+.1f}); clustering: {w2} (z = {z2:+.1f})."],
    "amplitude": ["Signal amplitude is {w1} (z = {z1:+.1f}), fALFF {w2} (z = {z2:+.1f}), lag-1 autocorrelation "
                  "{w3} (z = {z3:+.1f}).",
                  "Fluctuation size {w1} (z = {z1:+.1f}); low-frequency share (fALFF) {w2} (z = {z2:+.1f}); "
                  "temporal smoothness {w3} (z = {z3:+.1f})."],
}


def _pair_text(key: str, z: float) -> str:
    a, b = key[3:].split("|")
    what = f"within {a}" if a == b else f"{a}-{b}"
    return f"{what} (z = {z:+.1f})"


def render_text(meta: dict, z: dict[str, float], rng: np.random.Generator) -> str:
    """Descriptor text from z (and the dataset-info fields n, atlas, frames, tr)."""
    pick = lambda k: _TEMPLATES[k][int(rng.integers(len(_TEMPLATES[k])))]  # noqa: E731
    lines = [pick("info").format(**meta)]
    fc = sorted(((v, k) for k, v in z.items() if k.startswith("fc.")), reverse=True)
    lines.append(pick("fc_up").format(pairs=", ".join(_pair_text(k, v) for v, k in fc[:3])))
    lines.append(pick("fc_down").format(pairs=", ".join(_pair_text(k, v) for v, k in fc[::-1][:3])))
    g = z.get("gradient1.range", 0.0)
    lines.append(pick("gradient").format(w=bin_word(g), z=g))
    q = z.get("graph.modularity", 0.0)
    seg = "more segregated" if q >= 1 else ("more integrated" if q <= -1 else "typically segregated")
    lines.append(pick("modularity").format(w=bin_word(q), z=q, seg=seg))
    e, c = z.get("graph.efficiency", 0.0), z.get("graph.clustering", 0.0)
    lines.append(pick("graph").format(w1=bin_word(e), z1=e, w2=bin_word(c), z2=c))
    a1, a2, a3 = (z.get(k, 0.0) for k in ("amplitude.sd", "amplitude.falff", "amplitude.autocorr1"))
    lines.append(pick("amplitude").format(w1=bin_word(a1), z1=a1, w2=bin_word(a2), z2=a2, w3=bin_word(a3), z3=a3))
    return " ".join(lines)


# Words that would state a label a later question asks about (whole words, any case).
LEAK_WORDS = {
    "sex": ["sex", "gender", "male", "female", "man", "woman", "men", "women", "boy", "girl"],
    "age": ["age", "aged", "years", "year-old", "old", "older", "young", "younger", "elderly"],
    "fluid_iq": ["intelligence", "iq", "fluid", "cognition", "cognitive", "reasoning", "gf"],
    "state": ["rest", "resting", "task", "tasks", "state", "motor", "wm", "memory", "gambling", "language",
              "social", "relational", "emotion", "story", "math", "rfmri", "tfmri", "eyes"],
}


def label_leaks(text: str, labels: dict | None = None) -> list[str]:
    """Words or label values in ``text`` that would state a label -> list of findings
    (empty: none). labels: the scan's own values (e.g. {"age": 28.4, "subject": "100100"})."""
    found = []
    for field_, words in LEAK_WORDS.items():
        for w in words:
            if re.search(rf"(?<![A-Za-z]){re.escape(w)}(?![A-Za-z])", text, re.IGNORECASE):
                found.append(f"{field_}: {w!r}")
    for k, v in (labels or {}).items():
        if v is not None and str(v) and re.search(rf"(?<![\w.]){re.escape(str(v))}(?![\w])", text):
            found.append(f"{k}: value {v!r}")
    return found


# ----------------------------------------------------------------------------- corpus


def describe(series_list, train_subjects, seed: int = 0) -> list[dict]:
    """ParcelSeries (with .key and .subject) -> corpus records, z against ``train_subjects``."""
    series_list = list(series_list)
    train = set(map(str, train_subjects))
    tr_series = [s for s in series_list if str(s.subject) in train]
    if len(tr_series) < 2:
        raise InputError(f"{len(tr_series)} scans of the training subjects: need >= 2")
    ref = gradient_reference(tr_series)
    recs = [{"scan": s.key or s.source, "subject": s.subject, "atlas": s.atlas,
             "numbers": scan_numbers(s, ref, seed=seed)} for s in series_list]
    norm = DescriptorNorm.fit([r for r in recs if str(r["subject"]) in train])
    for r, s in zip(recs, series_list):
        r["z"] = norm.transform(r)
        rng = np.random.default_rng([seed, zlib.crc32(str(r["scan"]).encode())])
        meta = {"n": s.n_parcels, "atlas": s.atlas, "frames": s.n_frames, "tr": s.tr}
        r["text"] = render_text(meta, r["z"], rng)
        r["train"] = str(r["subject"]) in train
    return recs


def write_corpus(records, out) -> Path:
    from fmri_bench.paths import atomic_save

    text = "".join(json.dumps({k: r[k] for k in ("scan", "subject", "atlas", "train", "numbers", "z", "text")})
                   + "\n" for r in records)
    return atomic_save(lambda p: Path(p).write_text(text), out)


def describe_directory(parcels_dir, out, train_subjects, seed: int = 0) -> str:
    from fmri_bench.parcels import load_parcels

    recs = describe(load_parcels(parcels_dir), train_subjects, seed=seed)
    path = write_corpus(recs, out)
    return f"{len(recs)} scans ({sum(r['train'] for r in recs)} training) -> {path}"


# ----------------------------------------------------------------------------- ground truth


def _residual(v: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
    """``v`` less its least-squares fit on an intercept and the covariate columns ``cov``."""
    X = np.ones((len(v), 1)) if cov is None else np.column_stack([np.ones(len(v)), cov])
    return v - X @ np.linalg.lstsq(X, v, rcond=None)[0]


def _r(x: np.ndarray, y: np.ndarray, cov: np.ndarray | None = None) -> float:
    """Pearson r of x and y, or the partial r given ``cov`` (both residualised on it)."""
    rx, ry = _residual(x, cov), _residual(y, cov)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _boot_ci(x, y, cov, rng, n_boot: int) -> list[float]:
    """95 % interval of ``_r`` over subjects drawn with replacement (the unit is the subject)."""
    boot = []
    for _ in range(n_boot):
        i = rng.integers(len(x), size=len(x))
        r = _r(x[i], y[i], None if cov is None else cov[i])
        if np.isfinite(r):
            boot.append(r)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else [float("nan")] * 2


def _covariates(df, subs, names) -> np.ndarray | None:
    """One-hot (first level dropped) or numeric columns ``names`` of the participants table."""
    import pandas as pd

    cols = []
    for name in names:
        v = df.loc[subs, name]
        if v.dtype.kind in "fiu":
            cols.append(v.to_numpy(float)[:, None])
        else:
            d = pd.get_dummies(v.astype(str), drop_first=True).to_numpy(float)
            if d.shape[1]:
                cols.append(d)
    return np.column_stack(cols) if cols else None


def planted_effect_check(records, participants, effects, rng: np.random.Generator | None = None,
                         truth: tuple[np.ndarray, np.ndarray] | None = None, covariates=("site",),
                         n_boot: int = 1000) -> list[dict]:
    """Does each planted trait effect show in the descriptors? (synthetic cohort)

    records: corpus records; participants: table with subject, sex, age, fluid_iq (and the
    ``covariates`` columns, e.g. site); effects: ground_truth.json ``trait_effects`` (trait,
    net_a, net_b, beta). Per effect, across subjects, the standardised trait (sex -0.5 F / +0.5 M,
    age (y - 29) / 4, fluid_iq) against the subject's mean z of ``fc.net_a|net_b`` over its scans:

    - ``r`` and its 95 % bootstrap CI (subjects resampled);
    - ``partial_r`` given the covariates (both sides residualised on them; one-hot for a
      categorical column) and its CI: a site that shifts every FC descriptor and is unbalanced
      in the trait can hide or fake an effect (the book cohort's site B is 6 M / 2 F, and its
      scans' FC z's are shifted because the z's are fitted on site-A training subjects);
    - ``truth_r`` and its CI, when ``truth = (corr, masks)`` (ground_truth.npz ``corr`` (S, K, K)
      true node correlations in participants order and ``effect_masks`` (E, K, K)): the same
      trait against the subject's mean Fisher z of the true connectome over the effect's edges,
      i.e. how strongly the effect is there to be found, before any parcel averaging or noise;
    - the yardstick ``null_abs_r_max`` / ``null_abs_r_median``: the trait's largest / median |r|
      (partial, when covariates are given) with any network pair where nothing was planted.
    """
    import pandas as pd

    rng = rng or np.random.default_rng(0)
    df = pd.DataFrame(participants).astype({"subject": str}).set_index("subject")
    order = list(df.index)
    trait = {"sex": lambda s: np.where(df.loc[s, "sex"] == "M", 0.5, -0.5),
             "age": lambda s: (df.loc[s, "age"].astype(float) - 29.0) / 4.0,
             "fluid_iq": lambda s: df.loc[s, "fluid_iq"].astype(float)}
    subs = sorted({str(r["subject"]) for r in records})
    covariates = [c for c in (covariates or ()) if c in df.columns]
    cov = _covariates(df, subs, covariates) if covariates else None
    keys = sorted(k for k in records[0]["z"] if k.startswith("fc."))
    zmat = np.array([[np.mean([r["z"][k] for r in records if str(r["subject"]) == s]) for k in keys] for s in subs])
    planted = {(e["trait"], f"fc.{_pair(e['net_a'], e['net_b'])}") for e in effects}
    out = []
    for ei, e in enumerate(effects):
        x = np.asarray(trait[e["trait"]](subs), float)
        key = f"fc.{_pair(e['net_a'], e['net_b'])}"
        if key not in keys:
            continue
        y = zmat[:, keys.index(key)]
        null = [abs(_r(x, zmat[:, j], cov)) for j, k in enumerate(keys) if (e["trait"], k) not in planted]
        row = {"effect": f"{e['trait']}:{e['net_a']}-{e['net_b']}", "beta": e["beta"], "n_subjects": len(x),
               "r": _r(x, y), "ci95": _boot_ci(x, y, None, rng, n_boot)}
        if cov is not None:
            row.update({"covariates": "+".join(covariates), "partial_r": _r(x, y, cov),
                        "partial_ci95": _boot_ci(x, y, cov, rng, n_boot)})
        if truth is not None:
            corr, masks = truth
            idx = [order.index(s) for s in subs]
            tz = np.array([np.arctanh(np.clip(corr[i][masks[ei]], -0.999, 0.999)).mean() for i in idx])
            row.update({"truth_r": _r(x, tz), "truth_ci95": _boot_ci(x, tz, None, rng, n_boot)})
        row.update({"null_abs_r_max": float(np.max(null)), "null_abs_r_median": float(np.median(null))})
        out.append(row)
    return out


def effect_verdict(rows: list[dict]) -> str:
    """One sentence per planted effect, read from the intervals of ``planted_effect_check``:
    shown (the CI excludes 0 with the planted sign), or not shown; the site-adjusted and the
    true-connectome intervals beside it when present."""
    def reading(ci, sign):
        lo, hi = ci
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return "cannot be read"
        if (lo > 0 and sign > 0) or (hi < 0 and sign < 0):
            return "shows with the planted sign"
        if (lo > 0 and sign < 0) or (hi < 0 and sign > 0):
            return "shows with the OPPOSITE sign"
        return "is not told from zero"

    out = []
    for r in rows:
        sign = np.sign(r["beta"])
        parts = [f"{r['effect']} (planted {'+' if sign > 0 else '-'}): in the descriptors it "
                 f"{reading(r['ci95'], sign)} (r {r['r']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}])"]
        if "partial_r" in r:
            ci = r["partial_ci95"]
            parts.append(f"given {r['covariates']} it {reading(ci, sign)} "
                         f"(partial r {r['partial_r']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}])")
        if "truth_r" in r:
            ci = r["truth_ci95"]
            parts.append(f"in the true connectome it {reading(ci, sign)} "
                         f"(r {r['truth_r']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}])")
        parts.append(f"largest |r| with an unplanted pair {r['null_abs_r_max']:.2f}")
        out.append("; ".join(parts) + ".")
    return "\n".join(out)
