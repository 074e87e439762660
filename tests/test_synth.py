"""The synthetic cohort: the ground truth is really in the data, files are valid and reproducible.

Tiny cohorts made in the tests; the FC and GLM checks use a subset of vertices (every k-th)
so they run in seconds.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fmri_bench.errors import InputError
from fmri_bench.synth import PROFILES, checks, get_profile, load_ground_truth, simulate
from fmri_bench.synth.cohort import TraitEffect, effect_name, standardized_traits
from fmri_bench.synth.generate import Synthesizer
from fmri_bench.synth.tasks import PARADIGMS, class_map

EVERY = np.arange(0, 59412, 8)


def _rest_fc(prof, seed=0):
    """(FC of REST1 (S, K, K), FC of REST2, synthesizer) on a vertex subset, high-passed."""
    sy = Synthesizer(prof, seed=seed)
    labels = sy.nodes.labels[EVERY]
    fcs = {}
    for spec in sy.runs:
        x = sy.run_data(spec, vertices=EVERY)
        fcs.setdefault(spec.name, []).append(checks.fc(checks.high_pass(checks.parcel_means(x, labels), spec.tr)))
    a, b = (np.array(fcs[k]) for k in sorted(fcs))
    return a, b, sy


# one direction per session keeps these checks cheap (the book profile has LR and RL)
REST = PROFILES["smoke"].with_(n_subjects=12, site_b_fraction=0.0, rest_s=100.0, paradigms=("MOTOR",),
                               tasks_per_subject=0, volume_subjects=0, directions=("LR",))


def test_class_map_has_21_classes_over_the_paradigms():
    classes = class_map()["classes"]
    assert [c["index"] for c in classes] == list(range(21))
    for c in classes:
        assert c["condition"] in PARADIGMS[c["paradigm"]].conditions


def test_glm_recovers_condition_maps():
    prof = PROFILES["smoke"].with_(n_subjects=3, site_b_fraction=0.0, tasks_per_subject=1, reps=2,
                                   paradigms=("MOTOR",), volume_subjects=0, rest_sessions=0, directions=("LR",))
    sy = Synthesizer(prof, seed=3)
    conds = list(PARADIGMS["MOTOR"].conditions)
    idx = [sy.conditions.index(("MOTOR", c)) for c in conds]
    truth = sy.condition_maps[idx][:, EVERY]
    betas, single = [], []
    for spec in sy.runs:
        b = checks.glm(sy.run_data(spec, vertices=EVERY), spec.events, spec.tr, conds)
        betas.append(b)
        single.append(checks.spatial_corr(b, sy.subject_maps(spec.subject_index)[1][idx][:, EVERY]))
    single = np.array(single)  # (S, C), each run against its subject's own maps
    group = checks.spatial_corr(np.mean(betas, 0), truth)
    print(f"GLM map r: single-run mean {single.mean():.2f} (min {single.min():.2f}), "
          f"3-subject mean {group.mean():.2f} (min {group.min():.2f})")
    assert single.mean() > 0.3
    assert group.min() > 0.4 and group.mean() > 0.6
    # the maps are specific: each condition's estimate matches its own map best
    cross = np.corrcoef(np.mean(betas, 0), truth)[:5, 5:]
    assert (cross.argmax(1) == np.arange(5)).all()


def test_fingerprinting_far_above_chance_and_falls_without_idiosyncrasy():
    a, b, _ = _rest_fc(REST)
    acc = checks.fingerprint_accuracy(checks.upper(a), checks.upper(b))
    # no subject-specific connectome and no subject-specific maps: nothing left to identify by
    a0, b0, _ = _rest_fc(REST.with_(idio_scale=0.01, family_scale=0.0, shift_mm=0.0, map_gain_sd=0.0))
    acc0 = checks.fingerprint_accuracy(checks.upper(a0), checks.upper(b0))
    print(f"fingerprinting: {acc:.2f} (idio 0.12) vs {acc0:.2f} (idio 0.01, no deformation), chance {1 / 12:.2f}")
    assert acc >= 0.5  # chance 1/12
    assert acc0 < acc - 0.25


@pytest.mark.parametrize("beta", [0.3, 0.0])
def test_trait_effect_recovered_from_fc(beta):
    effect = TraitEffect("fluid_iq", "Frontoparietal", "Default", beta)
    prof = REST.with_(n_subjects=20, rest_sessions=1, rest_s=120.0, effects=(effect,))
    sy = Synthesizer(prof, seed=5)
    labels = sy.nodes.labels[EVERY]
    fcs = np.array([checks.fc(checks.high_pass(checks.parcel_means(sy.run_data(s, vertices=EVERY), labels), s.tr))
                    for s in sy.runs])
    trait = standardized_traits(sy.cohort.participants)["fluid_iq"]
    slope, se = checks.trait_slope(fcs, trait, sy.cohort.edge_masks[effect_name(effect)])
    print(f"trait beta {beta}: recovered {slope:.3f} +- {se:.3f}")
    if beta:
        assert slope > 0 and 0.4 * beta < slope < 1.6 * beta
        assert slope > 3 * se
    else:
        assert abs(slope) < 3 * se + 0.03


TINY = PROFILES["smoke"].with_(n_subjects=3, rest_s=12.0, paradigms=("RELATIONAL",), volume_subjects=1)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = simulate(TINY, out / "a", seed=7, progress=False)
    return summary, out


def test_files_are_valid_and_readable(tiny_cohort):
    import nibabel as nib

    summary, out = tiny_cohort
    root = summary.out
    gt, arrays = load_ground_truth(root)
    assert gt["seed"] == 7 and gt["profile"] == "smoke" and len(gt["subjects"]) == 3
    assert gt["generator_version"] and gt["trait_effects"][0]["beta"] > 0 and gt["trait_effects"][0]["source"]
    assert {r["run"] for r in gt["runs"]} >= {"rfMRI_REST1_LR", "rfMRI_REST1_RL", "rfMRI_REST2_LR",
                                              "rfMRI_REST2_RL", "tfMRI_RELATIONAL_LR", "tfMRI_RELATIONAL_RL"}
    assert arrays["corr"].shape == (3, 34, 34)
    assert {r["site"] for r in gt["runs"]} == {"A", "B"}
    run = next(r for r in gt["runs"] if r["kind"] == "task")
    img = nib.load(root / run["path"])
    assert img.shape == (run["n_frames"], 59412)
    assert abs(img.header.get_axis(0).step - run["tr"]) < 1e-6
    assert img.get_data_dtype() == np.int16  # integer scanner units: half of float32's bytes
    from fmri_bench.synth.maps import parcellation
    from fmri_bench.synth.writer import parcels_path

    with np.load(parcels_path(root / run["path"])) as z:  # the parcel copy is the CIFTI's parcel means
        mmp = z["mmp"]
    labels, _ = parcellation("mmp")
    data = np.asarray(img.get_fdata(), np.float32)
    assert mmp.shape == (run["n_frames"], 360)
    np.testing.assert_allclose(mmp[:, 7], data[:, labels == 8].mean(1), rtol=1e-5)
    from fmri_bench.io import load_run

    loaded = load_run(root / run["path"])
    assert loaded.data.shape == (run["n_frames"], 59412) and abs(loaded.tr - run["tr"]) < 1e-6
    evs = sorted(p.stem for p in (root / run["path"]).parent.joinpath("EVs").glob("*.txt"))
    assert set(PARADIGMS[run["paradigm"]].conditions) <= set(evs)
    vol = [r for r in gt["runs"] if r["volume_path"]]
    assert vol
    vimg = nib.load(root / vol[0]["volume_path"])
    assert vimg.ndim == 4 and vimg.shape[3] == vol[0]["n_frames"]
    assert 20 < summary.tsnr["A"] < 150 and 20 < summary.tsnr["B"] < 150
    participants = (root / "participants.tsv").read_text().splitlines()
    assert participants[0].split("\t") == ["subject", "sex", "age", "fluid_iq", "family_id", "site"]


def _digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tiny_cohort):
    summary, out = tiny_cohort
    again = simulate(TINY, out / "b", seed=7, progress=False)
    assert _digest(summary.out) == _digest(again.out)
    # and the seed is what decides: another seed gives other data in every run file
    other = _digest(simulate(TINY, out / "c", seed=8, progress=False).out)
    runs = [k for k in _digest(summary.out) if k.endswith((".dtseries.nii", ".nii.gz"))]
    assert runs and all(other[k] != _digest(summary.out)[k] for k in runs)


def test_bad_arguments_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown profile"):
        get_profile("huge")
    with pytest.raises(InputError, match="at least 3"):
        simulate("smoke", tmp_path / "x", subjects=0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="not writable"):
        simulate("smoke", blocker / "sub", subjects=3, progress=False)
    r = subprocess.run([sys.executable, "-m", "fmri_bench.cli", "simulate", "--profile", "nope",
                        "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown profile" in r.stderr


def test_output_folder_rules(tiny_cohort, tmp_path):
    summary, _ = tiny_cohort
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds no simulated cohort"):
        simulate(TINY, stray, seed=7, progress=False)
    assert (stray / "mine.txt").read_text() == "keep me" and len(list(stray.iterdir())) == 1
    with pytest.raises(InputError, match="--overwrite"):
        simulate(TINY, summary.out, seed=7, progress=False)
    # replacing a cohort leaves none of the old files, and nothing beside it
    root = tmp_path / "c"
    simulate(TINY, root, seed=7, progress=False)
    subject = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "bids")[0]
    (subject / "left_over.txt").write_text("old")
    again = simulate(TINY, root, seed=8, progress=False, overwrite=True)
    assert again.out == root and not (subject / "left_over.txt").exists()
    assert load_ground_truth(root)[0]["seed"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "notes"]


def test_interrupted_simulation_leaves_nothing(tmp_path, monkeypatch):
    from fmri_bench.synth import writer

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_participants", fail)
    with pytest.raises(KeyboardInterrupt):
        simulate(TINY, tmp_path / "cohort", seed=7, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"] and not any((tmp_path / "cohort").iterdir())

