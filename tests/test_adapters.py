"""Real-data layouts end to end through the CLI: an HCP tree and an fMRIPrep derivatives folder,
built in the real layouts from the synthetic generator's files (its CIFTI runs with EVs/, its
MNI152NLin2009cAsym volumes with events), with the labels each layout carries."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fmri_bench import harness
from fmri_bench.cli import main
from fmri_bench.harness import adapters
from fmri_bench.synth import ensure_cohort


@pytest.fixture(scope="module")
def cohort():
    return ensure_cohort("smoke", seed=0)


def hcp_tree(cohort: Path, out: Path) -> Path:
    """SUBJECT/MNINonLinear/Results/RUN/RUN_Atlas_MSMAll.dtseries.nii (+ EVs/) and an HCP
    behavioural CSV (open-access age bins, restricted Family_ID), no ground truth."""
    people = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"subject": str})
    for run in sorted(cohort.glob("*/MNINonLinear/Results/*/*_Atlas_MSMAll.dtseries.nii")):
        dest = out / run.relative_to(cohort)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run, dest)
        if (run.parent / "EVs").is_dir():
            shutil.copytree(run.parent / "EVs", dest.parent / "EVs")
    bins = pd.cut(people["age"], [0, 25, 30, 35, 200], labels=["22-25", "26-30", "31-35", "36+"])
    pd.DataFrame({"Subject": people["subject"], "Gender": people["sex"], "Age": bins.astype(str),
                  "PMAT24_A_CR": (people["fluid_iq"] * 4 + 17).round(), "Family_ID": people["family_id"]}
                 ).to_csv(out / "unrestricted_hcp_behavioral.csv", index=False)
    return out


def test_hcp_tree_through_the_cli(cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path / "data"))
    tree = hcp_tree(cohort, tmp_path / "HCP")
    assert adapters.detect_layout(tree) == "hcp"
    out = tmp_path / "ident.json"
    assert main(["baseline", "fc", "--task", "identify", "--data", str(tree), "--out", str(out)]) == 0
    (rec,) = [r for r in json.loads(out.read_text()) if r["method"] == "fc"]
    assert rec["source"] == "real" and rec["n"] == 6  # every subject has REST1 and REST2
    data = harness.load_dataset(tree)
    # labels from the behavioural CSV: sex as M / F, age as the bin's midpoint, families kept
    people = data.participants.set_index("subject")
    truth = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"subject": str}).set_index("subject")
    assert (people["sex"] == truth["sex"]).all() and (people["family_id"] == truth["family_id"]).all()
    assert set(people["age"]) <= {23.5, 28.0, 33.0, 36.0}
    assert {r.kind for r in data.runs} == {"rest", "task"} and any(r.events for r in data.runs)
    # flattened once: a second load reuses the shards (same folder, not rewritten)
    shards = sorted(Path(u) for u in data.urls)
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert sorted(Path(u) for u in harness.load_dataset(tree).urls) == shards
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    # what the layout cannot support is one line: no behavioural CSV -> no trait
    (tree / "unrestricted_hcp_behavioral.csv").unlink()
    capsys.readouterr()
    assert main(["baseline", "fc", "--task", "sex", "--data", str(tree)]) == 2
    err = capsys.readouterr().err.strip()
    assert "trait 'sex' needs a participants.tsv with a 'sex' column" in err and "\n" not in err


def fmriprep_tree(cohort: Path, out: Path) -> Path:
    """sub-*/func/*_space-MNI152NLin2009cAsym*_bold.nii.gz with BIDS events and participants.tsv."""
    for bold in sorted((cohort / "bids").glob("sub-*/func/*_bold.nii.gz")):
        dest = out / bold.relative_to(cohort / "bids")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bold, dest)
        ev = bold.with_name(bold.name.replace("_bold.nii.gz", "_events.tsv"))
        if ev.is_file():  # raw-BIDS naming: the run's entities without space / res
            stem = dest.name.split("_space-")[0]
            shutil.copy(ev, dest.with_name(f"{stem}_events.tsv"))
    people = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"subject": str})
    pd.DataFrame({"participant_id": "sub-" + people["subject"], "sex": people["sex"].map({"M": "male", "F": "female"}),
                  "age": people["age"]}).to_csv(out / "participants.tsv", sep="\t", index=False)
    return out


def test_fmriprep_tree_through_the_cli(cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path / "data"))
    tree = fmriprep_tree(cohort, tmp_path / "derivatives")
    assert adapters.detect_layout(tree) == "fmriprep"
    data = harness.load_dataset(tree)
    assert {r.kind for r in data.runs} == {"rest", "task"}
    assert all(r.subject in set(data.participants["subject"]) for r in data.runs)
    assert set(data.participants["sex"]) <= {"M", "F"} and "fluid_iq" not in data.participants
    task = [r for r in data.runs if r.kind == "task"]
    assert task and all(r.events for r in task)  # BIDS events found beside the runs
    # no events (the shards are made again: events are inputs): the state task is refused in one line
    for ev in tree.rglob("*_events.tsv"):
        ev.unlink()
    capsys.readouterr()
    assert main(["baseline", "fc", "--task", "state21", "--data", str(tree)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmri-bench baseline: error: ") and "state21 needs" in err and "\n" not in err


def test_a_tree_with_no_runs_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub-01" / "func").mkdir(parents=True)
    assert main(["baseline", "fc", "--task", "sex", "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no flat-map shards (*.tar), no HCP or fMRIPrep runs" in err and str(tmp_path / "empty") in err


def test_published_flatmap_shards_in_the_upstream_layout(tmp_path, capsys):
    """Samples keyed and described as the upstream HCP-Flat shards (``sub-..._mod-rfMRI_task-REST1_
    mag-3T_dir-LR``, meta sub / mod / task / mag / dir / n_frames, no TR: upstream resamples to
    1 s) are read as they are: subjects and sessions from the keys, traits from participants.tsv."""
    import numpy as np

    from fmri_bench.shards import ShardWriter

    rng = np.random.default_rng(0)
    mask = np.zeros((16, 40), bool)
    mask[2:14, 2:38] = True
    P = int(mask.sum())
    subjects = [str(100300 + i) for i in range(6)]
    with ShardWriter(tmp_path / "hcp-flat", shard_size=4, prefix="hcp-flat") as w:
        for s in subjects:
            for ses in ("REST1", "REST2"):
                bold = rng.normal(size=(32, P)).astype(np.float16)
                meta = {"sub": s, "mod": "rfMRI", "task": ses, "mag": "3T", "dir": "LR", "n_frames": 32}
                w.write(f"sub-{s}_mod-rfMRI_task-{ses}_mag-3T_dir-LR", bold, mask, meta, [])
    pd.DataFrame({"subject": subjects, "sex": ["F", "M"] * 3}).to_csv(tmp_path / "hcp-flat" / "participants.tsv",
                                                                     sep="\t", index=False)
    data = harness.load_dataset(tmp_path / "hcp-flat")
    assert sorted({(r.subject, r.kind, r.session) for r in data.runs}) == sorted(
        (s, "rest", ses) for s in subjects for ses in ("REST1", "REST2"))
    quad = np.zeros(P, int) + 1 + (np.arange(P) % 4)  # 4 parcels interleaved over the pixels
    ident = harness.benchmark("identify", data, methods=("fc",), atlas=quad)
    assert ident.records[0].source == "real" and ident.records[0].n == 6
    # no task runs: the state task is one line naming the folder
    assert main(["baseline", "fc", "--task", "state21", "--data", str(tmp_path / "hcp-flat")]) == 2
    err = capsys.readouterr().err.strip()
    assert "state21 needs task runs with events; the data hold none" in err and "hcp-flat" in err


def test_fmriprep_fsaverage5_gifti_pairs(tmp_path, monkeypatch):
    """fMRIPrep's surface outputs: *_space-fsaverage5_hemi-L/R_bold.func.gii pairs, TR from the header."""
    import numpy as np

    from fmri_bench import io

    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path / "data"))
    rng = np.random.default_rng(0)
    tree = tmp_path / "derivatives"
    events = pd.DataFrame({"onset": [0.0, 20.0], "duration": [12.0, 12.0], "trial_type": ["lh", "rh"]})
    for sub in ("01", "02"):
        func = tree / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        for task in ("rest", "motor"):
            stem = f"sub-{sub}_task-{task}_run-1"
            for hemi in "LR":
                io.write_gifti(func / f"{stem}_space-fsaverage5_hemi-{hemi}_bold.func.gii",
                               rng.normal(size=(24, 10242)).astype(np.float32), tr=2.0)
            if task == "motor":
                events.to_csv(func / f"{stem}_events.tsv", sep="\t", index=False)
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "sex": ["F", "M"]}).to_csv(
        tree / "participants.tsv", sep="\t", index=False)
    assert [p.name for p in adapters.fmriprep_runs(tree)][:1] == ["sub-01_task-motor_run-1_space-fsaverage5_hemi-L_bold.func.gii"]
    data = harness.load_dataset(tree)
    assert sorted((r.subject, r.kind) for r in data.runs) == [("01", "rest"), ("01", "task"), ("02", "rest"), ("02", "task")]
    task = [r for r in data.runs if r.kind == "task"]
    assert all(len(r.events) == 2 and r.paradigm == "MOTOR" for r in task)
    assert list(data.participants["sex"]) == ["F", "M"]
