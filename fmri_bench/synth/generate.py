"""The run generator: ground truth in, vertex time series out.

In: a :class:`~fmri_bench.synth.profiles.Profile`, a seed and optionally the number of subjects.
Out: a :class:`Synthesizer` holding the cohort's ground truth (participants, true node
correlations, group and per-subject maps, per-subject task gains) and the list of runs;
``run_data(spec)`` makes one run's ``(T, 59412)`` float32 fs_LR cortex data in scanner units
(baseline ~10000):

    pct(T, V) = [network sources | task regressors] (T, m) @ subject maps (m, V)
                + noise series (T, 36) @ run noise maps (36, V) + thermal
    data = baseline (V,) * (1 + pct / 100)

Subject maps are the group node and condition maps under the subject's smooth deformation
(:mod:`fmri_bench.synth.deform`), the same in all of that subject's runs; the structured-noise
maps are drawn afresh for every run (random mixes of a bank of smooth fields).

Every run draws from its own ``np.random.SeedSequence((seed, subject, run))``, and every subject's
deformation from ``(seed, subject, DEFORM_KEY)``, so a run is the same whichever runs are
generated before it (streaming, subsets, parallel jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fmri_bench.synth import maps as smaps
from fmri_bench.synth.cohort import Cohort, CohortConfig, make_cohort, standardized_traits
from fmri_bench.synth.deform import Deformation, draw_deformation
from fmri_bench.synth.noise import SITES, Site, noise_maps, noise_series, run_fields, smooth_fields, thermal
from fmri_bench.synth.profiles import Profile
from fmri_bench.synth.tasks import PARADIGMS, all_conditions, make_events, regressors
from fmri_bench.synth.timeseries import network_sources

GENERATOR_VERSION = "synth-2.0"
N_NOISE_FIELDS = 36
N_NOISE_BANK = 72  # smooth fields that every run's 36 noise maps are random mixes of
BASELINE = 10000.0
DEFORM_KEY = 11  # SeedSequence entry of the subject deformations


@dataclass
class RunSpec:
    """One run of one subject. kind: "rest" or "task"; events: None for rest."""

    subject_index: int
    subject: str
    name: str  # HCP run name, e.g. "tfMRI_MOTOR_LR"
    kind: str
    paradigm: str | None
    site: str
    tr: float
    n_frames: int
    events: pd.DataFrame | None = None
    run_index: int = 0
    volume: bool = False  # also written as an MNI152 NIfTI run

    @property
    def seed_key(self) -> tuple[int, int]:
        return self.subject_index, self.run_index


def assign_paradigms(n_subjects: int, paradigms: tuple[str, ...], per_subject: int,
                     weights: tuple[float, ...] | None = None) -> list[list[str]]:
    """Which paradigms each subject performs: ``per_subject`` distinct ones, spread over the
    cohort in proportion to ``weights`` (default: equal), deterministically.

    Each slot goes to the paradigm furthest below its share so far (ties: ``paradigms`` order).
    """
    k = min(per_subject, len(paradigms))
    w = np.ones(len(paradigms)) if weights is None else np.asarray(weights, float)
    if len(w) != len(paradigms) or (w < 0).any() or (k and w.sum() <= 0):
        raise ValueError(f"paradigm weights {weights} do not fit paradigms {paradigms}")
    share, count, done, out = w / max(w.sum(), 1e-12), np.zeros(len(paradigms)), 0, []
    for _ in range(n_subjects):
        mine: list[int] = []
        for _ in range(k):
            done += 1
            deficit = share * done - count
            deficit[mine] = -np.inf
            deficit[w == 0] = -np.inf
            j = int(np.argmax(deficit))
            mine.append(j)
            count[j] += 1
        out.append([paradigms[j] for j in mine])
    return out


@dataclass
class Synthesizer:
    profile: Profile
    seed: int = 0
    n_subjects: int | None = None
    cohort: Cohort = field(init=False)
    runs: list[RunSpec] = field(init=False)

    def __post_init__(self):
        p = self.profile
        n = self.n_subjects or p.n_subjects
        n_b = 0 if p.site_b_fraction == 0 else max(1, int(round(n * p.site_b_fraction)))
        cfg = CohortConfig(n_subjects=n, n_site_b=min(n_b, n - 1), idio_scale=p.idio_scale,
                           family_scale=p.family_scale, effects=p.effects)
        root = np.random.SeedSequence(self.seed)
        self.nodes = smaps.network_nodes()
        self.cohort = make_cohort(cfg, self.nodes, np.random.default_rng(root.spawn(1)[0]))
        rng = np.random.default_rng(np.random.SeedSequence((self.seed, 1 << 20)))
        self.node_maps = smaps.node_maps()
        self.conditions = all_conditions()
        self.condition_maps = smaps.condition_maps(self.conditions)
        self.noise_bank = smooth_fields(rng, N_NOISE_BANK, smaps.N_CORTEX)
        self.gains = self._task_gains(rng, n)
        base_fields = smooth_fields(rng, 1, smaps.N_CORTEX, n_smooth=40)[0]
        self.baseline = (BASELINE * (1 + 0.1 * base_fields)).astype(np.float32)
        n_maps = self.node_maps.shape[0] + self.condition_maps.shape[0]
        self.deformations = [
            draw_deformation(np.random.default_rng(np.random.SeedSequence((self.seed, s, DEFORM_KEY))), n_maps,
                             shift_mm=p.shift_mm, gain_sd=p.map_gain_sd) for s in range(n)]
        self._maps_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.runs = self._plan_runs()

    def _task_gains(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(S, C) amplitude of each condition per subject: 1 + gain_sd * N(0, 1) + trait effects."""
        p = self.profile
        gains = rng.normal(1.0, p.gain_sd, (n, len(self.conditions)))
        traits = standardized_traits(self.cohort.participants)
        for e in p.activation_effects:
            t = 2.0 * traits[e.trait] if e.trait == "sex" else traits[e.trait]  # population SD 1
            cols = [i for i, (par, c) in enumerate(self.conditions) if par == e.paradigm and c.startswith(e.condition)]
            if not cols:
                raise ValueError(f"activation effect {e}: no condition {e.paradigm}/{e.condition}*")
            gains[:, cols] += (e.r * p.gain_sd / np.sqrt(1 - e.r**2)) * t[:, None]
        return np.clip(gains, 0.3, None)

    # ------------------------------------------------------------------ plan
    def _plan_runs(self) -> list[RunSpec]:
        p, df = self.profile, self.cohort.participants
        runs = []
        vol_subjects = set(np.flatnonzero(df.site.to_numpy() == "B")[:p.volume_subjects].tolist())
        tasks = assign_paradigms(len(df), p.paradigms, p.tasks_per_subject, p.paradigm_weights)
        for s, row in enumerate(df.itertuples()):
            site = SITES[row.site]
            names = [(f"rfMRI_REST{i + 1}_{d}", "rest", None) for i in range(p.rest_sessions) for d in p.directions]
            names += [(f"tfMRI_{par}_{d}", "task", par) for par in tasks[s] for d in p.directions]
            first_task = next((r for r, x in enumerate(names) if x[1] == "task"), None)
            for r, (name, kind, par) in enumerate(names):
                ev_rng = np.random.default_rng(np.random.SeedSequence((self.seed, s, r, 7)))
                if kind == "rest":
                    events, dur = None, p.rest_s
                else:
                    events, dur = make_events(par, p.reps, ev_rng)
                runs.append(RunSpec(s, row.subject, name, kind, par, row.site, site.tr,
                                    int(np.floor(dur / site.tr)), events, r,
                                    volume=s in vol_subjects and r in (0, first_task)))
        return runs

    # ------------------------------------------------------------------ data
    def site(self, spec: RunSpec) -> Site:
        return SITES[spec.site]

    def subject_maps(self, subject_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(node maps (K, V), condition maps (C, V)) float32 of one subject (deformed group maps)."""
        if subject_index not in self._maps_cache:
            if len(self._maps_cache) >= 2:  # runs come subject by subject: keep the last two
                self._maps_cache.pop(next(iter(self._maps_cache)))
            k = self.node_maps.shape[0]
            both = self.deformations[subject_index].apply(np.concatenate([self.node_maps, self.condition_maps]))
            self._maps_cache[subject_index] = (both[:k], both[k:])
        return self._maps_cache[subject_index]

    def run_components(self, spec: RunSpec, rng: np.random.Generator):
        """Signal parts of one run -> dict of (series (T, m), maps (m, V)) in percent signal change."""
        site, n_t = self.site(spec), spec.n_frames
        corr = self.cohort.corr[spec.subject_index]
        node_maps, condition_maps = self.subject_maps(spec.subject_index)
        parts = {"network": (network_sources(rng, corr, n_t, site.tr) * site.network_amp, node_maps)}
        if spec.kind == "task":
            conds = [c for c in PARADIGMS[spec.paradigm].conditions]
            idx = [self.conditions.index((spec.paradigm, c)) for c in conds]
            x = regressors(spec.events, conds, n_t, site.tr)
            amp = site.task_amp * self.gains[spec.subject_index, idx]
            parts["task"] = (x * amp[None].astype(np.float32), condition_maps[idx])
        maps = noise_maps(run_fields(rng, self.noise_bank, N_NOISE_FIELDS))
        parts["noise"] = (noise_series(site, rng, n_t, N_NOISE_FIELDS), maps)
        return parts

    def run_data(self, spec: RunSpec, return_signal: bool = False, vertices: np.ndarray | None = None):
        """One run -> (T, 59412) float32 in scanner units (baseline ~10000).

        return_signal: also return the noise-free neural part (network + task) in percent signal
        change, (T, 59412) float32 (the volume writer samples it).
        vertices: only these vertex columns -> (T, len(vertices)) (fast checks; the thermal
        noise draws then differ from the full run's).
        """
        rng = np.random.default_rng(np.random.SeedSequence((self.seed,) + spec.seed_key))
        parts = self.run_components(spec, rng)
        cols = slice(None) if vertices is None else vertices
        base = self.baseline[cols]
        signal = None
        if return_signal:
            signal = sum(s @ m[:, cols] for k, (s, m) in parts.items() if k != "noise")
        pct = sum(s @ m[:, cols] for s, m in parts.values())
        pct += thermal(self.site(spec), rng, spec.n_frames, len(base))
        pct *= base / 100.0
        pct += base
        return (pct, signal) if return_signal else pct

    def volume_rng(self, spec: RunSpec) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence((self.seed,) + spec.seed_key + (3,)))
