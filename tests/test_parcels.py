"""Parcel series: parcel means, TR resampling, robust z-score, windows, CLI errors."""

import numpy as np
import pytest

from fmri_bench import parcels as P
from fmri_bench.cli import main
from fmri_bench.errors import InputError
from fmri_bench.io import write_cifti, write_gifti


def test_parcel_means_equal_masked_mean(tmp_path, rng):
    data = rng.standard_normal((4, 59412)).astype(np.float32) + 100
    path = write_cifti(tmp_path / "run.dtseries.nii", data, tr=0.72)
    s = P.parcel_series(path, atlas="mmp")
    at = P.load_atlas("mmp")
    assert s.data.shape == (4, 360) and s.atlas == "mmp" and s.tr == pytest.approx(0.72)
    assert len(s.labels) == len(s.networks) == 360 and s.labels[0] == "L_V1" and s.networks[0] == "Visual"
    direct = np.stack([data[:, at.vertex_labels == k + 1].mean(1) for k in range(360)], 1)
    np.testing.assert_allclose(s.data, direct, rtol=1e-5)


def test_resample_keeps_slow_sinusoid_and_drops_fast():
    tr, T = 0.72, 800
    t = np.arange(T) * tr
    slow = np.sin(2 * np.pi * 0.02 * t)
    fast = 0.5 * np.sin(2 * np.pi * 0.6 * t)  # above the TR 2.0 Nyquist (0.25 Hz)
    s = P.ParcelSeries(np.stack([slow + fast, 3 * slow], 1).astype(np.float32), tr, "mmp", ["a", "b"], "x")
    y = P.model_series(s, tr=2.0)
    t2 = np.arange(len(y)) * 2.0
    ref = np.sin(2 * np.pi * 0.02 * t2)
    assert len(y) == int(np.floor((T - 1) * tr / 2.0)) + 1
    inner = slice(10, -10)
    for j in (0, 1):
        assert np.corrcoef(y[inner, j], ref[inner])[0, 1] > 0.999


def test_robust_zscore_per_parcel(rng):
    x = rng.standard_normal((501, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([5.0, -3.0, 100.0])
    z = P.robust_zscore(x)
    q25, med, q75 = np.percentile(z, [25, 50, 75], axis=0)
    np.testing.assert_allclose(med, 0, atol=1e-6)
    np.testing.assert_allclose(q75 - q25, 1, atol=1e-5)
    assert (P.robust_zscore(np.ones((10, 2))) == 0).all()


def test_windows_pad_and_skip():
    s = P.ParcelSeries(np.random.default_rng(1).standard_normal((400, 5)).astype(np.float32), 2.0, "mmp",
                       list("abcde"), "x")
    assert P.model_windows(s).shape == (2, 160, 5)
    short = P.ParcelSeries(s.data[:100], 2.0, "mmp", list("abcde"), "x")
    w, n = P.model_windows(short, return_lengths=True)
    assert w.shape == (1, 160, 5) and n.tolist() == [100] and (w[0, 100:] == 0).all() and w[0, :100].any()
    assert P.model_windows(short, short="skip").shape == (0, 160, 5)
    assert P.model_windows(short, min_frames=101).shape == (0, 160, 5)


def test_cli_parcellate_writes_arrays_and_metadata(tmp_path, rng):
    import json

    path = write_cifti(tmp_path / "sub-01_task-x_bold.dtseries.nii", rng.standard_normal((6, 59412)), tr=1.0)
    assert main(["parcellate", str(path), "--out", str(tmp_path / "out"), "--atlas", "yeo7"]) == 0
    meta = json.loads((tmp_path / "out" / "parcels.json").read_text())
    assert meta["atlas"] == "yeo7" and meta["runs"][0]["subject"] == "01"
    assert np.load(tmp_path / "out" / meta["runs"][0]["file"]).shape == (6, 7)
    back = P.load_parcels(tmp_path / "out")[0]
    assert back.atlas == "yeo7" and back.networks == back.labels


def _bad_inputs(tmp_path, rng):
    gii = tmp_path / "sub-01_hemi-L_bold.func.gii"
    write_gifti(gii, rng.standard_normal((3, 1000)), tr=1.0)
    write_gifti(tmp_path / "sub-01_hemi-R_bold.func.gii", rng.standard_normal((3, 1000)), tr=1.0)
    junk = tmp_path / "junk.dtseries.nii"
    junk.write_bytes(b"not a cifti file")
    good = write_cifti(tmp_path / "good.dtseries.nii", rng.standard_normal((3, 59412)), tr=1.0)
    return {"wrong vertex count": ([str(gii)], "wrong vertex count"),
            "unknown atlas": ([str(good), "--atlas", "aal"], "unknown atlas"),
            "unreadable": ([str(junk)], "junk.dtseries.nii"),
            "wrong space": ([str(good), "--atlas", "seitzman300"], "fsaverage5")}


@pytest.mark.parametrize("case", ["wrong vertex count", "unknown atlas", "unreadable", "wrong space"])
def test_cli_bad_inputs_one_line_exit_2(tmp_path, rng, capsys, case):
    args, expect = _bad_inputs(tmp_path, rng)[case]
    out = tmp_path / "out"
    assert main(["parcellate", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err
    assert not out.exists()


def test_cifti_subcortical_structures_appended(tmp_path, rng):
    import nibabel as nib
    from nibabel.cifti2 import cifti2_axes as ax

    from fmri_bench.io import fslr_cortex_vertices

    left, right = fslr_cortex_vertices()
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    bm = (ax.BrainModelAxis.from_surface(left, 32492, "CortexLeft")
          + ax.BrainModelAxis.from_surface(right, 32492, "CortexRight")
          + ax.BrainModelAxis.from_mask(mask, "ThalamusLeft", affine=np.eye(4)))
    data = rng.standard_normal((5, len(bm))).astype(np.float32)
    path = tmp_path / "full.dtseries.nii"
    nib.Cifti2Image(data, header=(ax.SeriesAxis(0, 0.8, 5, "SECOND"), bm)).to_filename(path)
    s = P.parcel_series(path, atlas="mmp")
    assert s.data.shape == (5, 361) and s.labels[-1] == "THALAMUS_LEFT" and s.networks[-1] == "Subcortical"
    np.testing.assert_allclose(s.data[:, -1], data[:, 59412:].mean(1), rtol=1e-5)
    assert P.parcel_series(path, atlas="yeo7").data.shape == (5, 7)  # network atlases: cortex only


def test_fsaverage5_gifti_through_seitzman(tmp_path, rng):
    from fmri_bench.surfaces import load_surface

    for h in "LR":
        write_gifti(tmp_path / f"sub-02_hemi-{h}_bold.func.gii", rng.standard_normal((6, 10242)), tr=2.0)
    s = P.parcel_series(tmp_path / "sub-02_hemi-L_bold.func.gii", atlas=None)
    at = P.load_atlas("seitzman300")
    assert s.atlas == "seitzman300" and s.space == "fsaverage5" and s.data.shape == (6, at.n_parcels)
    assert len(at.vertex_labels) == load_surface("fsaverage5").n_vertices and at.n_parcels > 200


def test_cohort_series_equal_the_cifti_parcel_means():
    """The synthetic cohort's parcel copies are the MMP means of its CIFTI runs (same atlas
    order as ``load_atlas('mmp')``), keyed subject_run."""
    import json

    from fmri_bench.synth import ensure_cohort

    cohort = ensure_cohort("smoke", seed=0)
    run = [r for r in json.loads((cohort / "ground_truth.json").read_text())["runs"] if r.get("path")][0]
    (s,) = P.cohort_series(cohort, [run])
    direct = P.parcel_series(cohort / run["path"], atlas="mmp")
    assert s.key == f"{run['subject']}_{run['run']}" and s.subject == run["subject"]
    assert s.labels == direct.labels[:360] and s.networks == direct.networks[:360]
    np.testing.assert_allclose(s.data, direct.data[:, :360], rtol=1e-4, atol=1e-2)


def test_corpus_windows_pad_and_carry_the_scan_text():
    from fmri_bench import tokenizer_train as tt

    rng = np.random.default_rng(0)
    series = [P.ParcelSeries(rng.standard_normal((n, 5)).astype(np.float32), 2.0, "yeo7", list("abcde"), f"f{i}",
                             key=f"s{i}_run", subject=f"s{i}") for i, n in enumerate((100, 10, 330))]
    recs = [{"scan": f"s{i}_run", "text": f"text {i}"} for i in range(3)]
    d = tt.corpus_windows(series, recs, length=160)
    # 100 frames: one padded window; 10 < 40 frames: none; 330: two full windows (tail dropped)
    assert d.windows.shape == (3, 160, 5) and d.lengths.tolist() == [100, 160, 160]
    assert d.texts == ["text 0", "text 2", "text 2"] and d.subjects == ["s0", "s2", "s2"]
    assert (d.windows[0, 100:] == 0).all()


def test_network_series_averages_parcels_per_network_and_hemisphere():
    from fmri_bench.parcels import ParcelSeries, network_series

    data = np.arange(12, dtype=np.float32).reshape(2, 6)
    s = ParcelSeries(data, 2.0, "mmp", ["L_a", "L_b", "R_a", "R_b", "L_c", "R_c"], "x.npz",
                     networks=["Visual", "Default", "Visual", "Visual", "Visual", "none"], key="k", subject="1")
    n = network_series(s)
    assert n.labels == ["L_Default", "L_Visual", "R_Visual"]
    assert np.allclose(n.data[:, 1], data[:, [0, 4]].mean(1)) and np.allclose(n.data[:, 2], data[:, [2, 3]].mean(1))
    assert np.allclose(n.data[:, 0], data[:, 1]) and n.key == "k" and n.subject == "1" and n.tr == 2.0
    with pytest.raises(InputError, match="no network names"):
        network_series(ParcelSeries(data, 2.0, "mmp", list("abcdef"), "y.npz"))
