"""Descriptor corpus: planted FC effects recovered, no labels in texts, training-only z."""

import json

import numpy as np
import pytest

from fmri_bench import descriptors as D
from fmri_bench import parcels as P

EFFECT = {"trait": "fluid_iq", "net_a": "Frontoparietal", "net_b": "Default", "beta": 0.5}


@pytest.fixture(scope="module")
def cohort():
    """14 synthetic subjects, one 240 s rest run each, fluid_iq planted in FPN-DMN coupling."""
    from fmri_bench.synth.cohort import TraitEffect
    from fmri_bench.synth.generate import Synthesizer
    from fmri_bench.synth.profiles import get_profile

    prof = get_profile("smoke").with_(
        n_subjects=14, rest_s=240.0, rest_sessions=1, tasks_per_subject=0, site_b_fraction=0.0,
        volume_subjects=0, directions=("LR",),
        effects=(TraitEffect(EFFECT["trait"], EFFECT["net_a"], EFFECT["net_b"], EFFECT["beta"]),))
    sy = Synthesizer(prof, seed=3)
    series = []
    for spec in sy.runs:
        s = P.parcellate_array(sy.run_data(spec), "fs_LR_32k", spec.tr, "mmp", spec.name)
        s.key, s.subject = f"{spec.subject}_{spec.name}", spec.subject
        series.append(s)
    df = sy.cohort.participants
    train = list(df.subject[:10])
    return series, df, train, D.describe(series, train, seed=0)


@pytest.mark.slow
def test_planted_fc_effect_shows_in_descriptors(cohort):
    _, df, _, recs = cohort
    (res,) = D.planted_effect_check(recs, df, [EFFECT])
    assert res["n_subjects"] == 14
    assert res["r"] > 0.7 and res["ci95"][0] > 0.3
    assert res["r"] > res["null_abs_r_max"]  # stronger than the trait's link to any unplanted pair


@pytest.mark.slow
def test_no_labels_in_texts(cohort):
    _, df, _, recs = cohort
    rows = df.set_index("subject")
    for r in recs:
        row = rows.loc[r["subject"]]
        labels = {"sex": row.sex, "age": row.age, "fluid_iq": row.fluid_iq, "subject": r["subject"],
                  "scan": r["scan"]}
        assert D.label_leaks(r["text"], labels) == [], r["text"]


@pytest.mark.parametrize("field,text", [
    ("sex", "A female participant."), ("sex", "Male."), ("age", "The subject is 28 years old."),
    ("age", "Age is typical."), ("fluid_iq", "Fluid intelligence is high."), ("fluid_iq", "IQ: high"),
    ("state", "A resting scan."), ("state", "During the MOTOR task."), ("state", "tfMRI_WM_LR")])
def test_leak_checker_catches_each_field(field, text):
    assert any(f.startswith(field) for f in D.label_leaks(text)), text


def test_leak_checker_catches_label_values():
    assert D.label_leaks("mean 28.4 here", {"age": 28.4}) and not D.label_leaks("mean 128.45", {"age": 28.4})
    assert not D.label_leaks("Somatomotor coupling is elevated; averaged over networks.")


def test_norm_uses_training_records_only(rng):
    train = [{"numbers": {"a": float(v), "b": 1.0}} for v in rng.standard_normal(6)]
    test = [{"numbers": {"a": 100.0, "b": 5.0}}]
    norm = D.DescriptorNorm.fit(train)
    vals = [r["numbers"]["a"] for r in train]
    assert norm.mean["a"] == pytest.approx(np.mean(vals)) and norm.sd["a"] == pytest.approx(np.std(vals, ddof=1))
    assert D.DescriptorNorm.fit(train).mean == norm.mean
    assert norm.transform(test[0])["a"] == pytest.approx((100 - np.mean(vals)) / np.std(vals, ddof=1), abs=1e-3)


@pytest.mark.slow
def test_describe_z_ignores_test_subjects(cohort):
    series, _, train, recs = cohort
    few = [s for s in series if s.subject in train[:4]] + [s for s in series if s.subject not in train][:2]
    base = D.describe(few, train[:4])
    changed = [P.ParcelSeries(s.data * (1 if s.subject in train else 3) + (0 if s.subject in train else
               np.random.default_rng(0).standard_normal(s.data.shape).astype(np.float32) * 50), s.tr, s.atlas,
               s.labels, s.source, s.networks, s.space, s.key, s.subject) for s in few]
    again = D.describe(changed, train[:4])
    for a, b in zip(base, again):
        if a["train"]:
            assert a["z"] == b["z"] and a["text"] == b["text"]
    assert any(a["z"] != b["z"] for a, b in zip(base, again) if not a["train"])


def test_global_efficiency_matches_bctpy(rng):
    import bct

    w = np.abs(rng.standard_normal((30, 30)))
    w = bct.threshold_proportional((w + w.T) / 2, 0.2)
    assert D.global_efficiency(w) == pytest.approx(bct.efficiency_wei(w), rel=1e-9)


def test_cli_describe_writes_jsonl(tmp_path, rng):
    from fmri_bench.cli import main

    d = tmp_path / "p"
    d.mkdir()
    runs = []
    for i in range(4):
        x = rng.standard_normal((60, 7)).astype(np.float32) + 100
        np.save(d / f"s{i}.npy", x)
        runs.append({"key": f"s{i}", "file": f"s{i}.npy", "subject": f"S{i}", "atlas": "yeo7", "tr": 2.0,
                     "space": "fs_LR_32k", "source": f"s{i}", "labels": list("abcdefg"),
                     "networks": ["Visual", "Somatomotor", "Dorsal Attention", "Ventral Attention", "Limbic",
                                  "Frontoparietal", "Default"]})
    (d / "parcels.json").write_text(json.dumps({"atlas": "yeo7", "runs": runs}))
    out = tmp_path / "corpus.jsonl"
    assert main(["describe", str(d), "--out", str(out), "--train-subjects", "S0", "S1", "S2"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and {"scan", "subject", "numbers", "z", "text"} <= set(lines[0])
    assert main(["describe", str(tmp_path / "nope"), "--out", str(out), "--train-subjects", "S0"]) == 2


def _toy_records(effect: float, site_shift: float, seed: int = 0, n: int = 60):
    """Subjects with one planted sex effect on fc.Default|Default, a site that shifts every FC z
    and holds mostly males, and a second, unplanted pair."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    site = np.array(["A"] * (n // 2) + ["B"] * (n // 2))
    male = np.where(site == "B", rng.random(n) < 0.85, rng.random(n) < 0.15)
    sex = np.where(male, 0.5, -0.5)
    df = pd.DataFrame({"subject": [f"s{i:02d}" for i in range(n)], "sex": np.where(male, "M", "F"),
                       "age": 30.0, "fluid_iq": 0.0, "site": site})
    shift = site_shift * (site == "B")
    recs = []
    for i, s in enumerate(df.subject):
        z = {"fc.Default|Default": effect * sex[i] + shift[i] + 0.3 * rng.standard_normal(),
             "fc.Visual|Visual": shift[i] + 0.3 * rng.standard_normal()}
        recs.append({"subject": s, "z": z})
    return recs, df, sex


def test_site_covariate_uncovers_a_hidden_effect_and_removes_a_fake_one():
    e = [{"trait": "sex", "net_a": "Default", "net_b": "Default", "beta": 1.0}]
    # planted effect, hidden by a site shift in the opposite direction
    recs, df, _ = _toy_records(effect=1.0, site_shift=-1.2)
    (row,) = D.planted_effect_check(recs, df, e, n_boot=300)
    assert row["r"] < 0.2 and row["ci95"][0] < 0.2  # the raw r misses it
    assert row["partial_ci95"][0] > 0.3 and row["covariates"] == "site"
    assert "given site it shows with the planted sign" in D.effect_verdict([row])
    # nothing planted, but a site shift with mostly males in site B fakes one
    recs, df, _ = _toy_records(effect=0.0, site_shift=1.0, seed=1)
    (row,) = D.planted_effect_check(recs, df, e, n_boot=300)
    assert row["ci95"][0] > 0.3
    assert row["partial_ci95"][0] < 0 < row["partial_ci95"][1]
    (raw,) = D.planted_effect_check(recs, df, e, n_boot=300, covariates=())
    assert "partial_r" not in raw


def test_truth_r_reads_the_true_connectome_over_the_effect_edges():
    recs, df, sex = _toy_records(effect=0.0, site_shift=0.0, n=40)
    rng = np.random.default_rng(2)
    K = 4
    mask = np.zeros((1, K, K), bool)
    mask[0, 0, 1] = mask[0, 1, 0] = True
    corr = np.tile(np.eye(K), (len(df), 1, 1)) + 0.0
    corr[:, 0, 1] = corr[:, 1, 0] = 0.3 + 0.2 * sex + 0.02 * rng.standard_normal(len(df))
    corr[:, 2, 3] = corr[:, 3, 2] = 0.3 - 0.2 * sex  # not in the mask: must not count
    e = [{"trait": "sex", "net_a": "Default", "net_b": "Default", "beta": 0.2}]
    (row,) = D.planted_effect_check(recs, df, e, truth=(corr, mask), n_boot=300)
    assert row["truth_r"] > 0.9 and row["truth_ci95"][0] > 0.8
    flipped = corr.copy()
    flipped[:, 0, 1] = flipped[:, 1, 0] = 0.3 - 0.2 * sex
    (row,) = D.planted_effect_check(recs, df, e, truth=(flipped, mask), n_boot=300)
    assert row["truth_r"] < -0.9
    assert "in the true connectome it shows with the OPPOSITE sign" in D.effect_verdict([row])
