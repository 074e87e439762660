"""Subject-specific smooth deformations of the cortical maps: each subject's own topography.

In: the fs_LR 32k cortex (``maps.sphere_coords``, the registration sphere, radius 100 mm) and a
``np.random.Generator``. Out: a :class:`Deformation` per subject, whose ``apply(maps)`` turns the
group maps ``(M, V)`` into that subject's maps ``(M, V)``:

    subject_map_m(v) = group_map_m(p_v - d(p_v)) * exp(g_m(p_v))

``d`` is a smooth displacement tangent to the sphere (RMS ``shift_mm``), ``g_m`` a smooth
log-gain field per map (SD ``gain_sd``): where a subject's area or network sits, and how strongly
each part of it is expressed. Both are Gaussian random fields with a squared-exponential kernel of
length ``corr_mm``, drawn as random Fourier features (Rahimi & Recht 2007) on the sphere, so a
deformation is a few hundred numbers (``params``) and is the same for every run of the subject.

Why: after surface-based (MSMAll) alignment, individual areas and networks still sit a few mm
away from the group atlas and differ in extent and shape (Glasser et al. 2016 Nature: the areal
classifier finds areas displaced or atypically shaped in single subjects, e.g. 55b; Gordon et al. 2017 Neuron,
individual-specific networks of the Midnight Scan Club; Kong et al. 2019 Cerebral Cortex,
individual network topography). This spatial variability is a main source of individual
differences in parcel-level FC (Bijsterbosch et al. 2018 eLife, "The relationship between
spatial configuration and functional connectivity of brain regions"). The sizes are orders of
magnitude read from those papers (no single figure gives an RMS displacement), kept small: 3 mm
is about 1.5 vertex spacings of the 32k mesh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SHIFT_MM = 3.0  # RMS displacement on the sphere (see the module docstring)
CORR_MM = 20.0  # correlation length of the displacement and gain fields (areal scale, ~ a few MMP areas)
GAIN_SD = 0.2  # SD of the log-gain of a map at a point (an area 20 % stronger or weaker)
N_FEATURES = 64  # random Fourier features per field
N_GAIN_BASIS = 8  # gain fields per subject mixed into one per map (cheap, still map-specific)


@functools.lru_cache(maxsize=1)
def _hemispheres() -> tuple[tuple[slice, np.ndarray, object], ...]:
    """((vertex slice, sphere coords (n, 3), KD-tree), ...) for the left and right cortex."""
    from scipy.spatial import cKDTree

    from fmri_bench.synth.maps import n_left, sphere_coords

    xyz = sphere_coords()
    out = []
    for sl in (slice(0, n_left()), slice(n_left(), len(xyz))):
        out.append((sl, xyz[sl], cKDTree(xyz[sl])))
    return tuple(out)


def random_fields(omega: np.ndarray, phase: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Random Fourier features -> fields: omega (F, J, 3) 1/mm, phase (F, J), xyz (n, 3) -> (F, n).

    Unit variance in expectation; kernel exp(-|p - q|^2 / (2 l^2)) when omega ~ N(0, 1 / l^2).
    The cosines run in float32 (arguments of a few radians): ~10x faster than float64.
    """
    f, j, _ = omega.shape
    arg = (xyz.astype(np.float32) @ omega.reshape(f * j, 3).T.astype(np.float32)
           + phase.reshape(1, f * j).astype(np.float32))  # (n, F J)
    np.cos(arg, out=arg)
    return (np.sqrt(2.0 / j) * arg.reshape(len(xyz), f, j).sum(-1).T).astype(np.float64)


def _draw(rng: np.random.Generator, n_fields: int, corr_mm: float) -> tuple[np.ndarray, np.ndarray]:
    omega = rng.standard_normal((2, n_fields, N_FEATURES, 3)) / corr_mm  # (hemisphere, field, feature, xyz)
    phase = rng.uniform(0, 2 * np.pi, (2, n_fields, N_FEATURES))
    return omega, phase


@dataclass(frozen=True)
class Deformation:
    """One subject's deformation; ``params`` (arrays) reproduce it exactly (ground_truth.npz)."""

    shift_omega: np.ndarray  # (2, 3, J, 3)
    shift_phase: np.ndarray  # (2, 3, J)
    gain_omega: np.ndarray  # (2, B, J, 3)
    gain_phase: np.ndarray  # (2, B, J)
    gain_mix: np.ndarray  # (M, B): each map's gain field is a mix of the B basis fields
    shift_mm: float = SHIFT_MM
    gain_sd: float = GAIN_SD

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {"shift_omega": self.shift_omega, "shift_phase": self.shift_phase,
                "gain_omega": self.gain_omega, "gain_phase": self.gain_phase, "gain_mix": self.gain_mix,
                "scales": np.array([self.shift_mm, self.gain_sd])}

    @classmethod
    def from_params(cls, p: dict) -> "Deformation":
        return cls(p["shift_omega"], p["shift_phase"], p["gain_omega"], p["gain_phase"], p["gain_mix"],
                   float(p["scales"][0]), float(p["scales"][1]))

    def displacement(self) -> np.ndarray:
        """(V, 3) mm, tangent to the sphere, RMS ``shift_mm`` in expectation."""
        out = []
        for h, (_, xyz, _) in enumerate(_hemispheres()):
            d = random_fields(self.shift_omega[h], self.shift_phase[h], xyz).T  # (n, 3)
            normal = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
            d -= (d * normal).sum(1, keepdims=True) * normal
            out.append(d * (self.shift_mm / np.sqrt(2.0)))  # a tangent vector of 3 unit fields has E|d|^2 = 2
        return np.concatenate(out)

    def log_gain(self) -> np.ndarray:
        """(M, V) log-gain field of each map."""
        out = []
        for h, (_, xyz, _) in enumerate(_hemispheres()):
            basis = random_fields(self.gain_omega[h], self.gain_phase[h], xyz)  # (B, n)
            out.append(self.gain_mix @ basis)
        return (self.gain_sd * np.concatenate(out, 1)).astype(np.float32)

    def apply(self, maps: np.ndarray) -> np.ndarray:
        """maps (M, V) group maps -> (M, V) float32 this subject's maps (pull-back, 3-NN interpolation)."""
        if maps.shape[0] != self.gain_mix.shape[0]:
            raise ValueError(f"deformation made for {self.gain_mix.shape[0]} maps, got {maps.shape[0]}")
        out = np.asarray(maps, np.float32).copy()
        if self.shift_mm == 0 and self.gain_sd == 0:
            return out
        disp = self.displacement()
        for sl, xyz, tree in _hemispheres() if self.shift_mm else ():
            src = xyz - disp[sl]
            src *= (np.linalg.norm(xyz, axis=1) / np.linalg.norm(src, axis=1))[:, None]  # back onto the sphere
            dist, idx = tree.query(src, k=3)
            w = 1.0 / np.maximum(dist, 1e-6)
            w /= w.sum(1, keepdims=True)
            part = maps[:, sl]
            out[:, sl] = (part[:, idx] * w[None].astype(np.float32)).sum(-1)
        out *= np.exp(self.log_gain())
        return out


def draw_deformation(rng: np.random.Generator, n_maps: int, shift_mm: float = SHIFT_MM,
                     gain_sd: float = GAIN_SD, corr_mm: float = CORR_MM) -> Deformation:
    """A subject's random deformation for ``n_maps`` maps (node maps then condition maps)."""
    so, sp = _draw(rng, 3, corr_mm)
    go, gp = _draw(rng, N_GAIN_BASIS, corr_mm)
    mix = rng.standard_normal((n_maps, N_GAIN_BASIS)) / np.sqrt(N_GAIN_BASIS)
    return Deformation(so, sp, go, gp, mix, float(shift_mm), float(gain_sd))
