"""The benchmark harness: task clips from tiny shards, disjoint splits, features, baselines, the CLI errors.

The fixture writes a tiny cohort of flat-map shards (a 16 x 40 grid) with HCP-style run keys,
events and a participants table; the MAE is a one-block model on that grid.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from fmri_bench import cli, harness
from fmri_bench.errors import InputError
from fmri_bench.models.mae import MAEConfig, MaskedAutoencoderViT
from fmri_bench.harness.evaluate import _identify_accuracy as identify_accuracy
from fmri_bench.probe import ProbeConfig, train_probe
from fmri_bench.shards import ShardWriter

H, W = 16, 40
FAST = ProbeConfig(epochs=3, lr_scales=(1.0, 10.0), weight_decays=(1e-3,))
# 8 subjects in 6 families (two sibling pairs)
FAMILIES = ["F1", "F1", "F2", "F3", "F3", "F4", "F5", "F6"]
EVENTS = [{"onset": 0.0, "duration": 8.0, "trial_type": "lf"},
          {"onset": 8.0, "duration": 3.0, "trial_type": "cue"},  # not a class: dropped
          {"onset": 10.0, "duration": 8.0, "trial_type": "rh"},
          {"onset": 20.0, "duration": 8.0, "trial_type": "t"},
          {"onset": 30.0, "duration": 8.0, "trial_type": "lf"}]  # its clip leaves the run: dropped


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def write_cohort(root, n_subjects=8, sessions=("REST1", "REST2"), task=True, events=EVENTS, families=None,
                 plant=None, plant_rest=None):
    """Tiny shards + participants.tsv -> the directory. Rest runs 32 frames, MOTOR runs 40.
    plant: optional ``f(bold (T, P) float32, mask) -> None`` that edits each MOTOR run in place;
    plant_rest: ``f(subject, bold, mask)`` the same for each rest run."""
    rng = np.random.default_rng(0)
    mask = np.zeros((H, W), bool)
    mask[2:14, 2:38] = True  # brain pixels; the corner patches hold none
    P = int(mask.sum())
    subjects = [f"{100 + i}" for i in range(n_subjects)]
    with ShardWriter(root / "shards", shard_size=5) as w:
        for s in subjects:
            for ses in sessions:
                rest = rng.normal(size=(32, P)).astype(np.float32)
                if plant_rest is not None:
                    plant_rest(s, rest, mask)
                w.write(f"sub-{s}_rfMRI_{ses}_LR", rest.astype(np.float16), mask, {"subject": s, "tr": 1.0}, [])
            if task:
                bold = rng.normal(size=(40, P)).astype(np.float32)
                if plant is not None:
                    plant(bold, mask)
                w.write(f"sub-{s}_tfMRI_MOTOR_LR", bold.astype(np.float16), mask,
                        {"subject": s, "tr": 1.0}, events)
    fam = families or FAMILIES
    pd.DataFrame({"subject": subjects, "sex": ["F", "M"] * (n_subjects // 2) + ["F"] * (n_subjects % 2),
                  "age": np.linspace(22, 36, n_subjects), "fluid_iq": np.linspace(-1, 1, n_subjects),
                  "family_id": fam[:n_subjects], "site": "A"}).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


def tiny_mae(path):
    torch.manual_seed(0)
    cfg = MAEConfig(img_size=(H, W), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    MaskedAutoencoderViT(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def data(cohort):
    return harness.load_dataset(cohort)


# --- runs and clips ---------------------------------------------------------------------------
def test_run_identity_hcp_and_bids():
    assert harness.run_identity("sub-7_rfMRI_REST2_LR", {}) == ("7", "rest", "REST2", None)
    assert harness.run_identity("x", {"subject": "9", "run": "tfMRI_WM_RL"}) == ("9", "task", "WM", "WM")
    assert harness.run_identity("sub-3_task-motor_run-1", {"entities": {"sub": "3", "task": "motor"}}) \
        == ("3", "task", "MOTOR", "MOTOR")
    # the upstream flat-map shards (HCP-Flat): keys and meta with sub / mod / task / mag / dir
    assert harness.run_identity("sub-100307_mod-rfMRI_task-REST1_mag-3T_dir-LR", {}) == ("100307", "rest", "REST1", None)
    assert harness.run_identity("k", {"sub": "100307", "mod": "tfMRI", "task": "MOTOR", "dir": "RL"}) \
        == ("100307", "task", "MOTOR", "MOTOR")


def test_scan_and_task_clips(data):
    assert len(data.runs) == 8 * 3 and data.participants is not None and not data.synthetic
    state = harness.task_clips("state21", data)
    # 3 of 5 events per run are a class with a full 16-frame clip; labels follow the class index
    assert len(state) == 8 * 3
    assert state.class_names == ["MOTOR_lf", "MOTOR_rh", "MOTOR_t"] and state.class_ids == [4, 7, 8]
    assert np.bincount(state.labels).tolist() == [8, 8, 8]
    assert sorted(set(state.starts.tolist())) == [0, 10, 20]
    # each clip starts at the onset of its own event: lf at 0 s, rh at 10 s, t at 20 s
    for label, onset in enumerate([0, 10, 20]):
        assert set(state.starts[state.labels == label].tolist()) == {onset}
    sex = harness.task_clips("sex", data)
    # rest: 2 sessions x 2 clips of 16 frames; task: 2 clips of 40 frames
    assert (sex.states == "rest").sum() == 8 * 4 and (sex.states == "task").sum() == 8 * 2
    assert set(sex.values.tolist()) == {0.0, 1.0}
    ident = harness.task_clips("identify", data)
    assert len(ident) == 8 * 4 and set(ident.sessions) == {"REST1", "REST2"}


def test_splits_never_share_subject_or_family(data):
    clips = harness.task_clips("state21", data)
    splits = harness.splits_for(clips, 6, seed=3)
    assert len(splits) == 6
    for s in splits:
        parts = [s.train, s.val, s.test]
        assert all(len(p) for p in parts)
        for a in range(3):
            for b in range(a + 1, 3):
                assert not set(clips.subjects[parts[a]]) & set(clips.subjects[parts[b]])
                assert not set(clips.families[parts[a]]) & set(clips.families[parts[b]])
    # siblings (family F1: subjects 100, 101) always land in the same part
    sib = np.isin(clips.subjects, ["100", "101"])
    for s in splits:
        where = {name for name, p in zip("tvs", [s.train, s.val, s.test]) if np.isin(np.flatnonzero(sib), p).any()}
        assert len(where) == 1


# --- unsupported data -------------------------------------------------------------------------
def test_no_task_runs_is_an_input_error(tmp_path):
    data = harness.load_dataset(write_cohort(tmp_path, task=False))
    with pytest.raises(InputError, match="task runs"):
        harness.task_clips("state21", data)
    with pytest.raises(InputError, match="rest and task runs"):
        harness.task_clips("sex", data)


def test_one_class_is_an_input_error(tmp_path):
    data = harness.load_dataset(write_cohort(tmp_path, events=[{"onset": 0.0, "duration": 8, "trial_type": "lf"}]))
    with pytest.raises(InputError, match="at least 2 task-state classes"):
        harness.task_clips("state21", data)


def test_one_session_cannot_identify(tmp_path):
    data = harness.load_dataset(write_cohort(tmp_path, sessions=("REST1",)))
    with pytest.raises(InputError, match="two rest sessions"):
        harness.task_clips("identify", data)


def test_too_few_families(tmp_path):
    data = harness.load_dataset(write_cohort(tmp_path, n_subjects=4, families=["A", "A", "B", "B"]))
    with pytest.raises(InputError, match="too few families"):
        harness.splits_for(harness.task_clips("state21", data), 2)


# --- benchmarks -------------------------------------------------------------------------------
def test_identify_accuracy_exact():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 30))
    x = np.concatenate([base, base + 0.01 * rng.normal(size=base.shape)])
    subjects = np.tile(np.arange(5).astype(str), 2)
    sessions = np.repeat(["REST1", "REST2"], 5)
    acc, hits = identify_accuracy(x, subjects, sessions)
    assert acc == 1.0 and hits.shape == (5, 2)
    shuffled = np.concatenate([base, base[[1, 2, 3, 4, 0]]])
    assert identify_accuracy(shuffled, subjects, sessions)[0] == 0.0


def data_labels(bench):
    return bench.clips.labels


def test_state21_benchmark_on_shared_splits(data, tmp_path):
    ckpt = tiny_mae(tmp_path / "m.pt")
    bench = harness.benchmark("state21", data, methods=("mae", "depth0", "chance"), checkpoint=ckpt, seeds=2,
                               probe_cfg=FAST)
    methods = [r.method for r in bench.records]
    assert methods == ["mae cls", "mae avg_patch", "depth0 cls", "depth0 avg_patch", "chance"]
    assert all(r.n == 2 and r.source == "real" and r.truth is None for r in bench.records)
    # on each split every method is tested on the same clips
    for i, split in enumerate(bench.details["splits"]):
        for name in ("mae cls", "mae avg_patch", "depth0 cls", "depth0 avg_patch"):
            assert np.array_equal(bench.details[name][i].test_true, data_labels(bench)[split.test])
    assert bench.details["mae cls"][0].n_classes == 3
    # chance: the training majority class, scored on each split's test clips
    y = data_labels(bench)
    expect = [np.mean(y[s.test] == np.bincount(y[s.train], minlength=3).argmax()) for s in bench.details["splits"]]
    assert bench.records[-1].values == pytest.approx(expect)
    path = harness.write_benchmark(bench, tmp_path / "r.json")
    assert len(json.loads(path.read_text())) == 5 and "| state21 | chance |" in path.with_suffix(".md").read_text()


def plant_state_patterns(bold, mask):
    """During each class event, a strong class-specific pattern inside every 8 x 8 patch (so that
    it survives the average over patch tokens): lf left half, rh top half, t a checkerboard."""
    rows, cols = np.nonzero(mask)
    left, top = cols % 8 < 4, rows % 8 < 4
    region = {"lf": left, "rh": top, "t": left ^ top}
    for ev in EVENTS:
        if ev["trial_type"] in region:
            t0 = int(ev["onset"])
            bold[t0: t0 + int(ev["duration"]), region[ev["trial_type"]]] += 2.0


def test_state21_decodes_a_planted_state_signal(tmp_path):
    """End to end (shards -> event clips -> encoder features -> probe on subject-disjoint splits):
    a planted class pattern is decoded far above chance, and not when the labels are shuffled."""
    cfg = MAEConfig(img_size=(H, W), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    data = harness.load_dataset(write_cohort(tmp_path / "planted", plant=plant_state_patterns))
    probe = ProbeConfig(epochs=100, lr_scales=(10.0,), weight_decays=(1e-3,))
    bench = harness.benchmark("state21", data, methods=("depth0",), config=cfg, seeds=2, probe_cfg=probe,
                               representations=("avg_patch",))
    (rec,) = bench.records
    assert rec.chance == pytest.approx(1 / 3, abs=0.1)
    assert rec.mean > 0.9, rec
    # the same pipeline without the planted pattern stays near chance
    plain = harness.load_dataset(write_cohort(tmp_path / "plain"))
    (ctrl,) = harness.benchmark("state21", plain, methods=("depth0",), config=cfg, seeds=2, probe_cfg=probe,
                                 representations=("avg_patch",)).records
    assert ctrl.mean < 0.7, ctrl


def test_pretraining_subjects_never_reach_val_or_test(data, tmp_path):
    subjects = sorted({r.subject for r in data.runs})
    seen = set(subjects[:3])
    probe = ProbeConfig(epochs=2, lr_scales=(1.0,), weight_decays=(1e-3,))
    bench = harness.benchmark("state21", data, methods=("fc",), seeds=3, probe_cfg=probe, pretrained_on=seen,
                              hrf_delay=4.0, atlas=quadrant_parcels())
    clips = harness.task_clips("state21", data, hrf_delay=4.0)
    for split in bench.details["splits"]:
        assert not {clips.subjects[i] for i in (*split.val, *split.test)} & seen
        assert seen <= {clips.subjects[i] for i in split.train}
    assert bench.details["pretrained_on"] == sorted(seen)
    assert {r.task for r in bench.records} == {"state21 +4 s"}
    ident = harness.benchmark("identify", data, methods=("fc",), pretrained_on=seen, atlas=quadrant_parcels())
    assert ident.records[0].n == len(subjects) - 3


def test_traits_and_identify_benchmark(data, tmp_path):
    ckpt = tiny_mae(tmp_path / "m.pt")
    sex = harness.benchmark("sex", data, methods=("mae", "chance"), checkpoint=ckpt, seeds=2, n_Cs=2,
                             representations=("avg_patch",), keep_features=True)
    assert [r.task for r in sex.records] == ["sex rest->task", "sex task->rest",
                                             "sex rest->task, per run", "sex task->rest, per run",
                                             "sex rest->task", "sex task->rest"]
    assert [r.method for r in sex.records][-2:] == ["chance", "chance"]
    assert all(r.chance == 0.5 for r in sex.records)
    # per run: one sample per run, the mean of its clips' embeddings
    per_clip, per_run = sex.details[("mae avg_patch", "rest->task")], sex.details[("mae avg_patch, per run", "rest->task")]
    assert per_run.n_train < per_clip.n_train
    age = harness.benchmark("age", data, methods=("mae",), checkpoint=ckpt, seeds=2, n_Cs=2,
                             representations=("avg_patch",), features=sex.features)
    assert all(r.chance == 0.25 for r in age.records)
    ident = harness.benchmark("identify", data, methods=("mae", "chance"), checkpoint=ckpt)
    assert [r.method for r in ident.records] == ["mae cls", "mae avg_patch", "chance"]
    assert ident.records[0].n == 8 and len(ident.records[0].values) == 8  # one hit rate per subject
    # identification reuses the encoder's features of the trait clips (its rest clips are among them)
    # and extracts only what is missing (the parcels, on its own atlas): the same numbers as fresh
    kw = dict(methods=("mae", "fc"), checkpoint=ckpt, representations=("avg_patch",), atlas=quadrant_parcels())
    fresh = harness.benchmark("identify", data, **kw)
    reused = harness.benchmark("identify", data, features={"mae": sex.features["mae"]}, **kw)
    assert [(r.method, r.mean, r.values) for r in reused.records] == [(r.method, r.mean, r.values) for r in fresh.records]
    with pytest.raises(InputError, match="'mae' features given do not hold the clips of task 'identify'"):
        harness.benchmark("identify", data, features={"mae": sex.features["mae"].subset(np.arange(5))}, **kw)


def test_identify_finds_planted_fingerprints(tmp_path):
    """Each subject's rest runs share a fixed spatial pattern: run-level parcel features match
    REST1 to REST2 of the same subject; without it, matching is near chance (1 / 8)."""
    rng = np.random.default_rng(1)
    finger = {}

    def plant(subject, bold, mask):
        pattern = finger.setdefault(subject, rng.normal(size=bold.shape[1]))
        bold += 3.0 * pattern

    labels = quadrant_parcels()
    with_fp = harness.benchmark("identify", harness.load_dataset(write_cohort(tmp_path / "fp", plant_rest=plant)),
                                methods=("parcel_mlp",), atlas=labels)
    without = harness.benchmark("identify", harness.load_dataset(write_cohort(tmp_path / "plain")),
                                methods=("parcel_mlp",), atlas=labels)
    assert with_fp.records[0].mean == 1.0
    assert without.records[0].mean < 0.5


def quadrant_parcels():
    """Four parcels per brain pixel by its position inside its 8 x 8 patch (left / right x top /
    bottom half), so the planted state regions are unions of parcels."""
    mask = np.zeros((H, W), bool)
    mask[2:14, 2:38] = True
    rows, cols = np.nonzero(mask)
    return 1 + 2 * (rows % 8 < 4) + (cols % 8 < 4)


def test_fc_and_parcel_mlp_decode_a_planted_state_signal(tmp_path):
    """The FC and parcel-MLP baselines through benchmark(): the planted regions co-activate, so
    both decode the class from parcel series; without the plant FC stays near chance."""
    probe = ProbeConfig(epochs=100, lr_scales=(10.0,), weight_decays=(1e-3,))
    labels = quadrant_parcels()
    data = harness.load_dataset(write_cohort(tmp_path / "planted", plant=plant_state_patterns))
    bench = harness.benchmark("state21", data, methods=("fc", "parcel_mlp"), seeds=2, probe_cfg=probe, atlas=labels)
    assert [r.method for r in bench.records] == ["fc", "parcel_mlp"]
    assert all(r.mean > 0.9 for r in bench.records), bench.records
    plain = harness.load_dataset(write_cohort(tmp_path / "plain"))
    (fc,) = harness.benchmark("state21", plain, methods=("fc",), seeds=2, probe_cfg=probe, atlas=labels).records
    assert fc.mean < 0.7, fc
    with pytest.raises(InputError, match="parcellation covers 3 pixels"):
        harness.benchmark("state21", plain, methods=("fc",), seeds=2, probe_cfg=probe, atlas=np.array([1, 2, 2]))


def test_compare_sentence_reads_the_intervals():
    from fmri_bench.results import summarize

    recs = [summarize("state21", "mae cls", [0.40, 0.42, 0.44, 0.46], chance=0.2),
            summarize("state21", "fc", [0.70, 0.72, 0.74, 0.76])]
    assert harness.compare_sentence(recs, "state21").startswith(
        "A baseline beats the MAE, the intervals apart: fc 73.0 % [")
    recs[1] = summarize("state21", "fc", [0.10, 0.12, 0.14, 0.16])
    assert harness.compare_sentence(recs, "state21").startswith(
        "The MAE is above every baseline, the intervals apart: mae cls 43.0 % [")
    # a higher mean with overlapping intervals is no win
    recs[1] = summarize("state21", "fc", [0.30, 0.50, 0.35, 0.45])
    sentence = harness.compare_sentence(recs, "state21")
    assert sentence.startswith("The best MAE row and the best baseline cannot be told apart")
    assert "holds chance" not in sentence
    recs[0] = summarize("state21", "mae cls", [0.1, 0.5, 0.2, 0.4], chance=0.2)
    assert "the MAE's interval holds chance (20.0 %)" in harness.compare_sentence(recs, "state21")


def test_chance_sentence_counts_only_intervals_clear_of_chance():
    from fmri_bench.results import summarize

    recs = [summarize("sex rest->task", "fc", [0.70, 0.72, 0.74, 0.76], chance=0.5),
            summarize("sex task->rest", "mae cls", [0.40, 0.60, 0.45, 0.55], chance=0.5),  # mean 0.5, holds chance
            summarize("sex rest->task, per run", "mae avg_patch", [0.45, 0.75, 0.55, 0.65], chance=0.5),  # mean > 0.5
            summarize("sex rest->task", "chance", [0.5], chance=0.5),
            summarize("sex (truth)", "true connectome", [0.85, 0.87, 0.89], chance=0.5)]
    text = harness.chance_sentence(recs, "sex")
    assert text.startswith("sex: 1 of 3 rows lie above chance (50.0 %) with their whole interval: fc 73.0 % ["), text
    assert "mae" not in text and "true connectome reaches 87.0 %" in text
    recs[0] = summarize("sex rest->task", "fc", [0.45, 0.55, 0.50, 0.52], chance=0.5)
    assert harness.chance_sentence(recs, "sex").startswith("sex: no row's interval lies above chance (50.0 %); all 3")


# --- CLI --------------------------------------------------------------------------------------
def test_cli_probe_writes_results(cohort, tmp_path, capsys):
    ckpt = tiny_mae(tmp_path / "m.pt")
    rc = cli.main(["probe", "--checkpoint", str(ckpt), "--task", "identify", "--data", str(cohort),
                   "--out", str(tmp_path / "res.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "res.json").read_text())
    assert [r["method"] for r in rows] == ["mae cls", "mae avg_patch"]
    assert "| identify | mae cls |" in capsys.readouterr().out


def test_cli_baseline_chance(cohort, capsys):
    assert cli.main(["baseline", "chance", "--task", "state21", "--data", str(cohort), "--seeds", "2"]) == 0
    assert "| state21 | chance |" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["text", "torch_dict"])
def test_cli_rejects_non_mae_checkpoint(cohort, tmp_path, capsys, case):
    bad = tmp_path / "bad.pt"
    if case == "text":
        bad.write_text("not a model")
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    assert cli.main(["probe", "--checkpoint", str(bad), "--task", "state21", "--data", str(cohort)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and ("not an fmri_bench MAE checkpoint" in err or "cannot read" in err)


def test_cli_unsupported_task_and_too_few_subjects(tmp_path, capsys):
    ckpt = tiny_mae(tmp_path / "m.pt")
    rest_only = write_cohort(tmp_path / "rest", task=False)
    assert cli.main(["probe", "--checkpoint", str(ckpt), "--task", "state21", "--data", str(rest_only)]) == 2
    assert "state21 needs task runs" in capsys.readouterr().err
    small = write_cohort(tmp_path / "small", n_subjects=4, families=["A", "A", "B", "B"])
    assert cli.main(["baseline", "chance", "--task", "state21", "--data", str(small)]) == 2
    assert "too few families" in capsys.readouterr().err


def test_token_evidence_sums_to_the_logit():
    """avg_patch is the token mean, so the token terms add up to the head's logit (less bias and
    offset), relative to the mean over classes."""
    rng = np.random.default_rng(0)
    patch = rng.normal(size=(6, 4, 8)).astype(np.float32)
    patch[:, 3] = 0  # a non-brain token
    avg = patch[:, :3].mean(1)
    y = np.array([0, 1, 2, 0, 1, 2])
    res = train_probe(avg, y, avg, y, avg, y, head="linear", n_classes=3, cfg=FAST)
    ev = harness.token_evidence(res, patch[:3], y[:3], (2, 2))  # one clip per class
    head = res.heads.heads[res.best_index].linear
    with torch.no_grad():
        logits = res.heads.forward_head(torch.from_numpy(avg[:3]), res.best_index).numpy()
    w = head.weight.detach().numpy() / res.heads.std.numpy()
    offset = head.bias.detach().numpy() - w @ res.heads.mean.numpy()
    rel = logits - offset  # token part of each logit; the maps show it relative to the class mean
    for c in range(3):
        assert ev[c].sum() == pytest.approx(rel[c, c] - rel[c].mean(), rel=1e-4, abs=1e-5)
    assert np.all(ev[:, 1, 1] == 0)  # the non-brain token carries no evidence


@pytest.mark.parametrize("argv, message", [
    (["baseline", "foo", "--task", "state21"], "unknown baseline 'foo'"),
    (["baseline", "chance", "--task", "nope"], "unknown task 'nope'"),
])
def test_cli_unknown_names_exit_2(cohort, capsys, argv, message):
    assert cli.main([*argv, "--data", str(cohort)]) == 2
    assert message in capsys.readouterr().err
