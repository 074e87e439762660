"""Per-run preprocessing, in the upstream flat-map order, and load-time frame normalisation.

In: a ``fmri_bench.io.Run`` (T, V) on the cortex vertices of a space, and a FlatMapper for
that space. Out: ``bold`` (T', n_pixels) float16 at the target TR (default 1.0 s), the mask
pixels in row-major order, ready for a shard.

Order (Lane et al. 2025, the flat-map pipeline): z-score each vertex over time -> resample to
the target TR (PCHIP; anti-alias low-pass first when downsampling) -> rasterise -> check
finite and |x| < 100 -> float16. Maps (a 3D volume, a dscalar, a single frame) are rasterised
as given. At load time each frame is z-scored over its pixels and clipped to +-3
(``normalize_frames``).

Constant vertices (e.g. vertices outside a volume's field of view) have no variance to scale:
they become 0 after the z-score. A run in which every vertex is constant is an InputError.

Resampling (``resample_tr``): output frames at 0, tr_out, 2 tr_out, ... within the input span,
T' = floor((T - 1) tr_in / tr_out) + 1, by PCHIP (the numbers of scipy's PchipInterpolator,
vectorised over vertices). Anti-alias when downsampling (``antialias``): a zero-phase low-pass
in the DST-I domain after setting aside the line through the first and last frame (odd
reflection at both ends, as filtfilt pads): gain 1 up to 0.8x the new Nyquist, a raised-cosine
fall to 0 at it, 0 above, so nothing above the new Nyquist folds back. Chosen over a
Butterworth filtfilt because its stop band is exact (no -6 dB at the cutoff, no leakage
above) and it costs two FFT-sized transforms per vertex.
"""

from __future__ import annotations

import functools

import numpy as np

from fmri_bench.errors import InputError

MAX_ABS = 100.0  # upstream sanity bound on z-scored values
FLOAT16_MAX = 65504.0
# Vertices per block: a (T, 512) float32 block of a 1200-frame run is 2.4 MB, so the several
# passes over it stay in cache.
_BLOCK = 512


def _blocks(n: int):
    for j in range(0, n, _BLOCK):
        yield slice(j, min(j + _BLOCK, n))


def zscore_time(x: np.ndarray) -> np.ndarray:
    """x: (T, V) -> (T, V) float32, each vertex to mean 0, std 1 over time (population std).

    Constant vertices become 0. Accumulates in float32 after subtracting each vertex's first
    sample, so raw BOLD levels (~1e4) lose no precision.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"zscore_time: expected (T, V), got shape {x.shape}")
    out = np.empty(x.shape, np.float32)
    for b in _blocks(x.shape[1]):
        xb = np.subtract(x[:, b], x[:1, b], dtype=np.float32)  # (T, v)
        xb -= xb.mean(axis=0)
        std = np.sqrt(np.einsum("tv,tv->v", xb, xb) / max(len(xb), 1))
        scale = np.zeros_like(std)
        live = std > 0  # a constant vertex is exactly 0 after the shift
        scale[live] = 1.0 / std[live]
        np.multiply(xb, scale, out=out[:, b])
    return out


def n_frames_out(n_in: int, tr_in: float, tr_out: float) -> int:
    """Frames after resampling: T' = floor((T - 1) * tr_in / tr_out) + 1, i.e. every output
    time 0, tr_out, 2 tr_out, ... that lies within the input span [0, (T - 1) tr_in] (no
    extrapolation). A 1e-9 tolerance keeps exact multiples from rounding down."""
    return int(np.floor((n_in - 1) * tr_in / tr_out + 1e-9)) + 1


def antialias_gain(n: int, tr_in: float, tr_out: float, transition: float = 0.2) -> np.ndarray:
    """Gain (n,) on the DST-I coefficients k = 1..n of n interior frames (see ``antialias``).

    Coefficient k is the frequency k / (2 (n + 1) tr_in). The gain is 1 up to
    (1 - transition) of the new Nyquist 1 / (2 tr_out), falls as a raised cosine to 0 at it,
    and is 0 above: nothing above the new Nyquist survives to fold back, and the smooth edge
    keeps the ringing short.
    """
    f = np.arange(1, n + 1) / (2.0 * (n + 1) * tr_in)
    f_stop = 0.5 / tr_out
    f_pass = (1.0 - transition) * f_stop
    ramp = np.clip((f - f_pass) / (f_stop - f_pass), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * ramp))).astype(np.float32)


def antialias(x: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """Zero-phase low-pass of x (T, v) at the Nyquist of tr_out, along time -> (T, v) float32.

    The straight line through the first and last frame is set aside; the rest (0 at both ends)
    is filtered in the DST-I domain, i.e. as its odd reflection about both ends, which keeps it
    smooth across the ends as filtfilt's odd padding does (no wrap-around step), then the line
    is added back. Frequency response: ``antialias_gain``. The filter is linear in x, so it is
    applied as the cached (T, T) operator of ``antialias_operator``: two dense columns (the
    end frames, through the line) plus a narrow band (the rest), one BLAS product per block of
    rows. That is ~10x faster than transforming every vertex (a DST of length T - 2 is often
    an awkward FFT size, e.g. 1198 for an HCP run).
    """
    x = np.asarray(x, dtype=np.float32)
    T = len(x)
    if T < 3:
        return x.copy()
    op = antialias_operator(T, float(tr_in), float(tr_out))
    out = op.ends @ x[[0, -1]]  # (T, v): what the two end frames contribute
    for r0, r1, c0, c1, block in op.bands:
        out[r0:r1] += block @ x[c0:c1]
    return out


class _BandedOperator:
    """A (T, T) time operator as ``ends`` (T, 2) on frames 0 and T-1 plus row blocks
    ``bands`` of (r0, r1, c0, c1, F[r0:r1, c0:c1]) for the interior columns within
    ``half_width`` of the diagonal. The half width is the smallest one whose dropped entries
    have, on every diagonal beyond it summed, an l2 norm below ``tol``: for unit-variance
    white input the error is then below tol in standard deviation (1e-4 by default, under
    float16's resolution of 5e-4 at 1.0, which the shards store)."""

    def __init__(self, F: np.ndarray, tol: float = 1e-4, block: int = 128):
        T = len(F)
        self.ends = np.ascontiguousarray(F[:, [0, T - 1]], dtype=np.float32)
        inner = np.zeros_like(F)
        inner[:, 1:-1] = F[:, 1:-1]
        energy = np.array([
            max((np.diagonal(inner, k) ** 2).max(), (np.diagonal(inner, -k) ** 2).max()) for k in range(T)
        ])
        tail = np.cumsum(energy[::-1])[::-1]  # tail[k]: energy of every diagonal >= k
        beyond = np.nonzero(tail < tol**2)[0]
        self.half_width = int(beyond[0]) - 1 if len(beyond) else T
        self.bands = []
        for r0 in range(0, T, block):
            r1 = min(r0 + block, T)
            c0, c1 = max(1, r0 - self.half_width), min(T - 1, r1 + self.half_width)
            if c1 > c0:
                self.bands.append((r0, r1, c0, c1, np.ascontiguousarray(F[r0:r1, c0:c1], np.float32)))


@functools.lru_cache(maxsize=16)
def antialias_operator(T: int, tr_in: float, tr_out: float) -> _BandedOperator:
    """The anti-alias filter of T frames as a banded operator (built once per run length and
    TR pair: the DST filter applied to the identity, in float64, then entries below 1e-6 of
    the largest dropped; the impulse response of the raised-cosine edge decays as 1/n^3)."""
    from scipy import fft

    eye = np.eye(T)
    w = np.linspace(0.0, 1.0, T)[:, None]
    F = eye[:1] + w * (eye[-1:] - eye[:1])  # the line through the end frames
    r = fft.dst(eye[1:-1] - F[1:-1], type=1, axis=0)
    r *= antialias_gain(T - 2, tr_in, tr_out)[:, None]
    F[1:-1] += fft.idst(r, type=1, axis=0)
    return _BandedOperator(F)


def _pchip_slopes(y: np.ndarray) -> np.ndarray:
    """Half the PCHIP node slopes of y (T, v), in units of one sample step: (T, v).

    Fritsch-Carlson as in scipy's PchipInterpolator (uniform steps): the harmonic mean of the
    neighbouring secants a, b, i.e. 2ab / (a + b), 0 at a local extremum (a b <= 0), and
    shape-preserving one-sided three-point estimates at both ends. The factor 2 and the step
    length are folded into the Hermite basis (saves two passes over the data).
    """
    m = np.diff(y, axis=0)  # (T-1, v) secants per step
    d = np.zeros_like(y)
    if len(y) == 2:
        d[0] = d[1] = 0.5 * m[0]
        return d
    m0, m1 = m[:-1], m[1:]
    prod = m0 * m1
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(prod, np.add(m0, m1), out=d[1:-1], where=prod > 0)
    for i, (a, b) in ((0, (m[0], m[1])), (-1, (m[-1], m[-2]))):
        e = (3.0 * a - b) / 2.0  # uniform-step case of scipy's _edge_case
        flip = np.sign(e) != np.sign(a)
        over = (np.sign(a) != np.sign(b)) & (np.abs(e) > 3.0 * np.abs(a))
        e[flip] = 0.0
        e[~flip & over] = 3.0 * a[~flip & over]
        d[i] = 0.5 * e
    return d


def resample_tr(x: np.ndarray, tr_in: float, tr_out: float = 1.0) -> np.ndarray:
    """x: (T, V) sampled every tr_in s -> (T', V) float32 every tr_out s, T' = ``n_frames_out``.

    Shape-preserving cubic (PCHIP) interpolation in time, the same numbers as
    ``scipy.interpolate.PchipInterpolator`` (vectorised here over vertices: ~20x faster).
    When downsampling (tr_out > tr_in) the anti-alias low-pass ``antialias`` comes first
    (zero-phase, nothing above the new Nyquist left). Same TR: a copy.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"resample_tr: expected (T, V), got shape {x.shape}")
    if not (tr_in > 0 and tr_out > 0):
        raise ValueError(f"resample_tr: TRs must be > 0, got tr_in={tr_in}, tr_out={tr_out}")
    if np.isclose(tr_in, tr_out, rtol=1e-9, atol=0):
        return x.copy()
    n_in = x.shape[0]
    n_out = n_frames_out(n_in, tr_in, tr_out)
    if n_in < 2:
        return x[:n_out].copy()
    # Output time t = (k + s) tr_in: interval k, position s in [0, 1]. PCHIP is then linear in
    # (y, slopes): out = A @ [y; d] with A (T', 2T) holding the 4 Hermite weights of each
    # output frame, one sparse multiply per block (no (T', v) temporaries).
    import scipy.sparse as sp

    pos = np.minimum(np.arange(n_out) * (tr_out / tr_in), n_in - 1)
    k = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    s = pos - k
    h00, h01 = (1 + 2 * s) * (1 - s) ** 2, s * s * (3 - 2 * s)
    h10, h11 = 2 * s * (1 - s) ** 2, 2 * s * s * (s - 1)  # x2 and the step: see _pchip_slopes
    A = sp.csr_matrix(
        (np.stack([h00, h01, h10, h11], 1).ravel().astype(np.float32),
         (np.repeat(np.arange(n_out), 4), np.stack([k, k + 1, n_in + k, n_in + k + 1], 1).ravel())),
        shape=(n_out, 2 * n_in),
    )
    if tr_out > tr_in:
        x = antialias(x, tr_in, tr_out)  # full width: wide BLAS products
    out = np.empty((n_out, x.shape[1]), np.float32)
    buf = np.empty((2 * n_in, _BLOCK), np.float32)  # [y; d] of one block
    for b in _blocks(x.shape[1]):
        w = b.stop - b.start
        y = x[:, b]
        buf[:n_in, :w] = y
        buf[n_in:, :w] = _pchip_slopes(y)
        out[:, b] = A @ buf[:, :w]
    return out


def normalize_frames(x, clip: float = 3.0):
    """x: (..., P) pixels of each frame -> same shape float32: per-frame z-score over the P
    in-mask pixels, then clipped to +-clip. Accepts numpy arrays and torch tensors; a constant
    frame becomes 0."""
    if not isinstance(x, np.ndarray) and hasattr(x, "float"):  # torch.Tensor
        x = x.float()
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, unbiased=False, keepdim=True)
        return ((x - mean) / std.clamp_min(1e-6)).clamp(-clip, clip)
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float64)
    std = x.std(axis=-1, keepdims=True, dtype=np.float64)
    out = (x - mean) / np.maximum(std, 1e-6)
    return np.clip(out, -clip, clip).astype(np.float32)


def preprocess_run(run, mapper, tr: float | None = 1.0) -> tuple[np.ndarray, float | None]:
    """run: Run (T, V) on mapper.space -> (bold (T', n_pixels) float16, tr_out).

    Timeseries: z-score per vertex -> resample to ``tr`` s (None: keep run.tr) -> rasterise ->
    check finite and |x| < 100 -> float16; tr_out = the TR of ``bold``. Maps: rasterise ->
    check finite and float16 range -> float16; tr_out = None. Raises InputError naming
    run.source on: space / vertex-count mismatch, NaN / Inf, no TR, a run (or map) with zero
    variance everywhere, out-of-range values.
    """
    src = run.source
    data = np.asarray(run.data)
    if run.space != mapper.space:
        raise InputError(f"run is in {run.space}, the flat map is for {mapper.space}", src)
    if data.ndim != 2 or data.shape[1] != mapper.n_vertices:
        raise InputError(
            f"wrong vertex count: {data.shape[-1]} vertices, {mapper.space} has {mapper.n_vertices}", src
        )
    if not np.isfinite(data).all():
        raise InputError("NaN/Inf values in the data", src)

    if run.is_map:
        if float(np.ptp(data)) == 0.0:
            raise InputError("zero-variance map (every vertex has the same value)", src)
        bold = mapper.to_pixels(data)
        _check_range(bold, FLOAT16_MAX, src)
        return bold.astype(np.float16), None

    if run.tr is None or not run.tr > 0:
        raise InputError("no TR for this timeseries: pass the TR explicitly (--input-tr)", src)
    x = zscore_time(data)  # (T, V); constant vertices are 0
    if len(x) < 2 or not (x[0].any() or x.any()):
        raise InputError("zero-variance run (every vertex is constant over time)", src)
    tr_out = float(run.tr if tr is None else tr)
    x = resample_tr(x, float(run.tr), tr_out)  # (T', V)
    bold = mapper.to_pixels(x)  # (T', n_pixels)
    _check_range(bold, MAX_ABS, src)
    return bold.astype(np.float16), tr_out


def _check_range(bold: np.ndarray, bound: float, src) -> None:
    hi, lo = float(bold.max(initial=0.0)), float(bold.min(initial=0.0))  # NaN propagates
    if not (np.isfinite(hi) and np.isfinite(lo)):
        raise InputError("NaN/Inf after rasterising", src)
    peak = max(hi, -lo)
    if peak >= bound:
        raise InputError(f"values out of range after preprocessing (|x| = {peak:.3g} >= {bound:g})", src)
