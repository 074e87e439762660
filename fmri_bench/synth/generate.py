"""The run generator: ground truth in, vertex time series out.

In: a :class:`~fmri_bench.synth.profiles.Profile`, a seed and optionally the number of subjects.
Out: a :class:`Synthesizer` holding the cohort's ground truth (participants, true node
correlations, condition maps, per-subject task gains) and the list of runs; ``run_data(spec)``
makes one run's ``(T, 59412)`` float32 fs_LR cortex data in scanner units (baseline ~10000):

    pct(T, V) = [network sources | task regressors | noise series] (T, M) @ maps (M, V) + thermal
    data = baseline (V,) * (1 + pct / 100)

Every run draws from its own ``np.random.SeedSequence((seed, subject, run))``, so a run is the
same whichever runs are generated before it (streaming, subsets, parallel jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fmri_bench.synth import maps as smaps
from fmri_bench.synth.cohort import Cohort, CohortConfig, make_cohort
from fmri_bench.synth.noise import SITES, Site, noise_maps, noise_series, smooth_fields, thermal
from fmri_bench.synth.profiles import Profile
from fmri_bench.synth.tasks import PARADIGMS, all_conditions, make_events, regressors
from fmri_bench.synth.timeseries import network_sources

GENERATOR_VERSION = "synth-1.0"
N_NOISE_FIELDS = 36
BASELINE = 10000.0


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
        self.noise_maps = noise_maps(smooth_fields(rng, N_NOISE_FIELDS, smaps.N_CORTEX))
        self.gains = np.clip(rng.normal(1.0, p.gain_sd, (n, len(self.conditions))), 0.3, None)
        base_fields = smooth_fields(rng, 1, smaps.N_CORTEX, n_smooth=40)[0]
        self.baseline = (BASELINE * (1 + 0.1 * base_fields)).astype(np.float32)
        self.runs = self._plan_runs(rng)

    # ------------------------------------------------------------------ plan
    def _plan_runs(self, rng: np.random.Generator) -> list[RunSpec]:
        p, df = self.profile, self.cohort.participants
        runs = []
        vol_subjects = set(np.flatnonzero(df.site.to_numpy() == "B")[:p.volume_subjects].tolist())
        for s, row in enumerate(df.itertuples()):
            site = SITES[row.site]
            names = [(f"rfMRI_REST{i + 1}_LR", "rest", None) for i in range(p.rest_sessions)]
            k = len(p.paradigms)
            for j in range(min(p.tasks_per_subject, k)):
                par = p.paradigms[(s * p.tasks_per_subject + j) % k]
                names.append((f"tfMRI_{par}_LR", "task", par))
            for r, (name, kind, par) in enumerate(names):
                ev_rng = np.random.default_rng(np.random.SeedSequence((self.seed, s, r, 7)))
                if kind == "rest":
                    events, dur = None, p.rest_s
                else:
                    events, dur = make_events(par, p.reps, ev_rng)
                runs.append(RunSpec(s, row.subject, name, kind, par, row.site, site.tr,
                                    int(np.floor(dur / site.tr)), events, r,
                                    volume=s in vol_subjects and r in (0, p.rest_sessions)))
        return runs

    # ------------------------------------------------------------------ data
    def site(self, spec: RunSpec) -> Site:
        return SITES[spec.site]

    def run_components(self, spec: RunSpec, rng: np.random.Generator):
        """Signal parts of one run -> dict of (series (T, m), maps (m, V)) in percent signal change."""
        site, n_t = self.site(spec), spec.n_frames
        corr = self.cohort.corr[spec.subject_index]
        parts = {"network": (network_sources(rng, corr, n_t, site.tr) * site.network_amp,
                             self.node_maps)}
        if spec.kind == "task":
            conds = [c for c in PARADIGMS[spec.paradigm].conditions]
            idx = [self.conditions.index((spec.paradigm, c)) for c in conds]
            x = regressors(spec.events, conds, n_t, site.tr)
            amp = site.task_amp * self.gains[spec.subject_index, idx]
            parts["task"] = (x * amp[None].astype(np.float32), self.condition_maps[idx])
        parts["noise"] = (noise_series(site, rng, n_t, N_NOISE_FIELDS), self.noise_maps)
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
