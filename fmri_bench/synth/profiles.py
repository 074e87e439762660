"""Named generation presets: smoke (CI, seconds), book (the chapters), scaling (streamed shards).

In: a profile name. Out: a :class:`Profile` (sizes, run lengths, paradigms, fingerprint knobs).
Sizes are chosen for the budgets of a 2-core laptop: smoke <= 60 s, book <= 10 min of generation
(the CIFTI is stored as int16 scanner units, 119 kB a fs_LR frame; see ``writer``), scaling
streams to flat-map shards.

The run layout follows the HCP young-adult protocol (Smith et al. 2013 NeuroImage 80:144 and
Barch et al. 2013 NeuroImage 80:169): two resting sessions (REST1, REST2) of two runs each, one
per phase-encoding direction (LR, RL), and every task run twice (LR, RL); HCP rest runs are 1200
frames (14.4 min) at TR 0.72 s, task runs 176-405 frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fmri_bench.errors import InputError
from fmri_bench.synth.cohort import DEFAULT_ACTIVATION_EFFECTS, DEFAULT_EFFECTS, ActivationEffect, TraitEffect
from fmri_bench.synth.deform import GAIN_SD, SHIFT_MM
from fmri_bench.synth.tasks import PARADIGMS

MIN_SUBJECTS = 3  # a subject-disjoint train / val / test split needs one subject each

# The book's paradigms: the six with state21 classes (GAMBLING's win / loss carry none, see
# fmri_bench/data/hcp_task_classes.json), WM twice as often because a WM run holds each of its 8
# EVs once where the others hold each condition ``reps`` (2) times: equal event clips per class.
_BOOK_PARADIGMS = ("WM", "EMOTION", "LANGUAGE", "MOTOR", "RELATIONAL", "SOCIAL")
_BOOK_WEIGHTS = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Profile:
    name: str
    n_subjects: int
    site_b_fraction: float = 0.2  # share of subjects from the second (TR 2.0 s) site
    rest_sessions: int = 2  # REST1, REST2: two sessions for fingerprinting
    directions: tuple[str, ...] = ("LR", "RL")  # phase-encoding directions: one run each per session / task
    rest_s: float = 60.0  # seconds per resting run
    paradigms: tuple[str, ...] = tuple(PARADIGMS)
    paradigm_weights: tuple[float, ...] | None = None  # how often each paradigm is assigned (None: equally)
    tasks_per_subject: int = 2  # paradigms per subject (each in every direction)
    reps: int = 1  # blocks per condition in a task run (HCP MOTOR runs: 2)
    volume_subjects: int = 2  # site-B subjects whose first rest and first task run are also written as NIfTI
    stream: bool = False  # write flat-map shards instead of CIFTI
    idio_scale: float = 0.12
    family_scale: float = 0.08
    gain_sd: float = 0.2  # between-subject SD of task amplitudes
    shift_mm: float = SHIFT_MM  # subject map deformation: RMS displacement (fmri_bench.synth.deform)
    map_gain_sd: float = GAIN_SD  # subject map deformation: SD of the smooth log-gain
    effects: tuple[TraitEffect, ...] = DEFAULT_EFFECTS
    activation_effects: tuple[ActivationEffect, ...] = DEFAULT_ACTIVATION_EFFECTS

    def with_(self, **kw) -> "Profile":
        return replace(self, **kw)


PROFILES = {
    "smoke": Profile("smoke", n_subjects=6, site_b_fraction=0.34, rest_s=30.0,
                     paradigms=("MOTOR",), tasks_per_subject=1, volume_subjects=2),
    # rest_s: 120 s a run (166 frames at TR 0.72 s; 4 min a session of LR + RL), not HCP's 864 s,
    # because of bytes: each run exists twice (int16 CIFTI 165 kB/s at site A, flat-map shards
    # 139 kB/s once the chapters flatten it), so each extra minute of every rest run costs
    # ~2.3 GB; the task runs that give >= 40 clips per state21 class already take ~7 GB. At 120 s
    # the book cohort is ~13.5 GB in all and connectome fingerprinting across sessions on MMP-360
    # is already >= 0.9 for six subjects (tests/test_cohort_targets.py).
    "book": Profile("book", n_subjects=40, rest_s=120.0, paradigms=_BOOK_PARADIGMS,
                    paradigm_weights=_BOOK_WEIGHTS, tasks_per_subject=2, reps=2, volume_subjects=4),
    "scaling": Profile("scaling", n_subjects=200, rest_s=180.0, tasks_per_subject=2, reps=2,
                       volume_subjects=0, stream=True),
}


def get_profile(profile: str | Profile, subjects: int | None = None) -> Profile:
    """Resolve a profile name (or pass a Profile through), checking the subject count."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise InputError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    if subjects is not None:
        if int(subjects) < MIN_SUBJECTS:
            raise InputError(f"--subjects {subjects}: need at least {MIN_SUBJECTS} subjects "
                             "for subject-disjoint train / val / test splits")
        profile = profile.with_(n_subjects=int(subjects))
    if profile.n_subjects < MIN_SUBJECTS:
        raise InputError(f"profile {profile.name!r}: {profile.n_subjects} subjects, "
                         f"need at least {MIN_SUBJECTS}")
    bad = [p for p in profile.paradigms if p not in PARADIGMS]
    if bad:
        raise InputError(f"profile {profile.name!r}: unknown paradigms {bad}; known: {list(PARADIGMS)}")
    if profile.paradigm_weights is not None and len(profile.paradigm_weights) != len(profile.paradigms):
        raise InputError(f"profile {profile.name!r}: {len(profile.paradigm_weights)} paradigm weights "
                         f"for {len(profile.paradigms)} paradigms")
    if not profile.directions or len(set(profile.directions)) != len(profile.directions):
        raise InputError(f"profile {profile.name!r}: directions must be distinct names, got {profile.directions}")
    return profile
