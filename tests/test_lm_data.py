"""fMRI-LM inputs from parcellated runs through the commands: lm split -> describe -> lm windows."""

import json

import numpy as np
import pytest

from fmri_bench.cli import main

NETS = ["Visual", "Somatomotor", "Dorsal Attention", "Ventral Attention", "Limbic", "Frontoparietal", "Default"]


@pytest.fixture()
def tree(tmp_path):
    """12 subjects in 6 families, a rest and a working-memory run each (100 frames at TR 2 s,
    7 Yeo parcels, as `fmri-bench parcellate --atlas yeo7` writes them), a participants.tsv."""
    rng = np.random.default_rng(0)
    d = tmp_path / "parcels"
    d.mkdir()
    runs, people = [], ["subject\tsex\tage\tfluid_iq\tfamily_id"]
    for i in range(12):
        sub = str(100 + i)
        people.append(f"{sub}\t{'MF'[i % 2]}\t{22 + i}\t{10 + i}\tF{i // 2}")
        for run in ("rfMRI_REST1_LR", "tfMRI_WM_LR"):
            key = f"{sub}_{run}"
            np.save(d / f"{key}.npy", rng.standard_normal((100, 7)).astype(np.float32) + 100)
            runs.append({"key": key, "file": f"{key}.npy", "subject": sub, "atlas": "yeo7", "tr": 2.0,
                         "space": "fs_LR_32k", "source": f"{sub}/MNINonLinear/Results/{run}/{run}.dtseries.nii",
                         "labels": NETS, "networks": NETS})
    (d / "parcels.json").write_text(json.dumps({"atlas": "yeo7", "runs": runs}))
    (tmp_path / "participants.tsv").write_text("\n".join(people) + "\n")
    return tmp_path


def _parts(capsys):
    return {line.split(":")[0]: line.split(":")[1].split() for line in capsys.readouterr().out.splitlines()}


def test_split_describe_windows(tree, capsys):
    tsv = str(tree / "participants.tsv")
    assert main(["lm", "split", str(tree / "parcels"), "--labels-from", tsv, "--out", str(tree / "split.json")]) == 0
    parts = _parts(capsys)
    assert sorted(sum(parts.values(), [])) == [str(100 + i) for i in range(12)] and parts["test"]
    family = {str(100 + i): i // 2 for i in range(12)}
    assert not {family[s] for s in parts["test"]} & {family[s] for s in parts["train"] + parts["val"]}
    corpus = tree / "corpus.jsonl"
    assert main(["describe", str(tree / "parcels"), "--out", str(corpus), "--split", str(tree / "split.json")]) == 0
    assert sorted(json.loads(x)["subject"] for x in corpus.read_text().splitlines()
                  if json.loads(x)["train"]) == sorted(parts["train"] * 2)
    out = tree / "lm"
    assert main(["lm", "windows", str(tree / "parcels"), "--corpus", str(corpus), "--labels-from", tsv,
                 "--out", str(out)]) == 0
    w = np.load(out / "windows.npy")
    assert w.shape == (24, 160, 7) and (w[:, 100:] == 0).all() and np.abs(w[:, :100]).sum() > 0
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    corp = [json.loads(x) for x in (out / "corpus.jsonl").read_text().splitlines()]
    assert all(c["frames"] == 100 for c in corp) and [c["scan"] for c in corp] == [r["scan"] for r in labels]
    for r in labels:
        i = int(r["subject"]) - 100
        assert r["sex"] == ("Male" if i % 2 == 0 else "Female")
        assert r["state"] == ("rest" if "REST" in r["scan"] else "task")
        assert r["paradigm"] == ("rest" if "REST" in r["scan"] else "working memory")
        assert r["part"] == next(p for p, subs in parts.items() if r["subject"] in subs)
        assert r["age_years"] == str(22 + i) and r["fluid_tertile"] in ("lower", "mean", "higher")
    fit = [json.loads(x) for x in (out / "fit" / "labels.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "test" / "labels.jsonl").read_text().splitlines()]
    assert {r["subject"] for r in test} == set(parts["test"]) and not {r["subject"] for r in fit} & set(parts["test"])
    assert len(np.load(out / "fit" / "windows.npy")) == len(fit) and len(fit) + len(test) == 24
    # the tokenizer / lm align reader takes fit/ as it is, padding included
    from fmri_bench.tokenizer_train import TokDataConfig, TokenizerTrainConfig, load_windows

    wd = load_windows(TokenizerTrainConfig(data=TokDataConfig(synthetic=False, windows=str(out / "fit" / "windows.npy"),
                                                              corpus=str(out / "fit" / "corpus.jsonl"))), 0, 0)
    assert (wd.lengths == 100).all() and wd.subjects == [r["subject"] for r in fit]


@pytest.mark.parametrize("case", ["other_train_subjects", "unknown_subject"])
def test_bad_inputs_one_line_exit_2_nothing_written(tree, capsys, case):
    tsv = tree / "participants.tsv"
    corpus = tree / "corpus.jsonl"
    subjects = [str(100 + i) for i in range(12)]
    train = subjects[:8] if case == "other_train_subjects" else None
    if case == "unknown_subject":
        assert main(["lm", "split", str(tree / "parcels")]) == 0
        train = _parts(capsys)["train"]
        tsv.write_text("\n".join(tsv.read_text().splitlines()[:-1]) + "\n")  # subject 111 left out
    assert main(["describe", str(tree / "parcels"), "--out", str(corpus), "--train-subjects", *train]) == 0
    capsys.readouterr()
    out = tree / "lm"
    rc = main(["lm", "windows", str(tree / "parcels"), "--corpus", str(corpus), "--labels-from", str(tsv),
               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert ("z-scored on 8 training subjects" in err) if case == "other_train_subjects" else ("not in the participants" in err)
    assert not out.exists()


def test_parcellate_takes_a_dataset_folder(tmp_path, capsys):
    from fmri_bench.io import write_cifti

    rng = np.random.default_rng(0)
    for sub in ("100", "101"):
        run = tmp_path / "hcp" / sub / "MNINonLinear" / "Results" / "rfMRI_REST1_LR"
        run.mkdir(parents=True)
        write_cifti(run / "rfMRI_REST1_LR_Atlas_MSMAll.dtseries.nii", rng.standard_normal((8, 59412)), tr=0.72)
    assert main(["parcellate", str(tmp_path / "hcp"), "--out", str(tmp_path / "p"), "--atlas", "yeo7"]) == 0
    meta = json.loads((tmp_path / "p" / "parcels.json").read_text())
    assert sorted(r["subject"] for r in meta["runs"]) == ["100", "101"]
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["parcellate", str(tmp_path / "empty"), "--out", str(tmp_path / "q")]) == 2
    assert "no HCP" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_short_runs_skip_rule_through_the_command(tree, capsys):
    """--short skip leaves out a run shorter than one window (pad keeps it, zero-padded); a tail
    after full windows is dropped either way; no run long enough: one line, exit 2, nothing written."""
    tsv = str(tree / "participants.tsv")
    assert main(["lm", "split", str(tree / "parcels"), "--labels-from", tsv, "--out", str(tree / "split.json")]) == 0
    assert main(["describe", str(tree / "parcels"), "--out", str(tree / "c.jsonl"), "--split", str(tree / "split.json")]) == 0
    base = ["lm", "windows", str(tree / "parcels"), "--corpus", str(tree / "c.jsonl"), "--labels-from", tsv]
    # 100 frames a run: 64-frame windows give one full window each (the 36-frame tail dropped), pad or skip alike
    for short in ("pad", "skip"):
        assert main(base + ["--out", str(tree / short), "--length", "64", "--short", short]) == 0
        w = np.load(tree / short / "windows.npy")
        assert w.shape == (24, 64, 7) and (np.abs(w).sum(axis=(1, 2)) > 0).all()
    capsys.readouterr()
    # 160-frame windows: pad keeps every run (test_split_describe_windows), skip has none left
    rc = main(base + ["--out", str(tree / "none"), "--short", "skip"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no run gives a 160-frame window" in err and len(err.splitlines()) == 1, err
    assert not (tree / "none").exists()
