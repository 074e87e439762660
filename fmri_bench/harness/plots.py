"""What the benchmark chapters plot: confusion matrices, where a probe finds its evidence on the
flat map, and scores with their intervals, chance and ground truth."""

from __future__ import annotations

import math

import numpy as np

from fmri_bench.errors import InputError
from fmri_bench.probe import ProbeResult
from fmri_bench.results import Record


def token_evidence(result: ProbeResult, patch: np.ndarray, labels: np.ndarray, grid_hw) -> np.ndarray:
    """Where on the flat map a linear probe on ``avg_patch`` finds its evidence.

    avg_patch is the mean of the brain tokens, so the chosen head's logit for class c splits
    into one term per token: (w_c / sigma) . token / n_brain. The map shows that term minus its
    mean over classes (softmax ignores what all classes share), averaged over the clips of
    class c. patch: (N, L, D) tokens of the same clips, labels: (N,) -> (C, h, w) maps.
    """
    head = result.heads.heads[result.best_index]
    if not hasattr(head, "linear") or result.head != "linear":
        raise InputError("token_evidence needs a linear head on avg_patch features")
    w = head.linear.weight.detach().cpu().numpy() / result.heads.std.cpu().numpy()  # (C, D)
    brain = np.abs(patch).sum(-1) > 0  # (N, L)
    n_brain = np.maximum(brain.sum(1, keepdims=True), 1)
    contrib = np.einsum("nld,cd->ncl", patch, w) / n_brain[:, None]  # (N, C, L)
    contrib = contrib - contrib.mean(1, keepdims=True)
    C = w.shape[0]
    out = np.zeros((C, patch.shape[1]))
    for c in range(C):
        sel = labels == c
        if sel.any():
            out[c] = contrib[sel, c].mean(0)
    return out.reshape(C, *grid_hw)


def confusion(results: list[ProbeResult]) -> np.ndarray:
    """Test confusion matrix (C, C) summed over splits, rows true class."""
    return np.sum([r.confusion for r in results], axis=0)


def class_accuracy(conf: np.ndarray, names: list[str]) -> list[dict]:
    """Rows {class, test clips, accuracy %} from a confusion matrix (rows true class)."""
    with np.errstate(invalid="ignore"):
        acc = np.diag(conf) / conf.sum(1)
    return [{"class": n, "test clips": int(c), "accuracy %": round(100 * float(a), 1)}
            for n, c, a in zip(names, conf.sum(1), acc)]


def plot_confusion(conf: np.ndarray, names: list[str], ax=None, title: str = ""):
    """Row-normalised confusion matrix with the per-class accuracy on the diagonal."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2.5))
    with np.errstate(invalid="ignore"):
        norm = conf / conf.sum(1, keepdims=True)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, label="fraction of the true class")
    return ax


def plot_class_maps(evidence: np.ndarray, names: list[str], mask=None, truth=None, max_classes: int = 6):
    """Evidence maps (C, h, w) on the token grid, upsampled to the flat map; ``truth`` (C, H, W)
    beside them when given (the true condition maps, synthetic)."""
    import matplotlib.pyplot as plt

    C = min(len(names), max_classes)
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, C, figsize=(2.6 * C, 1.5 * rows + 0.4), squeeze=False)
    for c in range(C):
        ev = evidence[c]
        if mask is not None:
            f = mask.shape[0] // ev.shape[0]
            ev = np.where(mask, np.kron(ev, np.ones((f, f)))[:mask.shape[0], :mask.shape[1]], np.nan)
        v = np.nanmax(np.abs(ev)) or 1.0
        axes[0, c].imshow(ev, cmap="RdBu_r", vmin=-v, vmax=v)
        axes[0, c].set_title(f"{names[c]}: MAE evidence", fontsize=7)
        if truth is not None:
            t = truth[c] if mask is None else np.where(mask, truth[c], np.nan)
            v = np.nanmax(np.abs(t)) or 1.0
            axes[1, c].imshow(t, cmap="RdBu_r", vmin=-v, vmax=v)
            axes[1, c].set_title(f"{names[c]}: true map", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_scores(records: list[Record], ax=None, title: str = ""):
    """Horizontal bars of each record's mean with its 95 % CI, chance and the truth's score marked."""
    import matplotlib.pyplot as plt

    recs = [r for r in records if math.isfinite(r.mean)]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.28 * len(recs) + 1.2))
    y = np.arange(len(recs))
    mean = np.asarray([100 * r.mean for r in recs])
    lo = np.asarray([100 * max(r.ci_low, 0) if r.n > 1 and math.isfinite(r.ci_low) else 100 * r.mean for r in recs])
    hi = np.asarray([100 * min(r.ci_high, 1) if r.n > 1 and math.isfinite(r.ci_high) else 100 * r.mean for r in recs])
    ax.barh(y, mean, xerr=[mean - lo, hi - mean], color="tab:blue", alpha=0.7, ecolor="0.3")
    for i, r in enumerate(recs):
        if r.chance is not None:
            ax.plot([100 * r.chance] * 2, [i - 0.4, i + 0.4], color="k", lw=1)
        if r.truth is not None and math.isfinite(r.truth):
            ax.plot([100 * r.truth] * 2, [i - 0.4, i + 0.4], color="tab:green", lw=1.5)
    ax.set_yticks(y, [f"{r.task} | {r.method}" for r in recs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{recs[0].metric if recs else 'score'} % (black: chance, green: the known truth)")
    ax.set_title(title, fontsize=9)
    return ax
