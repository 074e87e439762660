"""FlatMapper: barycentric numbers on a tiny mesh, agreement with LinearNDInterpolator,
edge cuts, round trips, the on-disk cache and the fs_LR 32k default grid."""

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from scipy.interpolate import LinearNDInterpolator
from scipy.spatial import Delaunay

import fmri_bench.flatmap
from fmri_bench.errors import InputError
from fmri_bench.flatmap import FlatMapper, rasterize, triangle_longest_edge
from fmri_bench.surfaces import FlatSurface


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRI_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_surface(far: float = 0.0) -> FlatSurface:
    """Two hemispheres, each a 4-vertex quad in 2 triangles whose Delaunay triangulation is
    exactly the given faces. ``far`` > 0 adds to the right hemisphere a fifth vertex at
    (far, 0) joined by one long thin triangle (a 'cut' when far >= 16 mm)."""
    quad = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [12.0, 12.0]])
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    left = quad - [12.0 + 2.0, 6.0]  # x in [-14, -2]
    right = quad + [2.0, -6.0]  # x in [2, 14]
    rfaces = faces
    if far:
        right = np.vstack([right, [2.0 + far, -6.0 + 1.0]])
        rfaces = np.vstack([faces, [[1, 4, 3]]])
    coords = np.vstack([left, right])
    return FlatSurface(
        name="tiny" if not far else f"tiny_far{far:g}",
        coords=coords,
        faces=np.vstack([faces, rfaces + 4]).astype(np.int64),
        hemi=np.repeat(np.array([0, 1], np.int8), [4, len(right)]),
        mesh_index=np.concatenate([np.arange(4), np.arange(len(right))]),
        n_mesh=(4, len(right)),
    )


# -- tiny mesh ----------------------------------------------------------------------------------

def test_tiny_mesh_known_barycentric_values(tmp_cache):
    surf = tiny_surface()
    m = FlatMapper(surf, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=1.0)
    assert m.shape == (12, 28)
    # pixel (row 11, col 0): centre (-13.5, -5.5) = left vertex 0 + (0.5, 0.5)
    # -> barycentric (0.9, 0.05, 0.05) on vertices (0, 1, 2)
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    img = m.to_image(x, fill=np.nan)[0]
    assert img[11, 0] == pytest.approx(0.9 * 1 + 0.05 * 2 + 0.05 * 3, abs=1e-6)
    # pixel (row 0, col 27): centre (13.5, 5.5) = right vertex 3 + (-0.5, -0.5), in face (1, 3, 2)
    a, b, c = np.array([[12.0, 0.0], [14.0, 12.0], [2.0, 10.0]]) - [0, 6]
    lam = np.linalg.solve(np.array([[a[0], b[0], c[0]], [a[1], b[1], c[1]], [1, 1, 1]]), [13.5, 5.5, 1.0])
    assert img[0, 27] == pytest.approx(lam @ [20.0, 40.0, 30.0], abs=1e-5)
    # every operator row: 3 weights >= 0 summing to 1
    w = m.operator.toarray()
    assert np.allclose(w.sum(1), 1.0) and (w >= 0).all() and (np.count_nonzero(w, 1) <= 3).all()
    # the gap between hemispheres (x in (-2, 2)) is outside the mask
    assert not m.mask[:, 12:16].any()
    # mask = pixel centres inside a triangle: area of the two quads / pixel area, +- boundary
    assert abs(m.n_pixels - 2 * 0.5 * (10 * 12 + 12 * 10)) < 2 * 0.5 * 44


def test_tiny_mesh_agrees_with_linear_nd_interpolator(tmp_cache, rng):
    surf = tiny_surface()
    m = FlatMapper(surf, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=0.25)
    x = rng.standard_normal((5, surf.n_vertices))
    ours = m.to_pixels(x)
    centres = m.pixel_centres()
    for h in (0, 1):
        sl = surf.hemi_slice(h)
        tri = Delaunay(surf.coords[sl])
        assert sorted(map(sorted, tri.simplices.tolist())) == sorted(map(sorted, surf.faces[:2].tolist()))
        sel = (centres[:, 0] < 0) if h == 0 else (centres[:, 0] > 0)
        ref = LinearNDInterpolator(tri, x[:, sl].T)(centres[sel])  # (n, 5)
        assert np.isfinite(ref).all()
        np.testing.assert_allclose(ours[:, sel], ref.T, atol=1e-5)


def test_edge_cut_drops_long_triangles(tmp_cache):
    long = tiny_surface(far=30.0)  # the thin triangle has an edge of ~28 mm
    e = triangle_longest_edge(long.coords, long.faces)
    assert (e >= 16).sum() == 1
    bbox = (-14.0, 34.0, -6.0, 6.0)
    cut = FlatMapper(long, bbox=bbox, pixel_size=0.5)
    kept = FlatMapper(long, bbox=bbox, pixel_size=0.5, max_edge_mm=100.0)
    assert cut.n_faces_kept == 4 and kept.n_faces_kept == 5
    assert cut.cache_key != kept.cache_key
    assert not cut.mask[:, cut.pixel_centres()[:, 0].max() < np.arange(96) * 0.5 - 14].any()
    assert kept.n_pixels > cut.n_pixels
    assert cut.uncovered[-1] and not kept.uncovered[-1]  # the far vertex only lives in the cut
    # the uncovered vertex takes the value of the nearest mask pixel
    back = cut.to_vertices(cut.to_pixels(long.coords[:, 0]))[0]
    centres = cut.pixel_centres()
    nearest = centres[np.argmin(((centres - long.coords[-1]) ** 2).sum(1))]
    assert back[-1] == pytest.approx(nearest[0], abs=1e-5)


def test_rasterize_pixel_on_shared_edge_counted_once():
    coords = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    faces = np.array([[0, 1, 3], [0, 3, 2]])  # shared diagonal passes through pixel centres
    pix, verts, lam = rasterize(coords, faces, (0.0, 2.0, 0.0, 2.0), (2, 2))
    assert pix.tolist() == [0, 1, 2, 3]
    assert np.allclose(lam.sum(1), 1.0)


def test_cache_hit_and_key(tmp_cache):
    surf = tiny_surface()
    a = FlatMapper(surf, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=1.0)
    b = FlatMapper(surf, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=1.0)
    assert not a.cache_hit and b.cache_hit
    assert a.cache_path == b.cache_path and a.cache_path.is_file()
    assert a.cache_path.parent == tmp_cache / "flatmap"
    assert (a.operator != b.operator).nnz == 0 and np.array_equal(a.mask, b.mask)
    c = FlatMapper(surf, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=0.5)
    assert c.cache_key != a.cache_key and not c.cache_hit
    moved = FlatSurface(**{**surf.__dict__, "coords": surf.coords + [0.0, 0.1]})
    assert FlatMapper(moved, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=1.0).cache_key != a.cache_key
    assert not list((tmp_cache / "flatmap").glob(".tmp-*"))  # atomic writes leave no temp files
    nocache = FlatMapper(surf, bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=0.25, cache=False)
    assert not nocache.cache_path.exists()


def test_bad_shapes_raise_input_error(tmp_cache):
    m = FlatMapper(tiny_surface(), bbox=(-14.0, 14.0, -6.0, 6.0), pixel_size=1.0)
    with pytest.raises(InputError, match="expected"):
        m.to_pixels(np.zeros((3, 7)))
    with pytest.raises(InputError, match="expected"):
        m.to_vertices(np.zeros((3, 5)))


# -- fs_LR 32k ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fslr():
    return FlatMapper("fs_LR_32k")


def test_fslr_default_grid(fslr):
    assert fslr.shape == (224, 560) and fslr.mask.shape == (224, 560)
    assert fslr.n_vertices == 59412
    assert fslr.pixel_size == pytest.approx(1.63)
    assert 65000 < fslr.n_pixels < 75000  # 69353 (upstream, 1.2 mm on its own flat: ~77.8k)
    # the cortex fills the grid: within a pixel of both sides and of the top or bottom
    assert fslr.mask[:, :2].any() and fslr.mask[:, -2:].any()
    assert fslr.mask[:2].any() or fslr.mask[-2:].any()
    assert fslr.operator.shape == (fslr.n_pixels, 59412) and fslr.operator.nnz == 3 * fslr.n_pixels
    meta = json.loads(json.dumps(fslr.grid_meta()))
    assert meta["shape"] == [224, 560] and meta["space"] == "fs_LR_32k"
    assert meta["pixel_size"] == pytest.approx(1.63) and meta["max_edge_mm"] == 16.0


def test_fslr_agrees_with_linear_nd_interpolator(fslr, rng):
    """Upstream's method on the left hemisphere. LinearNDInterpolator triangulates the points
    itself (Delaunay); where a pixel's Delaunay triangle is the mesh triangle the numbers must
    match. The flat mesh is not Delaunay everywhere (flattening distorts it): ~75 % of the
    left-hemisphere pixels have the same triangle under both, and there the numbers agree."""
    surf = fslr.surface
    x = rng.standard_normal((2, surf.n_vertices)).astype(np.float32)
    # a 120 mm window of the left hemisphere keeps the triangulation quick
    centre = surf.coords[surf.hemi == 0].mean(0)
    sel = np.flatnonzero((surf.hemi == 0) & (np.abs(surf.coords - centre) < 60).all(1))
    centres = fslr.pixel_centres()
    inwin = np.flatnonzero((np.abs(centres - centre) < 55).all(1))
    tri = Delaunay(surf.coords[sel])
    simplex = tri.find_simplex(centres[inwin])
    verts = fslr.operator[inwin].indices.reshape(-1, 3)
    same = (simplex >= 0) & (np.sort(sel[tri.simplices[simplex]], 1) == np.sort(verts, 1)).all(1)
    assert len(inwin) > 3000 and same.mean() > 0.7
    ref = LinearNDInterpolator(tri, x[:, sel].T)(centres[inwin][same]).T
    np.testing.assert_allclose(fslr.to_pixels(x)[:, inwin[same]], ref, atol=1e-5)


def test_fslr_per_triangle_linear_nd_interpolator(fslr, rng):
    """Same triangulation, every kind of pixel: LinearNDInterpolator on the 3 vertices of the
    triangle a pixel was assigned to (Delaunay of 3 points = that triangle) gives its value,
    and is defined there (NaN would mean the centre is outside the triangle)."""
    x = rng.standard_normal(fslr.n_vertices)
    p = fslr.to_pixels(x)[0]
    centres = fslr.pixel_centres()
    for i in rng.choice(fslr.n_pixels, 100, replace=False):
        v = fslr.operator[i].indices
        ref = LinearNDInterpolator(fslr.surface.coords[v], x[v])(centres[i][None])[0]
        assert ref == pytest.approx(p[i], abs=1e-5)


def test_fslr_linear_function_exact_and_round_trip(fslr):
    c = fslr.surface.coords
    lin = 0.02 * c[:, 0] - 0.03 * c[:, 1] + 1.0
    p = fslr.to_pixels(lin)[0]
    pc = fslr.pixel_centres()
    np.testing.assert_allclose(p, 0.02 * pc[:, 0] - 0.03 * pc[:, 1] + 1.0, atol=2e-6 * np.abs(lin).max() + 1e-5)
    smooth = np.stack([np.sin(c[:, 0] / 20) * np.cos(c[:, 1] / 25), np.cos(c[:, 0] / 30)])
    back = fslr.to_vertices(fslr.to_image(smooth))
    assert back.shape == (2, 59412) and back.dtype == np.float32
    ok = ~fslr.uncovered
    assert ok.mean() > 0.99
    rel = np.sqrt(((back[:, ok] - smooth[:, ok]) ** 2).mean(1) / smooth[:, ok].var(1))
    assert (rel < 0.03).all()
    # pixels -> image -> pixels is exact
    img = fslr.pixels_to_image(p)
    assert np.array_equal(img[0][fslr.mask], p) and (img[0][~fslr.mask] == 0).all()
    np.testing.assert_array_equal(fslr.to_vertices(img), fslr.to_vertices(p))


def test_fslr_batches_threads_and_dtypes(fslr, rng):
    x = rng.standard_normal((40, 59412))  # float64 in
    ref = (fslr.operator.astype(np.float64) @ x.T).T
    one = FlatMapper("fs_LR_32k", threads=1).to_pixels(x)
    two = FlatMapper("fs_LR_32k", threads=2).to_pixels(x)
    assert one.dtype == np.float32 and one.shape == (40, fslr.n_pixels)
    np.testing.assert_allclose(one, ref, atol=1e-5)
    np.testing.assert_array_equal(one, two)
    half = fslr.to_pixels(x, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, ref, atol=1e-2)
    out = np.full((40, fslr.n_pixels), 7.0, np.float32)
    assert fslr.to_pixels(x, out=out) is out and np.array_equal(out, one)
    assert fslr.to_pixels(x[0]).shape == (1, fslr.n_pixels)
    assert fslr.to_image(x[:3], fill=np.nan).shape == (3, 224, 560)


def test_kernel_equals_scipy_bit_for_bit(fslr, rng):
    # the compiled rasteriser (4 frames per pass + a tail) against scipy's CSR mat-vec
    x = rng.standard_normal((23, 59412)).astype(np.float32)
    fast = FlatMapper("fs_LR_32k", threads=2)
    slow = FlatMapper("fs_LR_32k", threads=2)
    slow.use_kernel = False
    assert fmri_bench.flatmap.compile_kernel()  # numba is a dependency
    compiled = list(fmri_bench.flatmap._raster_kernel().signatures)
    for dtype in (np.float32, np.float16):
        a, b = fast.to_pixels(x, dtype=dtype), slow.to_pixels(x, dtype=dtype)
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)
    # and both are the operator's product
    np.testing.assert_allclose(fast.to_pixels(x), (fslr.operator @ x.T).T, rtol=1e-6, atol=1e-6)
    # frames are independent: a frame gives the same pixels alone or inside any block
    np.testing.assert_array_equal(fast.to_pixels(x[5]), fast.to_pixels(x)[5:6])
    # compile_kernel (run before convert's workers fork) compiled the signature these calls use
    assert fmri_bench.flatmap._raster_kernel().signatures == compiled


def test_plot(fslr):
    import matplotlib.pyplot as plt

    ax = fslr.plot(fslr.surface.coords[:, 1], title="y")
    assert ax.get_title() == "y"
    assert {t.get_text() for t in ax.texts} == {"L", "R"}
    plt.close(ax.figure)


def test_fsaverage5_default_grid_and_linear_exact():
    m = FlatMapper("fsaverage5")
    assert m.shape[1] == 560 and m.shape[0] % 16 == 0 and m.n_vertices == 19002
    assert m.mask[:, :2].any() and m.mask[:, -2:].any()
    c = m.surface.coords
    p = m.to_pixels(0.01 * c[:, 0] + 0.02 * c[:, 1])[0]
    pc = m.pixel_centres()
    np.testing.assert_allclose(p, 0.01 * pc[:, 0] + 0.02 * pc[:, 1], atol=1e-4)
    assert not m.uncovered.any()
