"""The synthetic HCP-like cohort: data that look like HCP fMRI, with the ground truth beside them.

In: a profile (``smoke`` | ``book`` | ``scaling`` or a :class:`Profile`), an output directory,
optionally the number of subjects and a seed. Out: the files described in
:mod:`fmri_bench.synth.writer` and a :class:`CohortSummary`.

    from fmri_bench.synth import simulate
    summary = simulate("smoke", "data/synth")      # CIFTI + EVs + NIfTI + ground truth
    print(summary.line())

Modules: ``cohort`` (subjects, traits, families, connectome fingerprints), ``timeseries``
(1/f sources), ``tasks`` (HCP paradigms, events, HRF regressors, the 21 classes), ``maps``
(source and activation maps on fs_LR 32k), ``deform`` (each subject's smooth deformation of
those maps), ``noise`` (sites and noise, fresh noise maps every run), ``volume`` (MNI152 runs),
``generate`` (truth -> run data), ``writer`` (files, shards), ``checks`` (analyses that show the
truth is in the data), ``figures`` (chapter 0 plots). ``ensure_cohort(profile)``
simulates a profile once per machine (under ``paths.data_dir()``) and reuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fmri_bench.errors import InputError
from fmri_bench.synth.profiles import MIN_SUBJECTS, PROFILES, Profile, get_profile

__all__ = ["simulate", "CohortSummary", "Profile", "PROFILES", "get_profile", "MIN_SUBJECTS",
           "InputError", "load_ground_truth", "ensure_cohort"]


@dataclass
class CohortSummary:
    out: Path
    profile: str
    seed: int
    n_subjects: int
    n_runs: int
    n_frames: int
    seconds: float
    bytes: int
    tsnr: dict = field(default_factory=dict)  # site -> median tSNR over its runs
    streamed: bool = False

    def line(self) -> str:
        t = ", ".join(f"site {k} {v:.0f}" for k, v in sorted(self.tsnr.items()))
        what = "shards" if self.streamed else "CIFTI"
        return (f"simulated {self.profile}: {self.n_subjects} subjects, {self.n_runs} runs, "
                f"{self.n_frames} frames ({what}) in {self.seconds:.1f} s, "
                f"{self.bytes / 1e6:.0f} MB -> {self.out}; median tSNR {t}")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def simulate(profile: str | Profile, out, subjects: int | None = None, seed: int = 0,
             progress: bool = True, overwrite: bool = False) -> CohortSummary:
    """Generate a cohort and write it under ``out``; see :mod:`fmri_bench.synth.writer`.

    The cohort is written into a hidden sibling folder and moved to ``out`` when complete, so
    an interrupted run leaves no half cohort at ``out``. ``out`` must be new or empty; a folder
    holding an earlier cohort is replaced only with ``overwrite`` (a folder holding anything
    else never is).
    """
    import os
    import re
    import shutil

    import numpy as np
    from tqdm.auto import tqdm

    from fmri_bench.paths import remove_dead_work
    from fmri_bench.synth import writer
    from fmri_bench.synth.generate import Synthesizer

    t0 = time.perf_counter()
    prof = get_profile(profile, subjects)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    final = Path(out).resolve()  # its parent holds the hidden work folder (also for "." or "x/")
    if final.is_dir() and any(final.iterdir()):
        if not (final / "ground_truth.json").is_file():
            raise InputError("output directory is not empty and holds no simulated cohort: "
                             "give a new or empty directory", final)
        if not overwrite:
            raise InputError("output directory already holds a simulated cohort: "
                             "pass --overwrite to replace it", final)
    writer.check_out_dir(final)
    remove_dead_work(final.parent, rf"\.{re.escape(final.name)}\.partial-(?P<pid>\d+)")  # a killed run's
    out = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    writer.check_out_dir(out)
    try:
        sy = Synthesizer(prof, seed=int(seed))
        sink = writer.ShardSink(out) if prof.stream else None
        records = []
        try:
            for spec in tqdm(sy.runs, desc=f"simulate {prof.name}", unit="run", disable=not progress):
                records.append(sink.write(out, sy, spec) if sink else writer.write_run_files(out, sy, spec))
        finally:
            if sink:
                sink.close()
        writer.write_participants(out, sy.cohort.participants)
        gt, arrays = writer.ground_truth(sy, records, prof.name)
        writer.write_json(out / "ground_truth.json", gt)
        writer.save_npz(out / "ground_truth.npz", arrays)
        n_bytes = _dir_bytes(out)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)  # the earlier cohort (or the empty folder) out of the way, then swap
        out.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    tsnr = {}
    for site in sorted({r["site"] for r in records}):
        tsnr[site] = float(np.median([r["tsnr_median"] for r in records if r["site"] == site]))
    return CohortSummary(final, prof.name, int(seed), len(sy.cohort.participants), len(records),
                         sum(r["n_frames"] for r in records), time.perf_counter() - t0,
                         n_bytes, tsnr, prof.stream)


def load_ground_truth(out) -> tuple[dict, dict]:
    """(ground_truth.json as dict, ground_truth.npz arrays) of a simulated cohort directory."""
    import json

    import numpy as np

    out = Path(out)
    path = out / "ground_truth.json"
    if not path.is_file():
        raise InputError("no ground_truth.json here: not a simulated cohort (run fmri-bench simulate)", out)
    with np.load(out / "ground_truth.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(path.read_text()), arrays


def ensure_cohort(profile: str = "smoke", seed: int = 0, out=None, progress: bool = False) -> Path:
    """The cohort directory for (profile, seed), simulated on first use and reused afterwards.

    Default location: ``fmri_bench.paths.data_dir() / "synth" / f"{profile}-seed{seed}"``.
    Chapters and benchmarks share it, so a profile is generated once per machine. A cohort of
    an older generator version is replaced.
    """
    import json

    from fmri_bench.paths import data_dir
    from fmri_bench.synth.generate import GENERATOR_VERSION

    default = out is None
    out = Path(out) if out is not None else data_dir() / "synth" / f"{profile}-seed{seed}"
    gt = out / "ground_truth.json"
    if gt.is_file():
        meta = json.loads(gt.read_text())
        if (meta.get("generator_version"), meta.get("profile"), meta.get("seed")) == (GENERATOR_VERSION, profile, seed):
            return out
    if out.is_dir() and not gt.is_file() and any(out.iterdir()) and default:
        import shutil

        shutil.rmtree(out)  # our own cache folder, holding no complete cohort
    simulate(profile, out, seed=seed, progress=progress, overwrite=True)
    return out
