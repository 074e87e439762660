"""Real-data layouts a benchmark takes by ``--data PATH``: found, flattened once, labelled.

In: a directory in one of two layouts (a folder of flat-map shards needs no adapter):

- **HCP**: ``SUBJECT/MNINonLinear/Results/RUN/RUN_Atlas_MSMAll.dtseries.nii`` (or ``RUN_Atlas``),
  with ``EVs/`` beside task runs, and a behavioural CSV with the HCP column names anywhere at
  the top level: ``Subject``, ``Gender`` (M / F), ``Age`` (the open-access bins "22-25", "26-30",
  "31-35", "36+") or ``Age_in_Yrs`` (restricted), ``PMAT24_A_CR`` (fluid intelligence, Penn
  matrices correct responses), ``Family_ID`` (restricted; else each subject is its own family).
- **fMRIPrep** (BIDS derivatives): ``sub-*/[ses-*/]func/*_space-MNI152NLin2009cAsym*_bold.nii.gz``
  (projected to fsaverage5) or ``*_space-fsaverage5_hemi-L*_bold.func.gii`` (with its hemi-R
  pair), BIDS ``*_events.tsv`` for task runs and ``participants.tsv`` (``participant_id``,
  ``sex``, ``age``, optional ``fluid_iq`` / ``family_id``).

Out: a folder of flat-map shards (``fmri_bench.convert.flatten``, resumable) with a
``participants.tsv`` in the project's columns (subject, sex, age, fluid_iq, family_id; missing
columns left out, so a trait the data cannot support is one clear error later), cached under
``paths.data_dir() / "shards"`` and rebuilt only when the inputs change.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save

LAYOUTS = ("hcp", "fmriprep")
_HCP_GLOBS = ("*/MNINonLinear/Results/*/*_Atlas_MSMAll.dtseries.nii", "*/MNINonLinear/Results/*/*_Atlas.dtseries.nii")
_FMRIPREP_GLOBS = ("sub-*/func/*_space-MNI152NLin2009cAsym*_bold.nii.gz", "sub-*/ses-*/func/*_space-MNI152NLin2009cAsym*_bold.nii.gz",
                   "sub-*/func/*_space-fsaverage5*_hemi-L*_bold.func.gii", "sub-*/ses-*/func/*_space-fsaverage5*_hemi-L*_bold.func.gii")
COLUMNS = ("subject", "sex", "age", "fluid_iq", "family_id")


def hcp_runs(root: Path) -> list[Path]:
    """The MSMAll runs of an HCP tree (one per run folder; MSMAll preferred to MSMSulc)."""
    found: dict[Path, Path] = {}
    for pattern in _HCP_GLOBS:
        for p in sorted(root.glob(pattern)):
            found.setdefault(p.parent, p)
    return sorted(found.values())


def fmriprep_runs(root: Path) -> list[Path]:
    """The bold runs of an fMRIPrep derivatives folder: MNI152NLin2009cAsym volumes, else the
    fsaverage5 left hemispheres (``flatten`` pairs each with its right one)."""
    vols = sorted(p for g in _FMRIPREP_GLOBS[:2] for p in root.glob(g))
    return vols or sorted(p for g in _FMRIPREP_GLOBS[2:] for p in root.glob(g))


def detect_layout(root: Path) -> str | None:
    """"hcp" | "fmriprep" | None, from the files present."""
    if hcp_runs(root):
        return "hcp"
    if fmriprep_runs(root):
        return "fmriprep"
    return None


def _age_years(value) -> float:
    """HCP open-access age bins ("26-30", "36+") -> the bin's midpoint; numbers pass through."""
    text = str(value).strip()
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if m:
        return (float(m.group(1)) + float(m.group(2))) / 2
    m = re.fullmatch(r"(\d+)\+", text)
    return float(m.group(1)) if m else float(text)


def _sex(values, source: Path) -> list[str]:
    table = {"m": "M", "male": "M", "f": "F", "female": "F"}
    out = []
    for v in values:
        key = str(v).strip().lower()
        if key not in table:
            raise InputError(f"sex / Gender value {v!r} is not M / F / male / female", source)
        out.append(table[key])
    return out


def hcp_participants(root: Path) -> pd.DataFrame | None:
    """The participants table from the HCP behavioural CSV at the tree's top level (None if none)."""
    for csv in sorted(root.glob("*.csv")):
        df = pd.read_csv(csv, dtype={"Subject": str, "Family_ID": str})
        if "Subject" not in df:
            continue
        out = pd.DataFrame({"subject": df["Subject"].astype(str)})
        if "Gender" in df:
            out["sex"] = _sex(df["Gender"], csv)
        if "Age_in_Yrs" in df:
            out["age"] = df["Age_in_Yrs"].astype(float)
        elif "Age" in df:
            out["age"] = [_age_years(v) for v in df["Age"]]
        if "PMAT24_A_CR" in df:
            out["fluid_iq"] = df["PMAT24_A_CR"].astype(float)
        out["family_id"] = df["Family_ID"].astype(str) if "Family_ID" in df else out["subject"]
        return out
    return None


def bids_participants(root: Path) -> pd.DataFrame | None:
    """The participants table from a BIDS ``participants.tsv`` (here or in the parent)."""
    for tsv in (root / "participants.tsv", root.parent / "participants.tsv"):
        if not tsv.is_file():
            continue
        df = pd.read_csv(tsv, sep="\t", dtype={"participant_id": str, "family_id": str})
        if "participant_id" not in df:
            raise InputError("participants.tsv needs a participant_id column (BIDS)", tsv)
        out = pd.DataFrame({"subject": [s.removeprefix("sub-") for s in df["participant_id"].astype(str)]})
        if "sex" in df:
            out["sex"] = _sex(df["sex"], tsv)
        for col in ("age", "fluid_iq"):
            if col in df:
                out[col] = pd.to_numeric(df[col], errors="coerce")
        out["family_id"] = df["family_id"].astype(str) if "family_id" in df else out["subject"]
        return out
    return None


def _stamp(runs: list[Path], layout: str) -> str:
    """What the shards depend on: the layout, each run's and its events' paths, sizes and mtimes."""
    from fmri_bench.io import find_events

    h = hashlib.sha256(layout.encode())
    for p in runs:
        ev = find_events(p)
        files = [p] + (sorted(ev.iterdir()) if ev is not None and ev.is_dir() else [ev] if ev else [])
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def real_shards(root: str | Path, out: str | Path | None = None, progress: bool = False) -> Path:
    """Flatten an HCP or fMRIPrep directory into shards once -> the shard folder (with
    participants.tsv). Reused while the inputs are the same; an interrupted conversion resumes."""
    from fmri_bench.convert import flatten
    from fmri_bench.paths import data_dir

    root = Path(root)
    layout = detect_layout(root)
    if layout is None:
        raise InputError("no HCP runs (SUBJECT/MNINonLinear/Results/RUN/RUN_Atlas_MSMAll.dtseries.nii) and no "
                         "fMRIPrep runs (sub-*/func/*_space-MNI152NLin2009cAsym*_bold.nii.gz or fsaverage5 GIFTI) here",
                         root)
    runs = hcp_runs(root) if layout == "hcp" else fmriprep_runs(root)
    stamp = _stamp(runs, layout)
    out = Path(out) if out is not None else data_dir() / "shards" / f"{root.resolve().name}-{layout}-{stamp}"
    done = out / "inputs.json"
    record = {"layout": layout, "root": str(root.resolve()), "stamp": stamp, "inputs": [str(p) for p in runs]}
    if not (done.is_file() and json.loads(done.read_text()) == record):
        summary = flatten([str(p) for p in runs], out, progress=progress, resume=out.is_dir(), shard_size=8)
        if summary.failed:
            path, why = summary.failed[0]
            raise InputError(f"{len(summary.failed)} of {len(runs)} runs failed to flatten (first: {path}: {why})",
                             root)
        atomic_save(lambda tmp: tmp.write_text(json.dumps(record)), done)
    # the labels are read afresh every time (cheap), so an edited CSV / participants.tsv counts
    people = hcp_participants(root) if layout == "hcp" else bids_participants(root)
    if people is not None:
        atomic_save(lambda tmp: people.to_csv(tmp, sep="\t", index=False), out / "participants.tsv")
    elif (out / "participants.tsv").exists():
        (out / "participants.tsv").unlink()
    return out


__all__ = ["LAYOUTS", "COLUMNS", "bids_participants", "detect_layout", "fmriprep_runs", "hcp_participants",
           "hcp_runs", "real_shards"]
