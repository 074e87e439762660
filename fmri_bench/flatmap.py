"""Vertices <-> flat-map pixels: a precomputed sparse rasteriser for one surface space.

In: vertex data (T, V) of a space (see ``fmri_bench.surfaces``). Out: flat-map frames, either
(T, n_pixels) values of the in-cortex pixels in row-major mask order (the ``bold.npy`` layout of
the shards) or (T, H, W) images, and back from pixels to vertices.

The operator follows the flat-map MAE paper's pipeline (Lane et al., arXiv 2510.13768; code
MedARC-AI/fmri-fm): keep the cortex vertices, drop the flat-mesh triangles whose longest edge is >= ``max_edge_mm`` (cuts and
stretched seams), lay a grid of square pixels over the flat map (upper-left origin), and give
every pixel whose centre lies in a kept triangle the linear (barycentric) interpolation of that
triangle's three vertex values. The weights are written once as a sparse (n_pixels, V) matrix
with 3 non-zeros per row, so every frame is one sparse mat-vec; the operator is cached on disk
under a hash of everything it depends on. Upstream calls ``scipy.interpolate.
LinearNDInterpolator`` per run instead, which interpolates on its own Delaunay triangulation of
the vertices: it gives the same numbers wherever that triangle is the mesh triangle (~75 % of
the fs_LR 32k pixels: the flattened mesh is not Delaunay everywhere) and uses triangles that
are not in the mesh elsewhere; here the mesh's own triangles are used everywhere.

Speed: frames stay row-major (T, V) -> (T, n_pixels). The kernel (numba, compiled on first use
in ~0.5 s, nothing written to disk) takes four frames per pass over the operator, so the
operator's (n_pixels, 3) vertex indices and weights are read once for four output rows, and it
writes each output value once (no zero-fill, no read-back); frames are split over a few threads
(the kernel releases the GIL). Results equal scipy's CSR mat-vec bit for bit (same summation
order, no fast-math); without numba, scipy's kernel is used. Transposing the batch to (V, T) for
one sparse mat-mat product costs more in the two transposes than it saves
(benchmarks/bench_flatmap.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

try:  # scipy's CSR mat-vec kernel; it accumulates into a given output and releases the GIL
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - private module moved: fall back to the public product
    _csr_matvec = None

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save, cache_dir
from fmri_bench.surfaces import FlatSurface, canonical_space, load_surface

# Bump when the rasterisation changes: it is part of the cache key.
OPERATOR_VERSION = 1

# Upstream grid for 32k_fs_LR (224 x 560 pixels).
DEFAULT_SHAPE = {"fs_LR_32k": (224, 560)}
# Other spaces: pixel size chosen so the width is about this many pixels.
DEFAULT_WIDTH = 560
# Grid sides are rounded up to a multiple of the ViT patch size.
GRID_MULTIPLE = 16
# Point-in-triangle tolerance on barycentric coordinates (pixel centres on an edge count).
_BARY_EPS = 1e-9
# Frames below this count are rasterised on the calling thread.
_MIN_FRAMES_PER_THREAD = 8
# Frames per float32 scratch block when the output has another dtype.
_SCRATCH_FRAMES = 16


def triangle_longest_edge(coords: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """coords: (V, 2), faces: (F, 3) -> (F,) longest edge length of each triangle."""
    tri = coords[faces]  # (F, 3, 2)
    edges = tri - np.roll(tri, -1, axis=1)
    return np.sqrt((edges**2).sum(-1)).max(axis=1)


def rasterize(
    coords: np.ndarray,
    faces: np.ndarray,
    bbox: tuple[float, float, float, float],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Barycentric weights of the pixel centres that fall inside the triangles.

    coords: (V, 2) flat coords; faces: (F, 3); bbox: (xmin, xmax, ymin, ymax); shape: (H, W).
    Pixel (i, j) has its centre at x = xmin + (j + 0.5) * px, y = ymax - (i + 0.5) * py.
    Returns pix (P,) row-major flat pixel index (sorted), verts (P, 3) int32 vertex indices and
    weights (P, 3) float64 barycentric coordinates (>= 0, rows sum to 1). A pixel centre that
    lies in several triangles (on a shared edge, or where the flat mesh folds over itself)
    takes the lowest-numbered triangle. Degenerate (zero-area) triangles are skipped.
    """
    H, W = shape
    xmin, xmax, ymin, ymax = bbox
    px, py = (xmax - xmin) / W, (ymax - ymin) / H
    tri = coords[faces]  # (F, 3, 2)
    # continuous pixel coordinates: the centre of pixel (i, j) is at (col, row) = (j, i)
    col = (tri[..., 0] - xmin) / px - 0.5
    row = (ymax - tri[..., 1]) / py - 0.5
    c0 = np.clip(np.ceil(col.min(1) - 1e-7), 0, W).astype(np.int64)
    c1 = np.clip(np.floor(col.max(1) + 1e-7), -1, W - 1).astype(np.int64)
    r0 = np.clip(np.ceil(row.min(1) - 1e-7), 0, H).astype(np.int64)
    r1 = np.clip(np.floor(row.max(1) + 1e-7), -1, H - 1).astype(np.int64)
    ncol = np.maximum(c1 - c0 + 1, 0)
    n = ncol * np.maximum(r1 - r0 + 1, 0)  # candidate pixels per triangle (its bbox)

    # every (triangle, candidate pixel) pair, vectorised
    fid = np.repeat(np.arange(len(faces)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    ncol_k = np.maximum(np.repeat(ncol, n), 1)
    prow = np.repeat(r0, n) + k // ncol_k
    pcol = np.repeat(c0, n) + k % ncol_k
    a, b, c = tri[fid, 0], tri[fid, 1], tri[fid, 2]
    p = np.stack([xmin + (pcol + 0.5) * px, ymax - (prow + 0.5) * py], axis=1)
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    ok = np.abs(den) > 1e-12
    den = np.where(ok, den, 1.0)
    l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    l0 = 1.0 - l1 - l2
    inside = ok & (l0 >= -_BARY_EPS) & (l1 >= -_BARY_EPS) & (l2 >= -_BARY_EPS)

    pix = prow[inside] * W + pcol[inside]
    fid = fid[inside]
    lam = np.clip(np.stack([l0, l1, l2], axis=1)[inside], 0.0, 1.0)
    lam /= lam.sum(1, keepdims=True)
    order = np.lexsort((fid, pix))  # by pixel, then lowest triangle first
    pix, fid, lam = pix[order], fid[order], lam[order]
    first = np.ones(len(pix), dtype=bool)
    first[1:] = pix[1:] != pix[:-1]
    return pix[first], faces[fid[first]].astype(np.int32), lam[first]


def _default_grid(
    coords: np.ndarray,
    space: str,
    pixel_size: float | None,
    shape: tuple[int, int] | None,
) -> tuple[float, tuple[int, int], tuple[float, float, float, float]]:
    """Pixel size, shape and bbox centred on the cortex so that the cortex fills the grid."""
    lo, hi = coords.min(0), coords.max(0)
    extent, mid = hi - lo, 0.5 * (lo + hi)
    if shape is None:
        shape = DEFAULT_SHAPE.get(space) if pixel_size is None else None
    if shape is None:
        if pixel_size is None:
            pixel_size = np.ceil(extent[0] / DEFAULT_WIDTH * 100) / 100
        H, W = (int(np.ceil(e / pixel_size / GRID_MULTIPLE) * GRID_MULTIPLE) for e in extent[::-1])
        shape = (H, W)
    H, W = shape
    if pixel_size is None:
        # smallest pixel (to 0.01 mm) with the whole cortex inside the grid
        pixel_size = float(np.ceil(max(extent[0] / W, extent[1] / H) * 100) / 100)
    pixel_size = float(pixel_size)
    bbox = (
        float(mid[0] - W * pixel_size / 2),
        float(mid[0] + W * pixel_size / 2),
        float(mid[1] - H * pixel_size / 2),
        float(mid[1] + H * pixel_size / 2),
    )
    return pixel_size, (int(H), int(W)), bbox


def _surface_hash(surf: FlatSurface) -> str:
    h = hashlib.sha256()
    for a in (surf.coords, surf.faces, surf.hemi, surf.mesh_index):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="flatmap")


# a forked child (convert's worker processes) has no pool threads: give it a fresh pool
os.register_at_fork(after_in_child=_pool.cache_clear)


@functools.lru_cache(maxsize=1)
def _raster_kernel():
    """The compiled rasteriser ``kernel(x, verts, weights, out, start, stop)``, or None when
    numba is missing (then scipy's CSR mat-vec is used). Compiled lazily: importing
    fmri_bench.flatmap stays cheap, and a forked worker inherits the compiled code."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; this is the safety net
        return None

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def kernel(x, verts, w, out, start, stop):
        # out[t, p] = w[p, 0] x[t, v[p, 0]] + w[p, 1] x[t, v[p, 1]] + w[p, 2] x[t, v[p, 2]],
        # summed left to right like scipy's CSR kernel; four frames per pass over (verts, w)
        n = verts.shape[0]
        t = start
        while t + 4 <= stop:
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
            o0, o1, o2, o3 = out[t], out[t + 1], out[t + 2], out[t + 3]
            for p in range(n):
                a, b, c = verts[p, 0], verts[p, 1], verts[p, 2]
                wa, wb, wc = w[p, 0], w[p, 1], w[p, 2]
                o0[p] = wa * x0[a] + wb * x0[b] + wc * x0[c]
                o1[p] = wa * x1[a] + wb * x1[b] + wc * x1[c]
                o2[p] = wa * x2[a] + wb * x2[b] + wc * x2[c]
                o3[p] = wa * x3[a] + wb * x3[b] + wc * x3[c]
            t += 4
        while t < stop:
            xt, ot = x[t], out[t]
            for p in range(n):
                ot[p] = w[p, 0] * xt[verts[p, 0]] + w[p, 1] * xt[verts[p, 1]] + w[p, 2] * xt[verts[p, 2]]
            t += 1

    return kernel


def compile_kernel() -> bool:
    """Compile the rasteriser now (~0.5 s once per process) -> whether it is available. Call
    before forking workers: they inherit the compiled code instead of each compiling it."""
    kernel = _raster_kernel()
    if kernel is not None:
        one = np.zeros((1, 3), np.float32)
        kernel(np.zeros((1, 1), np.float32), np.zeros((1, 3), np.int32), one, np.zeros((1, 1), np.float32), 0, 1)
    return kernel is not None


class FlatMapper:
    """Sparse barycentric rasteriser between the cortex vertices of a space and a pixel grid.

    space: "fs_LR_32k" (default grid 224 x 560), "fsaverage5", a pycortex subject ("S1"), or
    a ``FlatSurface`` (e.g. a tiny test mesh).
    pixel_size (mm) / shape (H, W) / bbox (xmin, xmax, ymin, ymax, mm): any left as None is
    chosen so that the cortex fills the grid, centred (other spaces: width ~560 pixels, sides
    multiples of 16). max_edge_mm: triangles with an edge >= this are dropped (upstream 16 mm).
    cache: read / write the operator under ``cache_dir()/flatmap``. threads: worker threads
    for ``to_pixels`` (default min(4, cpu count)).

    Attributes: surface (FlatSurface), space, shape (H, W), pixel_size, bbox, max_edge_mm,
    mask (H, W) bool, n_pixels, n_vertices, operator (n_pixels, V) float32 CSR with 3 non-zeros
    per row, pixel_index (n_pixels,) row-major index of the mask pixels, cache_key, cache_path,
    cache_hit (whether the operator came from disk), n_faces_kept, use_kernel (True: the
    compiled rasteriser; False: scipy's CSR mat-vec, bit-identical and slower).
    """

    def __init__(
        self,
        space: str = "fs_LR_32k",
        pixel_size: float | None = None,
        shape: tuple[int, int] | None = None,
        max_edge_mm: float = 16.0,
        cache: bool = True,
        *,
        bbox: tuple[float, float, float, float] | None = None,
        threads: int | None = None,
    ):
        if isinstance(space, FlatSurface):
            self.space, self.surface = space.name, space
        else:
            self.space = canonical_space(space)
            self.surface = load_surface(self.space)
        surf = self.surface
        self.max_edge_mm = float(max_edge_mm)
        if bbox is not None and (pixel_size is None) == (shape is None):
            raise InputError("FlatMapper: with bbox give exactly one of pixel_size or shape")
        if bbox is not None:
            # square pixels from (xmin, ymin): xmax / ymax snap to whole pixels, as upstream
            xmin, xmax, ymin, ymax = (float(v) for v in bbox)
            if shape is None:
                shape = (round((ymax - ymin) / pixel_size), round((xmax - xmin) / pixel_size))
            else:
                pixel_size = (xmax - xmin) / shape[1]
            self.bbox = (xmin, xmin + shape[1] * pixel_size, ymin, ymin + shape[0] * pixel_size)
        else:
            pixel_size, shape, self.bbox = _default_grid(surf.coords, self.space, pixel_size, shape)
        self.pixel_size = float(pixel_size)
        self.shape = (int(shape[0]), int(shape[1]))
        if min(self.shape) < 1 or self.pixel_size <= 0:
            raise InputError(f"FlatMapper: bad grid shape {self.shape} / pixel size {self.pixel_size}")
        self.threads = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))
        self.use_kernel = True  # False: scipy's CSR mat-vec (the same numbers, slower)

        key = {
            "version": OPERATOR_VERSION,
            "space": self.space,
            "surface": _surface_hash(surf),
            "pixel_size": round(self.pixel_size, 9),
            "shape": list(self.shape),
            "bbox": [round(v, 9) for v in self.bbox],
            "max_edge_mm": self.max_edge_mm,
        }
        self.cache_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.cache_path = cache_dir() / "flatmap" / f"{self.space.replace(':', '-')}_{self.cache_key}.npz"
        self.cache_hit = False
        arrays = None
        if cache and self.cache_path.is_file():
            try:
                with np.load(self.cache_path) as z:
                    arrays = {k: z[k] for k in z.files}
                self.cache_hit = True
            except (OSError, ValueError, KeyError):
                arrays = None  # a damaged cache file is rebuilt
        if arrays is None:
            arrays = self._build()
            if cache:
                atomic_save(lambda tmp: np.savez(tmp, **arrays), self.cache_path)
        self._set_operator(arrays)

    # -- construction -------------------------------------------------------------------------
    def _build(self) -> dict[str, np.ndarray]:
        surf = self.surface
        keep = triangle_longest_edge(surf.coords, surf.faces) < self.max_edge_mm
        pix, verts, lam = rasterize(surf.coords, surf.faces[keep], self.bbox, self.shape)
        return {
            "pixel_index": pix.astype(np.int64),
            "verts": verts,
            "weights": lam.astype(np.float32),
            "n_faces_kept": np.array(int(keep.sum())),
        }

    def _set_operator(self, arrays: dict[str, np.ndarray]) -> None:
        self.pixel_index = arrays["pixel_index"]
        self.n_faces_kept = int(arrays["n_faces_kept"])
        verts, weights = arrays["verts"], arrays["weights"]
        P, V = len(self.pixel_index), self.surface.n_vertices
        self.mask = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        self.mask[self.pixel_index] = True
        self.mask = self.mask.reshape(self.shape)
        self._verts = np.ascontiguousarray(verts, dtype=np.int32).reshape(P, 3)
        self._weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(P, 3)
        self.operator = sp.csr_matrix(
            (self._weights.ravel(), self._verts.ravel(), np.arange(0, 3 * P + 1, 3, dtype=np.int32)),
            shape=(P, V),
        )

    @property
    def n_pixels(self) -> int:
        return len(self.pixel_index)

    @property
    def n_vertices(self) -> int:
        return self.surface.n_vertices

    # -- vertices -> pixels -------------------------------------------------------------------
    def _as_frames(self, x, n: int, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != n:
            raise InputError(f"{what}: expected (T, {n}) or ({n},) for space {self.space}, got {x.shape}")
        return x

    def to_pixels(self, x, out: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
        """x: (T, V) | (V,) vertex values -> (T, n_pixels) ``dtype``, mask pixels in row-major order.

        A 1-D x is one frame (T = 1); values are taken as float32 (the operator's precision).
        ``out`` (T, n_pixels), C-contiguous, may be given to reuse a buffer (its dtype wins). An
        output other than float32 is filled through a small float32 scratch block per thread, so
        no full-size float32 temporary is made.
        """
        x = self._as_frames(x, self.n_vertices, "to_pixels")
        x = np.ascontiguousarray(x, dtype=np.float32)
        T = len(x)
        if out is None:
            out = np.empty((T, self.n_pixels), dtype=dtype)
        elif out.shape != (T, self.n_pixels) or not out.flags.c_contiguous:
            raise InputError(f"to_pixels: out must be C-contiguous with shape {(T, self.n_pixels)}")
        n_threads = min(self.threads, max(1, T // _MIN_FRAMES_PER_THREAD))
        if n_threads == 1:
            self._rasterize_frames(x, out, 0, T)
        else:
            bounds = np.linspace(0, T, n_threads + 1).astype(int)
            jobs = [
                _pool(self.threads).submit(self._rasterize_frames, x, out, int(a), int(b))
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            for job in jobs:
                job.result()
        return out

    def _rasterize_frames(self, x: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        """out[t] = operator @ x[t] for t in [start, stop); x float32 C-contiguous."""
        if out.dtype == np.float32:
            self._rasterize_f32(x, out, start, stop)
            return
        buf = np.empty((_SCRATCH_FRAMES, self.n_pixels), dtype=np.float32)
        for c0 in range(start, stop, _SCRATCH_FRAMES):
            c1 = min(c0 + _SCRATCH_FRAMES, stop)
            self._rasterize_f32(x[c0:c1], buf, 0, c1 - c0)
            out[c0:c1] = buf[: c1 - c0]

    def _rasterize_f32(self, x: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        """float32 frames [start, stop) of x into the same rows of float32 ``out``."""
        kernel = _raster_kernel() if self.use_kernel else None
        if kernel is not None:
            kernel(x, self._verts, self._weights, out, start, stop)
            return
        A = self.operator  # scipy's kernel accumulates into its output, so zero it first
        out[start:stop] = 0.0
        for t in range(start, stop):
            if _csr_matvec is None:  # pragma: no cover - private scipy module moved
                out[t] += A @ x[t]
            else:
                _csr_matvec(A.shape[0], A.shape[1], A.indptr, A.indices, A.data, x[t], out[t])

    def pixels_to_image(self, p, fill: float = 0.0) -> np.ndarray:
        """p: (T, n_pixels) | (n_pixels,) -> (T, H, W) float32, ``fill`` outside the mask."""
        p = self._as_frames(p, self.n_pixels, "pixels_to_image")
        img = np.full((len(p), self.shape[0] * self.shape[1]), fill, dtype=np.float32)
        img[:, self.pixel_index] = p
        return img.reshape(len(p), *self.shape)

    def to_image(self, x, fill: float = 0.0) -> np.ndarray:
        """x: (T, V) | (V,) vertex values -> (T, H, W) float32 images, ``fill`` outside the mask."""
        return self.pixels_to_image(self.to_pixels(x), fill=fill)

    # -- pixels -> vertices -------------------------------------------------------------------
    @functools.cached_property
    def uncovered(self) -> np.ndarray:
        """(V,) bool: cortex vertices no mask pixel takes weight from (in cuts, isolated)."""
        return np.asarray(self.operator.sum(axis=0)).ravel() <= 0

    @functools.cached_property
    def inverse_operator(self) -> sp.csr_matrix:
        """(V, n_pixels) float32: the back-projection used by ``to_vertices``.

        Row v averages the pixels that vertex v contributes to, each weighted by v's barycentric
        weight there (the column-normalised transpose of ``operator``). Smooth maps come back
        with a small error; every vertex is a convex mix of pixel values so nothing overshoots.
        Vertices covered by no pixel take the nearest mask pixel centre (flat distance), so a
        back-projected map has no holes; ``uncovered`` says which vertices those are.
        """
        from scipy.spatial import cKDTree

        At = self.operator.T.tocsr().astype(np.float64)
        colsum = np.asarray(At.sum(axis=1)).ravel()
        unc = self.uncovered
        scale = np.where(unc, 0.0, 1.0 / np.where(unc, 1.0, colsum))
        R = sp.diags(scale) @ At
        if unc.any():
            centres = self.pixel_centres()
            _, nearest = cKDTree(centres).query(self.surface.coords[unc])
            R = R + sp.csr_matrix(
                (np.ones(unc.sum()), (np.flatnonzero(unc), nearest)), shape=R.shape
            )
        return sp.csr_matrix(R, dtype=np.float32)

    def to_vertices(self, img) -> np.ndarray:
        """img: (T, H, W) | (H, W) | (T, n_pixels) | (n_pixels,) -> (T, V) float32 vertex values."""
        img = np.asarray(img)
        if img.shape[-2:] == self.shape:
            img = img.reshape(-1, self.shape[0] * self.shape[1])[:, self.pixel_index]
        p = self._as_frames(img, self.n_pixels, "to_vertices").astype(np.float32, copy=False)
        return np.ascontiguousarray((self.inverse_operator @ p.T).T, dtype=np.float32)

    # -- grid ---------------------------------------------------------------------------------
    def pixel_centres(self) -> np.ndarray:
        """(n_pixels, 2) flat x, y (mm) of the mask pixel centres, row-major mask order."""
        H, W = self.shape
        rows, cols = np.divmod(self.pixel_index, W)
        xmin, xmax, ymin, ymax = self.bbox
        return np.stack(
            [xmin + (cols + 0.5) * (xmax - xmin) / W, ymax - (rows + 0.5) * (ymax - ymin) / H], axis=1
        )

    def grid_meta(self) -> dict:
        """The grid as plain JSON types, for a shard's meta.json."""
        return {
            "space": self.space,
            "shape": list(self.shape),
            "bbox": [float(v) for v in self.bbox],
            "pixel_size": self.pixel_size,
            "max_edge_mm": self.max_edge_mm,
            "n_pixels": self.n_pixels,
            "origin": "upper",
        }

    def plot(
        self,
        x,
        ax=None,
        cmap: str = "RdBu_r",
        vmin: float | None = None,
        vmax: float | None = None,
        title: str | None = None,
        colorbar: bool = True,
        outline: bool = True,
    ):
        """Draw one map: x (V,) vertex values, (n_pixels,) pixels or (H, W) image -> Axes.

        Pixels outside the mask are blank; the mask outline is drawn and the hemispheres
        labelled. Axes are flat-map mm.
        """
        import matplotlib.pyplot as plt

        x = np.asarray(x)
        if x.shape == self.shape:
            img = np.where(self.mask, x, np.nan).astype(np.float32)
        elif x.shape == (self.n_vertices,):
            img = self.to_image(x, fill=np.nan)[0]
        elif x.shape == (self.n_pixels,):
            img = self.pixels_to_image(x, fill=np.nan)[0]
        else:
            raise InputError(
                f"plot: expected ({self.n_vertices},), ({self.n_pixels},) or {self.shape}, got {x.shape}"
            )
        if ax is None:
            H, W = self.shape
            _, ax = plt.subplots(figsize=(10, 10 * H / W + 0.6))
        if vmax is None and vmin is None:
            lim = float(np.nanmax(np.abs(img))) if np.isfinite(img).any() else 1.0
            vmin, vmax = -lim, lim
        xmin, xmax, ymin, ymax = self.bbox
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, extent=(xmin, xmax, ymin, ymax), origin="upper",
                       interpolation="nearest")
        if outline:
            ax.contour(self.mask.astype(float), levels=[0.5], colors="k", linewidths=0.5,
                       extent=(xmin, xmax, ymin, ymax), origin="upper")
        surf = self.surface
        for h, label in ((0, "L"), (1, "R")):
            c = surf.coords[surf.hemi_slice(h)]
            ax.text(c[:, 0].mean(), ymax, label, ha="center", va="top", fontsize=12, fontweight="bold")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
        ax.set_aspect("equal")
        ax.set_axis_off()
        if title:
            ax.set_title(title)
        if colorbar:
            ax.figure.colorbar(im, ax=ax, shrink=0.6)
        return ax

    def __repr__(self) -> str:
        return (
            f"FlatMapper(space={self.space!r}, shape={self.shape}, pixel_size={self.pixel_size:g} mm, "
            f"n_pixels={self.n_pixels}, n_vertices={self.n_vertices}, max_edge_mm={self.max_edge_mm:g})"
        )


def compare_linear_nd(mapper: FlatMapper, frames, atol: float = 1e-4) -> tuple[list[dict], float]:
    """Time ``mapper.to_pixels`` against upstream's per-run ``scipy LinearNDInterpolator`` on the
    same frames (T, V), and the fraction of pixels where they agree to ``atol`` (they differ where
    the flat mesh's triangle is not scipy's Delaunay triangle). -> (rows, agree fraction).
    A rough, one-shot timing for the chapter; ``benchmarks/bench_flatmap.py`` measures properly."""
    import time

    from scipy.interpolate import LinearNDInterpolator

    x = np.ascontiguousarray(frames, dtype=np.float32)
    mapper.to_pixels(x[:4])  # compiles the kernel once (~0.5 s), as any first call in a process
    t0 = time.perf_counter()
    ours = mapper.to_pixels(x)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = LinearNDInterpolator(mapper.surface.coords, x.T)(mapper.pixel_centres()).T
    t_theirs = time.perf_counter() - t0
    same = float(np.isclose(ours, theirs, atol=atol).all(0).mean())
    rows = [dict(method="FlatMapper.to_pixels", frames=len(x), seconds=t_ours, frames_per_s=len(x) / t_ours),
            dict(method="LinearNDInterpolator (built per run)", frames=len(x), seconds=t_theirs,
                 frames_per_s=len(x) / t_theirs)]
    return rows, same
