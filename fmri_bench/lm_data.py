"""fMRI-LM inputs from real scans: the subject split, the windows, the corpus and the labels.

The fMRI-LM chain on an HCP tree or an fMRIPrep derivatives folder, commands only::

    fmri-bench parcellate DATA --out parcels/                    # DATA: an HCP tree or fMRIPrep folder
    fmri-bench lm split parcels/ --labels-from DATA --out split.json
    fmri-bench describe parcels/ --out corpus.jsonl --split split.json
    fmri-bench lm windows parcels/ --corpus corpus.jsonl --labels-from DATA --out lmdata/
    fmri-bench tokenizer / lm align  (data.windows=lmdata/fit/windows.npy data.corpus=lmdata/fit/corpus.jsonl)
    fmri-bench lm instruct           (--windows lmdata/fit/windows.npy --labels lmdata/fit/labels.jsonl)
    fmri-bench lm evaluate --checkpoint runs/instruct/fmri_lm.pt --data lmdata/ --out results/lm_answers.json
    (the answers on the test subjects, lmdata/test/; fmri-bench ask on one scan)

- ``subject_parts``: subject -> "train" | "val" | "test", the first of the benchmarks'
  family-grouped re-splits (``splits.resplits(..., seed)[0]``, as ``harness.tasks.splits_for``
  draws them; one sample per subject gives the same families in each part, since the split is
  drawn over families). ``describe`` z-scores on the train subjects; stages 1-3 fit on train
  and val (``fit/``); the test subjects (``test/``), with their families, are in no training
  step.
- ``participants_table``: the labels a dataset carries, read by the benchmarks' adapters
  (``harness.adapters``: the HCP behavioural CSV, a BIDS participants.tsv) or a participants.tsv.
- ``lm_windows``: parcel runs + their descriptor corpus -> ``windows.npy`` (n, length, R)
  (``tokenizer_train.corpus_windows``: TR 2 s, robust z per parcel, consecutive windows; a run
  shorter than one window is zero-padded when it has at least length / 4 frames, else left out,
  or left out with ``short="skip"``), the per-window corpus (text, subject, scan, frames) and
  the labels (subject, text, part and each label the data support: ``sex`` Male / Female,
  ``fluid_tertile`` by the train subjects' tertiles of fluid_iq, ``age_bin``, ``age_years`` when
  the ages are years rather than HCP's open-access bins, ``state`` rest / task and ``paradigm``
  from the run name (a run with events beside it is a task run)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fmri_bench.errors import InputError

PARTS = ("train", "val", "test")
FILES = ("windows.npy", "corpus.jsonl", "labels.jsonl")
HCP_AGE_BIN_MIDPOINTS = {23.5, 28.0, 33.0, 36.0}  # adapters._age_years of "22-25" ... "36+"


def participants_table(data):
    """The participants table (subject, sex, age, fluid_iq, family_id; what the data carry) of
    an HCP tree, an fMRIPrep folder, a folder with participants.tsv, or a participants.tsv."""
    import pandas as pd

    from fmri_bench.harness import adapters

    root = Path(data)
    if root.is_file():
        people = pd.read_csv(root, sep="\t" if root.suffix == ".tsv" else ",", dtype={"subject": str, "family_id": str})
        if "subject" not in people:
            raise InputError("a participants table needs a 'subject' column", root)
        return people
    if not root.is_dir():
        raise InputError("labels source not found", root)
    layout = adapters.detect_layout(root)
    people = adapters.hcp_participants(root) if layout == "hcp" else adapters.bids_participants(root)
    if people is None and (root / "participants.tsv").is_file():
        return participants_table(root / "participants.tsv")
    if people is None:
        raise InputError("no participants table here (an HCP behavioural CSV with a Subject column, or a "
                         "participants.tsv)", root)
    return people


def subject_parts(subjects, people=None, seed: int = 0) -> dict[str, str]:
    """subject -> "train" | "val" | "test": the first of the benchmarks' re-splits
    (``splits.resplits``), grouped by ``people``'s family_id when it has one."""
    from fmri_bench.splits import resplits

    subjects = np.array(sorted(set(map(str, subjects))))
    families = None
    if people is not None and "family_id" in people:
        fam = dict(zip(people["subject"].astype(str), people["family_id"].astype(str)))
        families = np.array([fam.get(s, s) for s in subjects])
    split = resplits(subjects, families, n_splits=1, seed=seed)[0]
    return {str(subjects[i]): name for name in PARTS for i in split.part(name)}


def check_subjects(subjects, people, source) -> None:
    """Every subject must be in the participants table: else one line naming some."""
    missing = sorted(set(map(str, subjects)) - set(people["subject"].astype(str)))
    if missing:
        raise InputError(f"{len(missing)} of {len(set(subjects))} subjects of the runs are not in the participants "
                         f"table, e.g. {', '.join(missing[:3])}", source)


def parcel_split(parcels_dir, labels_from=None, seed: int = 0) -> dict[str, str]:
    """``fmri-bench lm split``: the subject parts of the runs in a parcellate directory."""
    from fmri_bench.parcels import load_parcels

    subjects = _subjects(load_parcels(parcels_dir), parcels_dir)
    people = None
    if labels_from is not None:
        people = participants_table(labels_from)
        check_subjects(subjects, people, labels_from)
    return subject_parts(subjects, people, seed)


def write_split(parts: dict[str, str], path, seed: int = 0) -> None:
    """The subject parts as JSON ({"seed", "parts": {subject: part}}), written atomically."""
    from fmri_bench.paths import atomic_save

    text = json.dumps({"seed": seed, "parts": parts}, indent=1) + "\n"
    atomic_save(lambda p: Path(p).write_text(text), Path(path))


def read_split(path) -> dict[str, str]:
    """subject -> part of a split JSON (``write_split``; also lm windows' split.json)."""
    path = Path(path)
    try:
        parts = json.loads(path.read_text())["parts"]
    except FileNotFoundError:
        raise InputError("split file not found", path) from None
    except (ValueError, KeyError, TypeError):
        raise InputError("not a split file (JSON with 'parts', as lm split --out writes)", path) from None
    if not isinstance(parts, dict) or not set(parts.values()) <= set(PARTS) or "train" not in parts.values():
        raise InputError("split has no train subjects, or parts other than train / val / test", path)
    return {str(k): str(v) for k, v in parts.items()}


def _subjects(series, parcels_dir) -> list[str]:
    if not series:
        raise InputError("the parcellate directory holds no runs", parcels_dir)
    nameless = [s.key for s in series if not s.subject]
    if nameless:
        raise InputError(f"run {nameless[0]!r} has no subject (BIDS sub-XX or an HCP SUBJECT/MNINonLinear path)",
                         parcels_dir)
    return [str(s.subject) for s in series]


def run_state(series) -> tuple[str | None, str | None]:
    """(state "rest" | "task" | None, paradigm option | None) of a run, from its name
    (``harness.datasets.run_identity``: HCP rfMRI / tfMRI names, BIDS task-); a run of unknown
    name with events beside it (``io.find_events``) is a task run of unknown paradigm."""
    from fmri_bench.harness.datasets import run_identity
    from fmri_bench.io import find_events
    from fmri_bench.lm_instruct import PARADIGMS

    _, kind, _, paradigm = run_identity(str(series.key), {"source": str(series.source)})
    if kind == "unknown":
        try:
            kind = "task" if find_events(series.source) is not None else None
        except OSError:
            kind = None
    if kind == "rest":
        return "rest", PARADIGMS["REST"]
    return kind, PARADIGMS.get(str(paradigm).upper()) if paradigm else None


def subject_labels(people, subjects, parts) -> tuple[dict[str, dict], list[str]]:
    """subject -> {label: value} for the questions of ``lm_instruct.QUESTIONS``, and notes on
    the labels left out (a label the table lacks, or ages outside the HCP young-adult bins)."""
    from fmri_bench.lm_instruct import age_bin, age_years, tertile_labels

    people = people.astype({"subject": str}).drop_duplicates("subject").set_index("subject")
    subs = sorted(set(subjects))
    out = {s: {} for s in subs}
    notes = []
    if "sex" in people:
        words = {"m": "Male", "male": "Male", "f": "Female", "female": "Female"}
        for s in subs:
            v = str(people.loc[s, "sex"]).strip().lower()
            if v not in words:
                raise InputError(f"subject {s}: sex {people.loc[s, 'sex']!r} is not M / F / Male / Female")
            out[s]["sex"] = words[v]
    else:
        notes.append("no sex column")
    if "fluid_iq" in people and people.loc[subs, "fluid_iq"].notna().all():
        v = people.loc[subs, "fluid_iq"].to_numpy(float)
        train = np.array([parts[s] == "train" for s in subs])
        for s, t in zip(subs, tertile_labels(v, train)):
            out[s]["fluid_tertile"] = str(t)
    else:
        notes.append("no fluid_iq for every subject")
    if "age" in people and people.loc[subs, "age"].notna().all():
        ages = people.loc[subs, "age"].to_numpy(float)
        try:
            bins = age_bin(ages)
            years = None if set(ages.tolist()) <= HCP_AGE_BIN_MIDPOINTS else age_years(ages)
        except InputError as err:
            notes.append(f"no age labels ({err.problem})")
        else:
            for k, s in enumerate(subs):
                out[s]["age_bin"] = str(bins[k])
                if years is not None:
                    out[s]["age_years"] = str(years[k])
            if years is None:
                notes.append("ages are HCP open-access bins: age_bin only")
    else:
        notes.append("no age for every subject")
    return out, notes


def lm_windows(parcels_dir, corpus, out, labels_from=None, seed: int = 0, length: int = 160, tr: float = 2.0,
               short: str = "pad", networks: bool = False) -> str:
    """``fmri-bench lm windows``: write ``out/{windows.npy, corpus.jsonl, labels.jsonl}`` (every
    window), the same three for the train + val subjects in ``out/fit/`` and for the test
    subjects in ``out/test/``, and ``out/split.json``. Everything is computed and checked
    before anything is written; each file is written atomically. -> a one-line summary."""
    from fmri_bench.descriptors import label_leaks
    from fmri_bench.parcels import load_parcels, network_series
    from fmri_bench.paths import atomic_save
    from fmri_bench.tokenizer_train import corpus_windows

    series = load_parcels(parcels_dir)
    subjects = _subjects(series, parcels_dir)
    records = _read_corpus(corpus)
    atlases = {r.get("atlas") for r in records} - {None}
    if atlases and atlases != {series[0].atlas}:
        raise InputError(f"the corpus was described from atlas {sorted(atlases)[0]!r}, the parcels are "
                         f"{series[0].atlas!r}: describe this parcellate directory", corpus)
    people = None
    if labels_from is not None:
        people = participants_table(labels_from)
        check_subjects(subjects, people, labels_from)
    parts = subject_parts(subjects, people, seed)
    z_train = {str(r["subject"]) for r in records if r.get("train")}
    want = {s for s, p in parts.items() if p == "train"}
    if "train" in records[0] and z_train != want:
        raise InputError(f"the corpus is z-scored on {len(z_train)} training subjects, the split (seed {seed}) has "
                         f"{len(want)} others: describe with --train-subjects from `fmri-bench lm split`", corpus)
    sub_labels, notes = subject_labels(people, subjects, parts) if people is not None else ({}, ["no --labels-from"])
    runs = [network_series(s) for s in series] if networks else series
    data = corpus_windows(runs, records, tr=tr, length=length, short=short)
    state = {s.key: run_state(s) for s in series}
    rows, corp = [], []
    for i, (scan, subject) in enumerate(zip(data.scans, data.subjects)):
        lab = {"subject": subject, "scan": scan, "part": parts[subject], "text": data.texts[i],
               **sub_labels.get(subject, {})}
        st, par = state[scan]
        if st is not None:
            lab["state"] = st
        if par is not None:
            lab["paradigm"] = par
        # the trait and state vocabulary (descriptors.LEAK_WORDS) and the scan's own numbers and id;
        # the tertile words (lower / mean / higher) are everyday words of any descriptor
        leaks = label_leaks(data.texts[i], {k: lab[k] for k in ("subject", "age_years", "age_bin") if k in lab})
        if leaks:
            raise InputError(f"the descriptor text of scan {scan!r} states a label ({leaks[0]})", corpus)
        rows.append(lab)
        corp.append({"text": data.texts[i], "subject": subject, "scan": scan, "frames": int(data.lengths[i])})
    n_runs = len({s.key for s in series})
    kept = len(set(data.scans))

    def write(folder: Path, idx) -> None:
        idx = np.asarray(idx, int)
        w = np.ascontiguousarray(data.windows[idx])
        atomic_save(lambda p: np.save(p, w), folder / "windows.npy")
        for name, recs in (("corpus.jsonl", corp), ("labels.jsonl", rows)):
            text = "".join(json.dumps(recs[i]) + "\n" for i in idx)
            atomic_save(lambda p, t=text: Path(p).write_text(t), folder / name)

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("output exists and is not a directory", out)
    part_of = np.array([r["part"] for r in rows])
    fit, test = np.flatnonzero(part_of != "test"), np.flatnonzero(part_of == "test")
    write(out, np.arange(len(rows)))
    write(out / "fit", fit)
    write(out / "test", test)
    split = {"seed": seed, "source": _source(labels_from), "how": "splits.resplits(subjects, families, n_splits=1, seed)[0], as the benchmarks",
             "parts": parts, "labels": sorted({k for r in rows for k in r} - {"subject", "scan", "part", "text"}),
             "notes": notes, "short": short, "length": length, "tr": tr}
    atomic_save(lambda p: Path(p).write_text(json.dumps(split, indent=1) + "\n"), out / "split.json")
    counts = {p: sum(v == p for v in parts.values()) for p in PARTS}
    return (f"{len(rows)} windows {tuple(data.windows.shape[1:])} from {kept} of {n_runs} runs "
            f"({n_runs - kept} shorter than {max(1, length // 4) if short == 'pad' else length} frames at TR {tr:g} s, "
            f"left out); subjects train {counts['train']} / val {counts['val']} / test {counts['test']}; "
            f"labels {', '.join(split['labels']) or 'none'} -> {out}")


def _source(labels_from) -> str:
    """'synthetic' when the labels come from a simulated cohort (its ground_truth.json beside
    them), 'real' for any other labels, 'unknown' without labels: the rows' source label."""
    if labels_from is None:
        return "unknown"
    p = Path(labels_from)
    return "synthetic" if any((d / "ground_truth.json").is_file() for d in (p, p.parent)) else "real"


def _read_corpus(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError("corpus not found", path)
    recs = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"line {ln} is not JSON", path) from None
            if not isinstance(r, dict) or not {"scan", "subject", "text"} <= set(r):
                raise InputError(f"line {ln} lacks scan / subject / text (write it with fmri-bench describe)", path)
            recs.append(r)
    if not recs:
        raise InputError("empty corpus", path)
    return recs
