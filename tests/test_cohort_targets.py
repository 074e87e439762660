"""The cohort's targets, on small cohorts: subject maps smooth and subject-specific, connectome
fingerprinting on MMP-360 for six book-profile subjects, motor EVs in somatomotor cortex,
>= 40 state21 clips per class in the book plan, trait effects of the published sizes.

Everything is generated in memory (no files), from the book profile's settings.
"""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fmri_bench.synth import PROFILES, checks
from fmri_bench.synth.generate import Synthesizer
from fmri_bench.synth.tasks import PARADIGMS
from fmri_bench.synth.writer import parcel_copy

BOOK = PROFILES["book"]


def _neighbour_corr(maps: np.ndarray) -> np.ndarray:
    """Per map (M, V): Pearson r of the values at the two ends of every mesh edge -> (M,)."""
    from fmri_bench.synth.maps import cortex_coords_faces

    _, faces = cortex_coords_faces()
    i, j = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]]), np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    return checks.spatial_corr(maps[:, i].astype(np.float64), maps[:, j].astype(np.float64))


@pytest.fixture(scope="module")
def small():
    prof = PROFILES["smoke"].with_(n_subjects=3, site_b_fraction=0.0, rest_s=20.0, volume_subjects=0)
    return Synthesizer(prof, seed=1)


def test_subject_maps_smooth_and_subject_specific(small):
    from fmri_bench.synth.deform import Deformation

    sy = small
    group = np.concatenate([sy.node_maps, sy.condition_maps])
    m0, m1 = (np.concatenate(sy.subject_maps(s)) for s in (0, 1))
    smooth_group, smooth0 = _neighbour_corr(group), _neighbour_corr(m0)
    rng = np.random.default_rng(0)
    shuffled = _neighbour_corr(group[:3, rng.permutation(group.shape[1])])  # what a rough map scores
    print(f"neighbour r: group {smooth_group.mean():.3f}, subject {smooth0.mean():.3f} (min {smooth0.min():.3f}), "
          f"shuffled {shuffled.mean():.3f}")
    assert smooth0.min() > 0.9 and smooth0.mean() > smooth_group.mean() - 0.02
    assert shuffled.max() < 0.1  # the check can fail
    r01, r0g = checks.spatial_corr(m0, m1), checks.spatial_corr(m0, group)
    print(f"map r: subject 0 vs 1 {r01.mean():.3f} (min {r01.min():.3f}), subject 0 vs group {r0g.mean():.3f}")
    assert r01.mean() < 0.99 and r01.min() > 0.5  # another subject: same networks, not the same maps
    # every run of a subject shares its maps; each run has its own noise maps
    runs = [s for s in sy.runs if s.subject_index == 0]
    parts = [sy.run_components(s, np.random.default_rng(np.random.SeedSequence((sy.seed,) + s.seed_key)))
             for s in runs[:2]]
    assert np.array_equal(parts[0]["network"][1], parts[1]["network"][1])
    assert not np.allclose(parts[0]["noise"][1], parts[1]["noise"][1])
    other = sy.run_components(sy.runs[-1], np.random.default_rng(0))
    assert not np.allclose(parts[0]["network"][1], other["network"][1])
    # the stored parameters give the same maps
    again = Deformation.from_params(sy.deformations[0].params).apply(group)
    np.testing.assert_allclose(again, m0, atol=1e-5)


def _session_fingerprint(prof, seed=0):
    """REST1 vs REST2 identification on MMP-360, as checks.fingerprint_sessions does it on files:
    each run high-passed, global signal regressed (Finn et al. 2015), Fisher z averaged over LR + RL."""
    sy = Synthesizer(prof, seed=seed)
    fcs = {}
    for spec in sy.runs:
        x = checks.regress_global(checks.high_pass(parcel_copy(sy.run_data(spec))["mmp"], spec.tr))
        fcs.setdefault((spec.name.split("_")[1], spec.subject_index), []).append(checks.fc(x))
    n = len(sy.cohort.participants)
    a, b = (np.array([np.mean(fcs[(ses, s)], 0) for s in range(n)]) for ses in ("REST1", "REST2"))
    return checks.fingerprint_accuracy(checks.upper(a), checks.upper(b))


@pytest.mark.slow
def test_fingerprinting_six_book_subjects_on_mmp360():
    prof = BOOK.with_(n_subjects=6, tasks_per_subject=0, volume_subjects=0)
    acc = _session_fingerprint(prof)
    none = _session_fingerprint(prof.with_(idio_scale=0.0, family_scale=0.0, shift_mm=0.0, map_gain_sd=0.0,
                                           effects=(), activation_effects=()))
    print(f"REST1 <-> REST2 (LR + RL each, {prof.rest_s:.0f} s runs), MMP-360, 6 subjects: {acc:.2f}; "
          f"without any subject-specific truth {none:.2f}; chance {1 / 6:.2f}")
    assert acc >= 0.8
    assert none < acc - 0.3


@pytest.mark.slow
def test_motor_evs_peak_in_somatomotor_cortex():
    from fmri_bench.synth.maps import parcellation

    y7, names = parcellation("yeo7")
    sm = y7 == next(k for k, v in names.items() if v == "Somatomotor")
    prof = BOOK.with_(n_subjects=6, paradigms=("MOTOR",), paradigm_weights=None, tasks_per_subject=1,
                      rest_sessions=0, volume_subjects=0)
    sy = Synthesizer(prof, seed=0)
    conds = list(PARADIGMS["MOTOR"].conditions)
    per_subject = {}
    for spec in sy.runs:
        r = checks.ev_correlations(sy.run_data(spec), spec.events, spec.tr, conds)
        per_subject.setdefault(spec.subject_index, []).append(r)
    frac = np.array([checks.top_fraction_inside(np.mean(r, 0), sm) for r in per_subject.values()])  # (6, 5)
    pooled = checks.top_fraction_inside(np.mean([np.mean(r, 0) for r in per_subject.values()], 0), sm)
    print("top-1 % vertices in Yeo-7 somatomotor, per EV", dict(zip(conds, frac.mean(0).round(2))),
          "min subject", dict(zip(conds, frac.min(0).round(2))), "six pooled", dict(zip(conds, pooled.round(2))))
    assert (frac.min(0) > 0.5).all() and (pooled > 0.5).all()  # every subject, every EV
    chance = checks.top_fraction_inside(np.random.default_rng(0).standard_normal((1, sm.size)), sm)
    assert chance[0] < 0.3  # somatomotor is a small share of cortex: the check can fail


def test_book_plan_has_40_state21_clips_per_class():
    counts = checks.event_clip_counts(Synthesizer(BOOK, seed=0).runs)
    print("state21 clips per class (book):", min(counts.values()), "-", max(counts.values()))
    assert len(counts) == 21 and min(counts.values()) >= 40
    one_block = checks.event_clip_counts(Synthesizer(BOOK.with_(reps=1), seed=0).runs)
    assert min(one_block.values()) < 40  # one block per condition would not do


def test_trait_effects_have_the_published_sizes():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from fmri_bench.synth.cohort import effect_name, standardized_traits

    sy = Synthesizer(BOOK.with_(n_subjects=800, rest_sessions=0, tasks_per_subject=0, volume_subjects=0), seed=0)
    t = standardized_traits(sy.cohort.participants)
    z = np.arctanh(np.clip(sy.cohort.corr, -0.999999, 0.999999))
    mean_z = {effect_name(e): z[:, sy.cohort.edge_masks[effect_name(e)]].mean(1) for e in BOOK.effects}
    x = np.column_stack([v for k, v in mean_z.items() if k.startswith("sex:")])
    male = t["sex"] > 0
    acc = LinearDiscriminantAnalysis().fit(x[:400], male[:400]).score(x[400:], male[400:])
    r_iq = np.corrcoef(mean_z["fluid_iq:Dorsal Attention-Dorsal Attention"], t["fluid_iq"])[0, 1]
    cols = [i for i, (p, c) in enumerate(sy.conditions) if p == "WM"]
    r_gain = {sy.conditions[i][1]: np.corrcoef(sy.gains[:, i], t["fluid_iq"])[0, 1] for i in cols}
    print(f"sex from true FC {acc:.3f} (Zhang 2018: 0.87 observed); fluid_iq r {r_iq:.3f} (Marek 2022: 0.11); "
          f"WM gain r {np.round(list(r_gain.values()), 2)}")
    assert 0.8 < acc < 0.95
    assert 0.0 < r_iq < 0.25
    assert all(0.05 < r < 0.25 for c, r in r_gain.items() if c.startswith("2bk"))
    assert all(abs(r) < 0.1 for c, r in r_gain.items() if c.startswith("0bk"))
