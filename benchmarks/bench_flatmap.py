"""Flat-map rasterisation speed: FlatMapper against the named alternatives, in one run.

In: nothing (smooth random data on the fs_LR 32k cortex, made here). Out: a small table and,
last, one machine-readable line
``flatmap_fps=... linearnd_fps=... quickflat_fps=... speedup=... e2e_fps=...``.

What is timed (best of ``--repeats`` wall-clock runs; the machine may be shared):
- flatmap: ``FlatMapper("fs_LR_32k").to_pixels(X)`` on X (T, 59412) float32 -> (T, n_pixels)
  float32, a fresh output each call (what preprocessing does); also into a reused buffer, on
  one thread, with scipy's CSR mat-vec per frame instead of the compiled kernel
  (``use_kernel=False``, the same numbers bit for bit), and the same operator as one scipy
  sparse mat-mat product on the transposed batch.
- linearnd (headline, ``speedup``): ``scipy.interpolate.LinearNDInterpolator(coords, values)``
  built per run from the cortex flat coordinates and the run's values (V, T), evaluated at the
  mask pixel centres. Also timed (``speedup_upstream``): upstream fMRI-FM's exact transform,
  whose Delaunay triangulation is made once at fit time (not timed): interpolator over the
  (V, T) view, evaluated on the whole grid, moved to (T, H, W), zeroed outside the mask, cut to
  the mask pixels; and the kindest variant (Delaunay once, values already (V, T) contiguous,
  mask pixel centres only). Once the triangle of a pixel is found, LinearNDInterpolator's inner
  loop runs over all frames of the run, so it is far from slow per frame.
- quickflat: pycortex's rasteriser on its example subject S1 (a different mesh: 304k
  vertices), ``cortex.quickflat.make_flatmap_image(cortex.Vertex(frame, "S1"), height=H)``
  per frame (its per-call cost: it reloads its cached pixel map from the filestore each call);
  also its cached sparse pixel map applied to the whole batch at once (nearest vertex, one
  non-zero per pixel), the best case of its kernel.
- e2e: CIFTI -> shard, what ``fmri-bench flatten --workers 2`` runs. Not timed: writing
  ``--e2e-runs`` (4) HCP-length runs, 1200 frames at TR 0.72 s as in HCP REST (smooth random
  data on the fs_LR 32k cortex, ~100 +- 5) as CIFTI dtseries with ``fmri_bench.io.write_cifti``
  (285 MB each; they stay in the page cache, so the read is not disk-bound), and one warm-up
  ``flatten`` of one run (it loads the flat-map operator, as any first call does). Timed: one
  ``flatten(paths, out, workers=--e2e-workers)`` call (2: this machine's core count): read,
  z-score, anti-alias + PCHIP to TR 1.0 s (864 frames a run; the anti-alias operator is built
  again inside the timed call), rasterise, float16, encode, write and fsync one shard.
  ``e2e_fps`` = output frames / wall seconds of that call. ``--e2e-workers 1`` is the
  single-process number.

Run: ``.venv/bin/python benchmarks/bench_flatmap.py [--frames 256] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def smooth_data(coords: np.ndarray, n_frames: int, rng: np.random.Generator, k: int = 24) -> np.ndarray:
    """coords: (V, 2) mm -> (n_frames, V) float32: random mixtures of k smooth plane waves
    (wavelengths 40-200 mm) plus a little white noise, roughly unit variance."""
    freq = rng.uniform(2 * np.pi / 200, 2 * np.pi / 40, k)[:, None] * np.stack(
        [np.cos(a := rng.uniform(0, np.pi, k)), np.sin(a)], axis=1
    )
    waves = np.cos(freq @ coords.T + rng.uniform(0, 2 * np.pi, (k, 1)))  # (k, V)
    x = rng.standard_normal((n_frames, k)) @ waves / np.sqrt(k / 2)
    x += 0.1 * rng.standard_normal(x.shape)
    return x.astype(np.float32)


def best_time(fn, repeats: int) -> float:
    """Best wall-clock seconds of ``repeats`` calls (after a warm-up); also records the
    process CPU seconds of the calls in ``best_time.cpu`` (min over calls)."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    best_time.cpu = min(cpus)
    return min(walls)


def bench_flatmapper(X: np.ndarray, repeats: int) -> dict:
    from fmri_bench.flatmap import FlatMapper

    t0 = time.perf_counter()
    mapper = FlatMapper("fs_LR_32k", cache=False)
    build_s = time.perf_counter() - t0
    FlatMapper("fs_LR_32k")  # make sure the cache file exists
    t0 = time.perf_counter()
    mapper = FlatMapper("fs_LR_32k")
    load_s = time.perf_counter() - t0
    T = len(X)
    fresh = best_time(lambda: mapper.to_pixels(X), repeats)
    fresh_cpu = best_time.cpu
    out = np.empty((T, mapper.n_pixels), np.float32)
    reused = best_time(lambda: mapper.to_pixels(X, out=out), repeats)
    reused_cpu = best_time.cpu
    single = FlatMapper("fs_LR_32k", threads=1)
    one = best_time(lambda: single.to_pixels(X, out=out), repeats)
    one_cpu = best_time.cpu
    scipy_kernel = FlatMapper("fs_LR_32k")
    scipy_kernel.use_kernel = False  # scipy's CSR mat-vec per frame, same threads
    via_scipy = best_time(lambda: scipy_kernel.to_pixels(X), repeats)
    via_scipy_cpu = best_time.cpu
    A = mapper.operator
    transposed = best_time(lambda: np.ascontiguousarray((A @ X.T).T), repeats)
    transposed_cpu = best_time.cpu
    return {
        "mapper": mapper,
        "fps_scipy_kernel": T / via_scipy,
        "cpu_fps_scipy_kernel": T / via_scipy_cpu,
        "fps_transposed": T / transposed,
        "cpu_fps_transposed": T / transposed_cpu,
        "fps": T / fresh,
        "fps_reused_out": T / reused,
        "fps_1_thread": T / one,
        "cpu_fps": T / fresh_cpu,
        "cpu_fps_reused_out": T / reused_cpu,
        "cpu_fps_1_thread": T / one_cpu,
        "build_s": build_s,
        "load_s": load_s,
    }


def bench_linearnd(mapper, X: np.ndarray, repeats: int) -> dict:
    """LinearNDInterpolator three ways: built per run from the coordinates (the headline), the
    upstream transform with its Delaunay triangulation made once, and the kindest variant."""
    from scipy.interpolate import LinearNDInterpolator
    from scipy.spatial import Delaunay

    coords = mapper.surface.coords
    centres = mapper.pixel_centres()
    H, W = mapper.shape
    xmin, xmax, ymin, ymax = mapper.bbox
    gx, gy = np.meshgrid(xmin + (np.arange(W) + 0.5) * mapper.pixel_size,
                         ymax - (np.arange(H) + 0.5) * mapper.pixel_size)
    tri = Delaunay(coords)  # upstream: once, at fit time
    values = np.ascontiguousarray(X.T)  # (V, T)

    def per_run():
        # built from the flat coordinates and the run's values, at the mask pixel centres
        return LinearNDInterpolator(coords, X.T)(centres).T  # (T, n_pixels)

    def upstream():
        # fMRI-FM FlatResampler + preprocessing: (V, T) view -> whole grid (H, W, T) ->
        # (T, H, W) -> zero outside the mask -> (T, n_pixels)
        flat = LinearNDInterpolator(tri, X.T)(gx, gy)
        flat = np.where(mapper.mask, np.transpose(flat, (2, 0, 1)), 0.0)
        return flat[:, mapper.mask]

    def kindest():
        # values already (V, T) contiguous, only the mask pixel centres evaluated
        return LinearNDInterpolator(tri, values)(centres)  # (n_pixels, T)

    n = max(1, repeats // 2)
    res = {}
    for name, fn in (("per_run", per_run), ("upstream", upstream), ("kindest", kindest)):
        res[f"fps_{name}"] = len(X) / best_time(fn, n)
        res[f"cpu_fps_{name}"] = len(X) / best_time.cpu
    same = np.isclose(per_run(), mapper.to_pixels(X), atol=1e-4).all(0)
    res["fps"], res["cpu_fps"] = res["fps_per_run"], res["cpu_fps_per_run"]
    res["agree_frac"] = float(same.mean())
    return res


def bench_quickflat(n_frames: int, height: int, repeats: int) -> dict:
    from fmri_bench.surfaces import import_cortex

    cortex = import_cortex()
    from cortex.quickflat.utils import get_flatcache

    n_vert = sum(len(cortex.db.get_surf("S1", "flat", hemisphere=h)[0]) for h in ("lh", "rh"))
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((n_frames, n_vert)).astype(np.float32)
    cortex.quickflat.make_flatmap_image(cortex.Vertex(frames[0], "S1"), height=height)  # builds its caches

    def per_frame():
        for f in frames:
            cortex.quickflat.make_flatmap_image(cortex.Vertex(f, "S1"), height=height)

    dt = best_time(per_frame, max(1, repeats // 2))
    dt_cpu = best_time.cpu
    pixmap = get_flatcache("S1", None, height=height)
    batch = np.ascontiguousarray(frames.T, dtype=np.float64)
    kernel = best_time(lambda: pixmap @ batch, repeats)
    return {
        "fps": n_frames / dt,
        "kernel_fps": n_frames / kernel,
        "cpu_fps": n_frames / dt_cpu,
        "kernel_cpu_fps": n_frames / best_time.cpu,
        "n_vertices": n_vert,
        "n_pixels": int(pixmap.shape[0]),
        "height": height,
    }


def bench_end_to_end(n_runs: int = 4, frames_per_run: int = 1200, tr: float = 0.72,
                     workers: int = 2) -> dict:
    """CIFTI dtseries -> shard frames/s of one ``fmri_bench.convert.flatten`` call over
    ``n_runs`` runs with ``workers`` processes (see the module docstring; NaN if missing)."""
    try:
        from fmri_bench import preprocess
        from fmri_bench.convert import flatten
        from fmri_bench.io import write_cifti
    except ImportError:
        return {"fps": math.nan, "note": "fmri_bench.convert / io not available"}
    from fmri_bench.surfaces import load_surface

    surf = load_surface("fs_LR_32k")
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory(prefix="bench_flatmap_") as tmp:
        paths = []
        for i in range(n_runs):
            x = 100.0 + 5.0 * smooth_data(surf.coords, frames_per_run, rng)
            paths.append(write_cifti(Path(tmp) / f"sub-{i:02d}_task-rest_bold.dtseries.nii", x, tr=tr))
        flatten(paths[:1], Path(tmp) / "warm", progress=False)  # loads the flat-map operator
        preprocess.antialias_operator.cache_clear()  # built again inside the timed call
        preprocess._resampler.cache_clear()
        c0 = os.times()
        summary = flatten(paths, Path(tmp) / "out", progress=False, workers=workers)
        c1 = os.times()
    if summary.failed:
        raise RuntimeError(f"end-to-end conversion failed: {summary.failed}")
    cpu = (c1.user + c1.system + c1.children_user + c1.children_system
           - c0.user - c0.system - c0.children_user - c0.children_system)
    return {
        "fps": summary.frames_per_s,
        "input_fps": n_runs * frames_per_run / summary.seconds,
        "cpu_fps": summary.frames / cpu,
        "line": f"{summary.line()} workers={workers} runs of {frames_per_run} frames at TR {tr} s",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=256, help="frames of fs_LR 32k data (>= 200)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best is kept)")
    parser.add_argument("--quickflat-frames", type=int, default=20)
    parser.add_argument("--skip-quickflat", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-runs", type=int, default=4, help="HCP-length runs converted end to end")
    parser.add_argument("--e2e-workers", type=int, default=2, help="flatten --workers")
    args = parser.parse_args(argv)

    from fmri_bench.surfaces import load_surface

    surf = load_surface("fs_LR_32k")
    X = smooth_data(surf.coords, args.frames, np.random.default_rng(0))
    fm = bench_flatmapper(X, args.repeats)
    mapper = fm["mapper"]
    lnd = bench_linearnd(mapper, X, args.repeats)
    qf = (
        {"fps": math.nan, "kernel_fps": math.nan, "cpu_fps": math.nan, "kernel_cpu_fps": math.nan,
         "n_vertices": 0, "n_pixels": 0, "height": 0}
        if args.skip_quickflat
        else bench_quickflat(args.quickflat_frames, mapper.shape[0], args.repeats)
    )
    e2e = ({"fps": math.nan, "input_fps": math.nan, "cpu_fps": math.nan, "line": "skipped"} if args.skip_e2e
           else bench_end_to_end(n_runs=args.e2e_runs, workers=args.e2e_workers))
    speedup = fm["fps"] / lnd["fps"]
    speedup_upstream = fm["fps"] / lnd["fps_upstream"]

    print(f"fs_LR_32k: {mapper.n_vertices} vertices -> {mapper.shape[0]}x{mapper.shape[1]} grid, "
          f"{mapper.pixel_size:g} mm pixels, {mapper.n_pixels} mask pixels; {args.frames} frames; "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    print(f"operator build {fm['build_s']:.2f} s (incl. surface), cache load {fm['load_s'] * 1e3:.0f} ms")
    nan = math.nan
    rows = [
        ("FlatMapper.to_pixels (fresh output)", fm["fps"], fm["cpu_fps"]),
        ("FlatMapper.to_pixels (reused out=)", fm["fps_reused_out"], fm["cpu_fps_reused_out"]),
        ("FlatMapper.to_pixels (1 thread, out=)", fm["fps_1_thread"], fm["cpu_fps_1_thread"]),
        ("same, scipy CSR mat-vec per frame (use_kernel=False)", fm["fps_scipy_kernel"], fm["cpu_fps_scipy_kernel"]),
        ("same operator as (A @ X.T).T (scipy mat-mat)", fm["fps_transposed"], fm["cpu_fps_transposed"]),
        ("LinearNDInterpolator(coords, values) per run", lnd["fps_per_run"], lnd["cpu_fps_per_run"]),
        ("LinearNDInterpolator, upstream (Delaunay made once)", lnd["fps_upstream"], lnd["cpu_fps_upstream"]),
        ("LinearNDInterpolator, kindest (Delaunay once, mask only)", lnd["fps_kindest"], lnd["cpu_fps_kindest"]),
        (f"quickflat make_flatmap_image, S1 ({qf['n_vertices']} v, {qf['n_pixels']} px)", qf["fps"], qf["cpu_fps"]),
        ("quickflat cached pixel map, batched", qf["kernel_fps"], qf["kernel_cpu_fps"]),
        ("end to end CIFTI -> shard (output frames)", e2e["fps"], e2e["cpu_fps"]),
        ("end to end CIFTI -> shard (input frames)", e2e["input_fps"], nan),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'frames/s':>10}  {'frames/CPU-s':>12}")
    for name, fps, cpu_fps in rows:
        print(f"{name:<{width}}  {fps:10.1f}  {cpu_fps:12.1f}")
    print("frames/CPU-s: frames per second of process CPU time (all threads); for one thread it is")
    print("the speed on an idle core, whatever else the machine is running")
    print(f"LinearNDInterpolator agrees with FlatMapper (1e-4) on {100 * lnd['agree_frac']:.1f} % of "
          f"pixels (elsewhere its Delaunay triangle is not the mesh triangle)")
    if e2e.get("line"):
        print(f"flatten: {e2e['line']}")
    print(f"flatmap_fps={fm['fps']:.1f} linearnd_fps={lnd['fps']:.1f} quickflat_fps={qf['fps']:.1f} "
          f"speedup={speedup:.1f} e2e_fps={e2e['fps']:.1f} linearnd_upstream_fps={lnd['fps_upstream']:.1f} "
          f"speedup_upstream={speedup_upstream:.1f}")
    return {"flatmap": fm, "linearnd": lnd, "quickflat": qf, "e2e": e2e, "speedup": speedup}


if __name__ == "__main__":
    main()
