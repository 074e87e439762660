"""Named generation presets: smoke (CI, seconds), book (the chapters), scaling (streamed shards).

In: a profile name. Out: a :class:`Profile` (sizes, run lengths, paradigms, fingerprint knobs).
Sizes are chosen for the budgets of a 2-core laptop: smoke <= 60 s / 300 MB, book <= 10 min /
5 GB of CIFTI (one fs_LR frame is 59412 float32 = 238 kB), scaling streams to flat-map shards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fmri_bench.errors import InputError
from fmri_bench.synth.cohort import DEFAULT_EFFECTS, TraitEffect
from fmri_bench.synth.tasks import PARADIGMS

MIN_SUBJECTS = 3  # a subject-disjoint train / val / test split needs one subject each


@dataclass(frozen=True)
class Profile:
    name: str
    n_subjects: int
    site_b_fraction: float = 0.2  # share of subjects from the second (TR 2.0 s) site
    rest_sessions: int = 2  # REST1, REST2: two sessions for fingerprinting
    rest_s: float = 60.0  # seconds per resting run
    paradigms: tuple[str, ...] = tuple(PARADIGMS)
    tasks_per_subject: int = 2  # paradigms rotate over subjects
    reps: int = 1  # blocks per condition in a task run (HCP runs: 2)
    volume_subjects: int = 2  # site-B subjects whose REST1 + first task run are also written as NIfTI
    stream: bool = False  # write flat-map shards instead of CIFTI
    idio_scale: float = 0.12
    family_scale: float = 0.08
    gain_sd: float = 0.2  # between-subject SD of task amplitudes
    effects: tuple[TraitEffect, ...] = DEFAULT_EFFECTS

    def with_(self, **kw) -> "Profile":
        return replace(self, **kw)


PROFILES = {
    "smoke": Profile("smoke", n_subjects=6, site_b_fraction=0.34, rest_s=30.0,
                     paradigms=("MOTOR",), tasks_per_subject=1, volume_subjects=2),
    "book": Profile("book", n_subjects=40, rest_s=90.0, tasks_per_subject=2, volume_subjects=4),
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
    return profile
