"""Scaling-law fits: validation loss against amount of pretraining data.

In: points (N, L): N training frames (or hours, subjects), L the best validation loss of the
run trained on N. Out: ``PowerLawFit`` objects with parameters, bootstrap confidence
intervals and R^2, and a log-log plot with the paper's fits beside ours.

Two forms:
- ``fit_paper``: ``L = (N / a)^b``, the paper's form (arXiv 2510.13768 v2, scaling law),
  an ordinary least-squares line in log-log space: ``log L = b log N - b log a``.
- ``fit_offset``: ``L = L_inf + (N / N_c)^-alpha``, a power law that saturates at an
  irreducible loss, fitted by nonlinear least squares on ``log L`` (scipy
  ``least_squares`` with bounds), so every point weighs by relative error as in the log-log fit.

Confidence intervals resample the points with replacement (seeded) and refit. R^2 is measured
on log L, the space the fits minimise.

``run_sweep`` produces the points: it pretrains (``train.train``) on disjoint subject subsets
of a geometric series of sizes, with repeats, records the best validation loss in and out of
distribution, and fits both laws; each point is skipped when done and resumed when interrupted.
With a ``YardstickConfig`` each point also gets its yardsticks (``fmri_bench.yardsticks``) on the
same validation clips and masks: predict-zero, PCA-k fitted on that point's own training subset,
and, given the simulated cohort, the generator's oracles; each point's "captured" fraction
compares its best validation loss with them (an estimate without CI: the model's per-clip
losses at its best evaluation are not kept).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save

# Fits published in the paper (v2), N = training frames (TR 1 s); quoted, not measured here.
PAPER_FITS = {
    "HCP val": {"a": 15.0, "b": -0.014},
    "NSD val": {"a": 7.0, "b": -0.017},
}
# v2 table: hours of training data -> best validation MSE (HCP, NSD).
PAPER_POINTS = {
    "hours": (130, 252, 455, 887, 1834),
    "HCP val": (0.860, 0.852, 0.846, 0.838, 0.828),
    "NSD val": (0.831, 0.823, 0.815, 0.812, 0.808),
}


def paper_points(name: str = "HCP val") -> tuple[np.ndarray, np.ndarray]:
    """The paper's v2 points as (N frames, L), hours x 3600 frames at TR 1 s."""
    return np.asarray(PAPER_POINTS["hours"], float) * 3600, np.asarray(PAPER_POINTS[name], float)


def geometric_sizes(n_min: float, n_max: float, k: int, integer: bool = True) -> np.ndarray:
    """k sizes evenly spaced in log between n_min and n_max (both included), for the sweep.

    Integer sizes are rounded and deduplicated, so fewer than k can come back for narrow ranges.
    """
    if not (0 < n_min <= n_max) or k < 1:
        raise InputError(f"need 0 < n_min <= n_max and k >= 1, got {n_min}, {n_max}, {k}")
    sizes = np.geomspace(n_min, n_max, k) if k > 1 else np.asarray([float(n_max)])
    return np.unique(np.round(sizes).astype(np.int64)) if integer else sizes


@dataclass
class PowerLawFit:
    """A fitted scaling law. ``params`` name -> value, ``ci`` name -> (low, high)."""

    form: str  # "paper": L = (N/a)^b (fits also keep log_l1 = -b log a); "offset": L = L_inf + (N/N_c)^-alpha
    params: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    r2: float = math.nan
    n_points: int = 0
    name: str = ""
    source: str = "synthetic"  # or "paper" for the published fits

    def predict(self, n) -> np.ndarray:
        n = np.asarray(n, dtype=float)
        p = self.params
        if self.form == "paper":
            if "log_l1" in p:  # a fitted law: exp(c) N^b stays finite when b ~ 0 sends a to 0 / inf
                return np.exp(p["log_l1"] + p["b"] * np.log(n))
            return (n / p["a"]) ** p["b"]
        return p["L_inf"] + (n / p["N_c"]) ** (-p["alpha"])

    @property
    def exponent(self) -> float:
        """Slope of the loss in log-log: b for the paper form, -alpha for the offset form."""
        return self.params["b"] if self.form == "paper" else -self.params["alpha"]

    def label(self) -> str:
        p = self.params
        if self.form == "paper" and "log_l1" in p and not 1e-300 < p["a"] < 1e300:
            s = f"L = {math.exp(p['log_l1']):.3f} N^{p['b']:.4f}"  # b ~ 0: a is 0 or inf, say it as e^c N^b
        elif self.form == "paper":
            s = f"L = (N/{p['a']:.3g})^{p['b']:.3f}"
        else:
            s = f"L = {p['L_inf']:.3f} + (N/{p['N_c']:.3g})^-{p['alpha']:.3f}"
        return f"{self.name}: {s}" if self.name else s

    def to_dict(self) -> dict:
        return {"form": self.form, "params": self.params, "ci": {k: list(v) for k, v in self.ci.items()},
                "r2": self.r2, "n_points": self.n_points, "name": self.name, "source": self.source}


def paper_fit(name: str = "HCP val") -> PowerLawFit:
    return PowerLawFit("paper", dict(PAPER_FITS[name]), name=f"paper v2 {name}", source="paper")


def _points(n, loss, min_points: int) -> tuple[np.ndarray, np.ndarray]:
    n, loss = np.asarray(n, float).ravel(), np.asarray(loss, float).ravel()
    if n.shape != loss.shape:
        raise InputError(f"N {n.shape} and L {loss.shape} differ in length")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(loss)) and (n > 0).all() and (loss > 0).all()):
        raise InputError("scaling points need finite, positive N and L")
    if len(np.unique(n)) < min_points:
        raise InputError(f"need at least {min_points} distinct data sizes, got {len(np.unique(n))}")
    return n, loss


def _r2(y, yhat) -> float:
    ss = np.sum((y - y.mean()) ** 2)
    return float(1 - np.sum((y - yhat) ** 2) / ss) if ss > 0 else math.nan


def _paper_params(n, loss) -> dict[str, float]:
    b, c = np.polyfit(np.log(n), np.log(loss), 1)
    with np.errstate(over="ignore", divide="ignore"):  # a flat sweep: b ~ 0 and a -> 0 or inf
        a = float(np.exp(-c / b)) if b != 0 else math.inf
    return {"a": a, "b": float(b), "log_l1": float(c)}  # log_l1: log L at N = 1 (= -b log a)


def _offset_params(n, loss) -> dict[str, float]:
    logn, logl = np.log(n), np.log(loss)
    lmin = float(loss.min())

    def resid(theta):
        l_inf, log_nc, alpha = theta
        return np.log(l_inf + np.exp(-alpha * (logn - log_nc))) - logl

    # start: half the smallest loss as the floor, then a log-log line through the rest
    l0 = 0.5 * lmin
    slope, icpt = np.polyfit(logn, np.log(np.maximum(loss - l0, 1e-12)), 1)
    alpha0 = float(np.clip(-slope, 1e-3, 5.0))
    x0 = [l0, float(icpt / alpha0), alpha0]
    lo = [0.0, -100.0, 1e-4]
    hi = [lmin * (1 - 1e-9), 100.0, 5.0]
    x0 = np.clip(x0, np.add(lo, 1e-12), np.subtract(hi, 1e-12))
    sol = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", max_nfev=2000)
    l_inf, log_nc, alpha = sol.x
    return {"L_inf": float(l_inf), "N_c": float(np.exp(log_nc)), "alpha": float(alpha)}


def _bootstrap(fit_fn, n, loss, n_boot: int, seed: int, min_points: int, level: float):
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < min_points:
            continue
        for k, v in fit_fn(n[idx], loss[idx]).items():
            draws.setdefault(k, []).append(v)
    q = [(1 - level) / 2, (1 + level) / 2]
    # a flat sweep draws a = 0 or inf now and then: no interpolation between infinite draws
    return {k: tuple(float(x) for x in np.quantile(v, q, method="linear" if np.isfinite(v).all() else "nearest"))
            for k, v in draws.items()}


def _fit(kind: str, params_fn, min_points: int, n, loss, n_boot, seed, level, name) -> PowerLawFit:
    n, loss = _points(n, loss, min_points)
    fit = PowerLawFit(kind, params_fn(n, loss), n_points=len(n), name=name)
    fit.r2 = _r2(np.log(loss), np.log(fit.predict(n)))
    if n_boot:
        fit.ci = _bootstrap(params_fn, n, loss, n_boot, seed, min_points, level)
    return fit


def fit_paper(n, loss, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
              name: str = "") -> PowerLawFit:
    """Fit L = (N/a)^b by least squares on log L vs log N. n, loss: (P,) -> PowerLawFit."""
    return _fit("paper", _paper_params, 2, n, loss, n_boot, seed, level, name)


def fit_offset(n, loss, n_boot: int = 200, seed: int = 0, level: float = 0.95,
               name: str = "") -> PowerLawFit:
    """Fit L = L_inf + (N/N_c)^-alpha on log L, bounds 0 <= L_inf < min L, 1e-4 <= alpha <= 5."""
    return _fit("offset", _offset_params, 4, n, loss, n_boot, seed, level, name)


def plot_scaling(points: dict[str, tuple], fits: list[PowerLawFit] = (), ax=None,
                 paper: bool = True, paper_lines: bool = False, xlabel: str = "training frames N",
                 ylabel: str = "best validation loss L"):
    """Log-log plot of points {name: (N, L)} with fit lines; the paper's exponents beside ours.

    paper: add a text box comparing our exponents with the paper's v2 fits (labelled as
    the paper's). paper_lines: also draw the paper's fitted curves (dashed grey); their loss
    scale belongs to real HCP / NSD data, not to ours.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    all_n = []
    for name, (n, loss) in points.items():
        ax.scatter(n, loss, label=name, zorder=3)
        all_n.append(np.asarray(n, float))
    grid = (np.geomspace(min(x.min() for x in all_n), max(x.max() for x in all_n), 100)
            if all_n else np.geomspace(1e5, 1e7, 100))
    for fit in fits:
        ax.plot(grid, fit.predict(grid), label=f"{fit.label()}  (R²={fit.r2:.3f})")
    if paper_lines:
        for name in PAPER_FITS:
            pf = paper_fit(name)
            ax.plot(grid, pf.predict(grid), ls="--", color="0.5", label=pf.label())
    if paper:
        lines = ["log-log slope (ours):"]
        for fit in fits:
            lo_hi = fit.ci.get("b") if fit.form == "paper" else fit.ci.get("alpha")
            ci = ""
            if lo_hi:
                lo, hi = (lo_hi if fit.form == "paper" else (-lo_hi[1], -lo_hi[0]))
                ci = f" [{lo:.3f}, {hi:.3f}]"
            lines.append(f"  {fit.name or fit.form}: {fit.exponent:.3f}{ci}")
        lines.append("paper v2 (real data, quoted):")
        lines += [f"  {k}: L=(N/{v['a']:g})^{v['b']}" for k, v in PAPER_FITS.items()]
        ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=7, va="bottom",
                family="monospace", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper right")
    return ax


# ---------------------------------------------------------------------------------------------
# the sweep: pretrain at a geometric series of data sizes
@dataclass
class SweepPoint:
    """One pretraining run of the sweep: ``size`` subjects (or runs), repeat ``repeat``."""

    size: int
    repeat: int
    items: list[str]  # the subjects (or run keys) trained on
    n_runs: int
    frames: int  # training frames N (TR 1 s)
    best_val: float  # best (lowest) validation loss over the run's evaluations, same site
    best_val_ood: float  # ... second site (out of distribution)
    steps: int
    seconds: float
    run_dir: str
    resumed: bool = False  # True when the result was read back from an earlier run
    stopped_early: bool = False  # the run ended by early stopping (its best validation loss stopped falling)
    # split -> predictor -> {"loss", "ci_low", "ci_high", "captured"} (synthetic when the cohort is)
    yardsticks: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SweepResult:
    points: list[SweepPoint]
    fits: dict  # "val" / "val_ood" -> {"paper": PowerLawFit | None, "offset": PowerLawFit | None}
    unit: str
    notes: list[str] = field(default_factory=list)

    def arrays(self, which: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """(N frames, best loss) of every point, for fits and plots."""
        key = "best_val" if which == "val" else "best_val_ood"
        pts = [p for p in self.points if math.isfinite(getattr(p, key))]
        return np.asarray([p.frames for p in pts], float), np.asarray([getattr(p, key) for p in pts], float)

    def rows(self) -> list[dict]:
        """One table row per point (losses are synthetic); with yardsticks, the in-distribution
        predict-zero and PCA losses and the share of each PCA's gain the point's MAE captured."""
        rows = []
        for p in self.points:
            row = {"size": p.size, "unit": self.unit, "repeat": p.repeat, "runs": p.n_runs, "frames N": p.frames,
                   "best val (synthetic)": round(p.best_val, 4), "best val OOD (synthetic)": round(p.best_val_ood, 4)}
            for name, y in ((p.yardsticks or {}).get("val") or {}).items():
                if name == "predict zero" or name.startswith("PCA-"):
                    row[f"val {name}"] = y["loss"]
                if name.startswith("PCA-"):
                    row[f"captured of {name}"] = y["captured"]
            rows.append({**row, "steps": p.steps, "stopped early": p.stopped_early, "seconds": round(p.seconds, 1),
                         "resumed": p.resumed})
        return rows

    def yardstick_rows(self) -> list[dict]:
        """One row per point, split and yardstick: its loss with the 95 % CI over clips, and the
        share of its gain over predicting zero that the point's MAE (best validation loss) captured."""
        from fmri_bench.yardsticks import SPLITS

        rows = []
        for p in self.points:
            for split, preds in (p.yardsticks or {}).items():
                best = p.best_val if split == "val" else p.best_val_ood
                where = {"size": p.size, "repeat": p.repeat, "frames N": p.frames, "split": SPLITS.get(split, split)}
                rows.append({**where, "predictor": "MAE (best val)", "loss": round(best, 4), "ci_low": None,
                             "ci_high": None, "MAE captured": None})
                for name, y in preds.items():
                    rows.append({**where, "predictor": name, "loss": y["loss"], "ci_low": y["ci_low"],
                                 "ci_high": y["ci_high"], "MAE captured": y["captured"]})
        return rows

    def learned(self, which: str = "val") -> list[bool] | None:
        """Per point: is its best loss below the lower end of predict-zero's 95 % CI on the same
        clips? None when the points have no yardsticks."""
        from fmri_bench.yardsticks import ZERO

        key = "best_val" if which == "val" else "best_val_ood"
        zero = [((p.yardsticks or {}).get(which) or {}).get(ZERO) for p in self.points]
        if not self.points or any(z is None for z in zero):
            return None
        return [getattr(p, key) < z["ci_low"] for p, z in zip(self.points, zero)]

    def verdict(self, which: str = "val") -> str:
        """What the sweep shows, read from the intervals: whether any point learned beyond
        predicting zero, the fitted slope's CI, and how the PCA yardstick (fitted on each point's
        own subset) moves over the same sizes."""
        learned = self.learned(which)
        where = "same site" if which == "val" else "second site"
        pca_part = None
        pcas = {k: v for k, v in self.yardstick_arrays(which).items() if k.startswith("PCA-")}
        if pcas:
            name = max(pcas, key=lambda k: int(k.split("-")[1]))
            n, loss = pcas[name]
            small, large = loss[n == n.min()].mean(), loss[n == n.max()].mean()
            pca_part = f"{name} on the same subsets goes from {small:.3f} to {large:.3f}"
        if learned is not None and not any(learned):
            data = (f" The data do reward size for a simple model: {pca_part}." if pca_part else "")
            return (f"{where}: no point's best loss is below predicting zero's 95 % CI, so at this budget the sweep "
                    f"measures optimisation, not data; no law is fitted.{data} (synthetic cohort)")
        parts = []
        if learned is not None:
            parts.append(f"{sum(learned)} of {len(learned)} points beat predicting zero")
        fit = (self.fits.get(which) or {}).get("paper")
        if fit is not None and "b" in fit.ci:
            lo, hi = fit.ci["b"]
            trend = "falls" if hi < 0 else "rises" if lo > 0 else "shows no trend its 95 % CI can tell from flat"
            parts.append(f"the loss {trend} with data (b = {fit.exponent:.4f}, CI [{lo:.4f}, {hi:.4f}])")
        if pca_part:
            parts.append(pca_part)
        return f"{where}: " + "; ".join(parts) + " (synthetic cohort)." if parts else f"{where}: nothing to read."

    def yardstick_arrays(self, which: str = "val") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """predictor -> (N frames, loss) over the points that have yardsticks, for the plot."""
        out: dict[str, tuple[list, list]] = {}
        for p in self.points:
            for name, y in ((p.yardsticks or {}).get(which) or {}).items():
                out.setdefault(name, ([], []))
                out[name][0].append(p.frames)
                out[name][1].append(y["loss"])
        return {k: (np.asarray(n, float), np.asarray(v, float)) for k, (n, v) in out.items()}

    def fit_rows(self) -> list[dict]:
        """One row per fit, ours (synthetic) and the paper's (real data, quoted)."""
        rows = []
        for which, fits in self.fits.items():
            for form, fit in fits.items():
                if fit is None:
                    rows.append({"data": f"ours {which} (synthetic)", "form": form, "fit": "n/a",
                                 "exponent": None, "95% CI": "", "R2": None})
                    continue
                # CI of the exponent (the log-log slope): b, or -alpha for the offset form
                lo_hi = fit.ci.get("b") if form == "paper" else (
                    None if "alpha" not in fit.ci else (-fit.ci["alpha"][1], -fit.ci["alpha"][0]))
                ci = "" if not lo_hi else f"[{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]"
                rows.append({"data": f"ours {which} (synthetic)", "form": form, "fit": fit.label(),
                             "exponent": round(fit.exponent, 4), "95% CI": ci, "R2": round(fit.r2, 3)})
        for name, p in PAPER_FITS.items():
            rows.append({"data": f"paper v2 {name} (real data, quoted)", "form": "paper",
                         "fit": f"L = (N/{p['a']:g})^{p['b']}", "exponent": p["b"], "95% CI": "", "R2": None})
        return rows

    def to_dict(self) -> dict:
        return {"unit": self.unit, "points": [p.to_dict() for p in self.points], "notes": self.notes,
                "fits": {w: {f: (None if v is None else v.to_dict()) for f, v in d.items()}
                         for w, d in self.fits.items()}}


def sweep_pool(shards: dict, unit: str = "subjects") -> list[str]:
    """What a sweep draws its subsets from: the subjects (or run keys) of ``shards["train"]``, sorted."""
    from fmri_bench.harness.datasets import scan_runs

    if unit not in ("subjects", "runs"):
        raise InputError(f"unit must be 'subjects' or 'runs', got {unit!r}")
    runs = scan_runs(shards["train"])
    return sorted({r.subject for r in runs}) if unit == "subjects" else sorted(r.key for r in runs)


def sweep_subsets(pool: list[str], sizes, repeats: int, seed: int = 0) -> dict[tuple[int, int], list[str]]:
    """(size, repeat) -> items. Repeats of a size are disjoint while the pool allows
    (size x repeats <= pool), otherwise independent random draws."""
    pool = sorted(pool)
    out = {}
    for n in sizes:
        n = int(n)
        if not 1 <= n <= len(pool):
            raise InputError(f"sweep size {n} is outside 1..{len(pool)} (the training pool)")
        perm = np.random.default_rng((seed, n)).permutation(len(pool))
        for r in range(repeats):
            if n * repeats <= len(pool):
                idx = perm[r * n:(r + 1) * n]
            else:
                idx = np.random.default_rng((seed, n, r)).permutation(len(pool))[:n]
            out[(n, r)] = sorted(pool[i] for i in idx)
    return out


def _write_subset(src_urls, keys: set[str], out: Path) -> int:
    """Copy the runs ``keys`` from shards into ``out`` (once; a finished copy is reused)."""
    from fmri_bench.shards import ShardWriter, _raw_samples, expand_urls

    done = out / "keys.json"
    if done.exists() and set(json.loads(done.read_text())) == keys:
        return len(keys)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    with ShardWriter(out, shard_size=8) as w:
        for raw in _raw_samples(expand_urls(src_urls)):
            if raw["__key__"] in keys:
                w.write_encoded({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
    atomic_save(lambda tmp: tmp.write_text(json.dumps(sorted(keys))), done)
    return len(keys)


def _best(history: list[dict], key: str) -> float:
    vals = [r[key] for r in history if r.get(key) is not None]
    return float(min(vals)) if vals else math.nan


def run_sweep(sizes, shards: dict, out_dir, repeats: int = 1, unit: str = "subjects",
              train_overrides: dict | None = None, seed: int = 0, n_boot: int = 200,
              progress: bool = False, yardstick_config=None, cohort=None) -> SweepResult:
    """Pretrain at each size (and repeat), record the best val / val-OOD loss, fit both laws.

    shards: {"train", "val", "val_ood"} shard directories (``harness.cohort_shards``); the
    sizes count training subjects (``unit="subjects"``) or runs (``unit="runs"``, for cohorts
    too small for four subject counts). train_overrides: TrainConfig fields (steps, batch_size,
    model, ...). Each point lives in ``out_dir/n{size}_r{repeat}``: a finished point
    (``result.json`` with the same subset and config) is read back, an interrupted one resumes
    from its checkpoint. -> SweepResult; also written to ``out_dir/sweep.json``.
    yardstick_config: a ``yardsticks.YardstickConfig``: each point's yardsticks (kept in its
    ``result.json``, computed again only when the yardstick settings change; never a reason to
    retrain); cohort: the simulated cohort the shards come from, for the oracles (None: none).
    """
    from fmri_bench.harness.datasets import scan_runs
    from fmri_bench.train import TrainConfig, train

    if unit not in ("subjects", "runs"):
        raise InputError(f"unit must be 'subjects' or 'runs', got {unit!r}")
    out_dir = Path(out_dir)
    runs = scan_runs(shards["train"])
    pool = sweep_pool(shards, unit)
    subsets = sweep_subsets(pool, sizes, repeats, seed)
    frames_of = {r.key: r.n_frames for r in runs}
    base = {"model": "mae_vit_tiny", "progress": False, "figures": False, **(train_overrides or {})}
    data = {"downsample": 2, **base.pop("data", {})}
    points = []
    oracle = None
    if yardstick_config is not None and cohort is not None:
        from fmri_bench.yardsticks import CohortOracle

        oracle = CohortOracle(cohort)  # one for all points: it caches the regenerated runs
    val_cache: dict = {}  # the points' validation clips, read once
    for (n, r), items in subsets.items():
        keys = {x.key for x in runs if (x.subject if unit == "subjects" else x.key) in items}
        point_dir = out_dir / f"n{n:04d}_r{r}"
        cfg = TrainConfig.from_dict({**base, "seed": seed + r, "data": {
            **data, "train_urls": [str(point_dir / "shards")], "val_urls": [shards["val"]],
            "val_ood_urls": [shards["val_ood"]]}})
        spec = {"items": items, "config": cfg.to_dict()}
        result, started = point_dir / "result.json", point_dir / "spec.json"
        if result.exists() and json.loads(result.read_text()).get("spec") == spec:
            done = json.loads(result.read_text())
            p = SweepPoint(**{**done["point"], "resumed": True})
            if yardstick_config is not None:
                _point_yardsticks(p, cfg, done, result, yardstick_config, oracle, val_cache)
            points.append(p)
            continue
        if point_dir.exists() and not (started.exists() and json.loads(started.read_text()) == spec):
            shutil.rmtree(point_dir)  # a point of another subset or config: train this one afresh
        t0 = time.perf_counter()
        point_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(lambda tmp: tmp.write_text(json.dumps(spec)), started)  # an interrupted point resumes
        _write_subset(shards["train"], keys, point_dir / "shards")
        metrics = train(cfg, point_dir / "run", resume=True)
        p = SweepPoint(n, r, items, len(keys), int(sum(frames_of[k] for k in keys)),
                       _best(metrics["history"], "val_loss"), _best(metrics["history"], "val_ood_loss"),
                       int(metrics["step"]), time.perf_counter() - t0, str(point_dir),
                       stopped_early=bool(metrics.get("stopped_early")))
        done = {"spec": spec, "point": p.to_dict()}
        text = json.dumps(done, indent=1)
        atomic_save(lambda tmp: tmp.write_text(text), result)
        if yardstick_config is not None:
            _point_yardsticks(p, cfg, done, result, yardstick_config, oracle, val_cache)
        points.append(p)
    res = SweepResult(points, {}, unit)
    for which in ("val", "val_ood"):
        n, loss = res.arrays(which)
        learned = res.learned(which)
        if learned is not None and not any(learned):
            res.fits[which] = {"paper": None, "offset": None}
            res.notes.append(f"{which}: no point beats predicting zero (its 95 % CI): no law fitted")
            continue
        with np.errstate(all="ignore"):  # a flat sweep (tiny runs) gives a ~0 slope and a -> inf
            res.fits[which] = _sweep_fits(res, which, n, loss, n_boot, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res.to_dict(), indent=1, default=float)
    atomic_save(lambda tmp: tmp.write_text(text), out_dir / "sweep.json")
    return res


def _point_yardsticks(p: SweepPoint, cfg, done: dict, result: Path, ycfg, oracle, val_cache: dict) -> None:
    """Attach the point's yardsticks (computed once per yardstick config, kept in result.json)."""
    from fmri_bench.yardsticks import ZERO, YardstickReport, yardsticks

    stored = done.get("yardsticks")
    wanted = {"config": ycfg.to_dict(), "oracle": oracle is not None}
    if stored and stored.get("wanted") == wanted:
        report = YardstickReport.from_dict(stored["report"])
    else:
        report = yardsticks(cfg, config=ycfg, oracle=oracle, source="synthetic" if oracle is not None else None,
                            batches=val_cache)
        text = json.dumps({**done, "yardsticks": {"wanted": wanted, "report": report.to_dict()}}, indent=1)
        atomic_save(lambda tmp: tmp.write_text(text), result)
    p.yardsticks = {}
    for split in report.losses:
        best = p.best_val if split == "val" else p.best_val_ood
        p.yardsticks[split] = {}
        for name in report.predictors(split):
            m, lo, hi = report.loss(split, name)
            cap = None if name == ZERO else report.captured(split, name, model_loss=best)
            p.yardsticks[split][name] = {"loss": round(m, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                                         "captured": None if cap is None else round(cap[0], 3)}


def draw_point_yardsticks(ax, res: SweepResult, which: str = "val"):
    """Each yardstick of the sweep's points against N (open markers, thin lines), on a scaling plot."""
    from fmri_bench.yardsticks import line_style

    for i, (name, (n, loss)) in enumerate(res.yardstick_arrays(which).items()):
        order = np.argsort(n, kind="stable")
        ax.plot(n[order], loss[order], marker="o", mfc="none", ms=4, lw=1, label=f"{name} ({which}, synthetic)",
                **line_style(name, i))
    ax.legend(fontsize=6, loc="upper right")
    return ax


def _sweep_fits(res: SweepResult, which: str, n, loss, n_boot: int, seed: int) -> dict:
    """Both laws on one set of points; the offset law needs 4 distinct sizes, and is dropped when
    it does not fit: N_c at its bound or R^2 < 0 (worse than a constant; a flat sweep). Each
    dropped fit leaves a note."""
    fits = {"paper": None, "offset": None}
    if len(np.unique(n)) >= 2:
        fits["paper"] = fit_paper(n, loss, n_boot=n_boot, seed=seed, name=f"{which} (synthetic)")
    if len(np.unique(n)) < 4:
        res.notes.append(f"{which}: the offset law needs 4 distinct sizes, have {len(np.unique(n))}")
        return fits
    fit = fit_offset(n, loss, n_boot=n_boot, seed=seed, name=f"{which} offset (synthetic)")
    log_nc = math.log(fit.params["N_c"]) if fit.params["N_c"] > 0 else -math.inf
    if abs(log_nc) > 99 or not fit.r2 >= 0:
        res.notes.append(f"{which}: the offset law does not fit these points (R2 {fit.r2:.2f}, N_c "
                         f"{fit.params['N_c']:.3g}): no saturating trend to fit")
    else:
        fits["offset"] = fit
    return fits
