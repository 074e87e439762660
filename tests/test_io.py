"""Readers and writers: each format on files written here with nibabel, TR parsing, events,
the NIfTI -> fsaverage5 operator against nilearn, and every bad input as a one-line InputError."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.cifti2 import cifti2_axes as ax

from fmri_bench import io
from fmri_bench.errors import InputError
from fmri_bench.paths import cache_dir
from fmri_bench.surfaces import load_surface

# 8 mm voxels over the MNI152 brain box: covers all of fsaverage5, 18k voxels (fast)
MNI8_AFFINE = np.array([[-8.0, 0, 0, 96], [0, 8, 0, -132], [0, 0, 8, -78], [0, 0, 0, 1]])
MNI8_SHAPE = (25, 29, 25)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FMRI_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _nifti(path, data, tr=None, unit="sec", affine=MNI8_AFFINE):
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.header.set_xyzt_units("mm", unit)
    if tr is not None:
        img.header["pixdim"][4] = tr
    nib.save(img, path)
    return img


def _raises(fn, path, match):
    with pytest.raises(InputError, match=match) as info:
        fn()
    msg = str(info.value)
    assert os.path.basename(str(path)) in msg and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- CIFTI


def test_cifti_dtseries_round_trip(tmp_path, rng):
    data = rng.standard_normal((4, io.FSLR_N_CORTEX)).astype(np.float32)
    path = io.write_cifti(tmp_path / "run.dtseries.nii", data, tr=0.72)
    assert [p.name for p in tmp_path.iterdir()] == ["run.dtseries.nii"]  # no temp file left
    img = nib.load(path)
    assert img.header.get_axis(0).step == pytest.approx(0.72)
    run = io.read_cifti(path)
    assert run.space == "fs_LR_32k" and run.tr == pytest.approx(0.72) and not run.is_map
    np.testing.assert_array_equal(run.data, data)


def test_cifti_dscalar_is_map(tmp_path, rng):
    data = rng.standard_normal((2, io.FSLR_N_CORTEX))
    path = io.write_cifti(tmp_path / "m.dscalar.nii", data, kind="dscalar", names=["a", "b"])
    assert list(nib.load(path).header.get_axis(0).name) == ["a", "b"]
    run = io.load_run(path)
    assert run.is_map and run.tr is None
    np.testing.assert_allclose(run.data, data.astype(np.float32))


def _write_dense(path, data, models, volume_shape=(91, 109, 91), step=2.0):
    """A dtseries from low-level nibabel CIFTI objects (fast, unlike BrainModelAxis; read back
    by nibabel's own axes below).
    models: [(structure, "surface", vertex indices) | (structure, "voxels", ijk (n, 3))]."""
    from nibabel import cifti2 as c2

    bm_map = c2.Cifti2MatrixIndicesMap([1], "CIFTI_INDEX_TYPE_BRAIN_MODELS")
    offset = 0
    for name, kind, idx in models:
        if kind == "surface":
            bm = c2.Cifti2BrainModel(offset, len(idx), "CIFTI_MODEL_TYPE_SURFACE", name, io.FSLR_N_MESH,
                                     vertex_indices=c2.Cifti2VertexIndices(list(idx)))
        else:
            bm = c2.Cifti2BrainModel(offset, len(idx), "CIFTI_MODEL_TYPE_VOXELS", name,
                                     voxel_indices_ijk=c2.Cifti2VoxelIndicesIJK(idx.tolist()))
        bm_map.append(bm)
        offset += len(idx)
    bm_map.volume = c2.Cifti2Volume(volume_shape, c2.Cifti2TransformationMatrixVoxelIndicesIJKtoXYZ(-3, np.eye(4)))
    row = ax.SeriesAxis(0, step, len(data)).to_mapping(0)
    matrix = c2.Cifti2Matrix()
    matrix.append(row)
    matrix.append(bm_map)
    io.save_cifti_matrix(path, data, matrix, "ConnDenseSeries")


def test_cifti_full_grayordinates_and_other_vertex_subset(tmp_path):
    """Cortex is placed by vertex index: 91282 grayordinates with subcortical voxels between
    the hemispheres, a left cortex holding all 32492 mesh vertices (medial wall too), and a
    shuffled partial right cortex."""
    left, right = io.fslr_cortex_vertices()
    n_sub = 91282 - io.FSLR_N_CORTEX
    ijk = np.argwhere(np.ones((40, 40, 20), bool))[:n_sub]
    perm = np.random.default_rng(1).permutation(right)[:20000]
    n_sub_small = 50
    models = [
        ("CIFTI_STRUCTURE_CORTEX_LEFT", "surface", np.arange(io.FSLR_N_MESH)),
        ("CIFTI_STRUCTURE_THALAMUS_LEFT", "voxels", ijk[:n_sub_small]),
        ("CIFTI_STRUCTURE_CORTEX_RIGHT", "surface", perm),
    ]
    # value = mesh vertex (+ 1e5 on the right), subcortical voxels -1
    row = np.concatenate([np.arange(io.FSLR_N_MESH), -np.ones(n_sub_small), 1e5 + perm]).astype(np.float32)
    path = tmp_path / "full.dtseries.nii"
    _write_dense(path, np.stack([row, 2 * row]), models)

    run = io.read_cifti(path)
    expect = np.concatenate([left, np.where(np.isin(right, perm), 1e5 + right, 0)]).astype(np.float32)
    np.testing.assert_array_equal(run.data[0], expect)
    np.testing.assert_array_equal(run.data[1], 2 * expect)
    assert run.tr == 2.0
    # the real HCP layout: CORTEX_LEFT, CORTEX_RIGHT, then 31870 subcortical voxels = 91282
    hcp = tmp_path / "hcp.dtseries.nii"
    data = np.concatenate([np.tile(np.arange(io.FSLR_N_CORTEX, dtype=np.float32), (2, 1)), np.full((2, n_sub), 7.0)], 1)
    _write_dense(hcp, data, [("CIFTI_STRUCTURE_CORTEX_LEFT", "surface", left),
                             ("CIFTI_STRUCTURE_CORTEX_RIGHT", "surface", right),
                             ("CIFTI_STRUCTURE_THALAMUS_LEFT", "voxels", ijk)], step=0.72)
    run = io.load_run(hcp)
    assert nib.load(hcp).shape == (2, 91282) and run.tr == pytest.approx(0.72)
    np.testing.assert_array_equal(run.data, data[:, : io.FSLR_N_CORTEX])
    assert not run.data.flags.owndata  # the cortex columns are a view of the file, not a copy


def test_count_nonfinite():
    x = np.ones((5, 4), np.float32)
    assert io.count_nonfinite(x) == 0
    x[1, 2], x[0, 0], x[3, 0] = np.nan, np.inf, -np.inf
    assert io.count_nonfinite(x) == 3 and io.count_nonfinite(np.asfortranarray(x)) == 3
    assert io.count_nonfinite(np.full((4, 2), 3e38, np.float32)) == 0  # the sums overflow, the values do not


def _series_file(path, step, exponent=0, unit="SECOND", n=3):
    from nibabel import cifti2 as c2

    row = c2.Cifti2MatrixIndicesMap([0], "CIFTI_INDEX_TYPE_SERIES", number_of_series_points=n,
                                    series_exponent=exponent, series_start=0.0, series_step=step,
                                    series_unit=unit)
    matrix = c2.Cifti2Matrix()
    matrix.append(row)
    matrix.append(io._fslr_brain_model_map())
    data = np.random.default_rng(0).standard_normal((n, io.FSLR_N_CORTEX))
    return io.save_cifti_matrix(path, data, matrix, "ConnDenseSeries")


def test_cifti_tr_units(tmp_path):
    ms = _series_file(tmp_path / "ms.dtseries.nii", 720.0, exponent=-3)  # the CIFTI way to store ms
    assert nib.load(ms).header.get_axis(0).step == pytest.approx(0.72)
    assert io.read_cifti(ms).tr == pytest.approx(0.72)
    bad = _series_file(tmp_path / "bad_ms.dtseries.nii", 720.0)  # ms written as s
    assert io.read_cifti(bad).tr == pytest.approx(0.72)
    hz = _series_file(tmp_path / "hz.dtseries.nii", 0.5, unit="HERTZ")
    _raises(lambda: io.read_cifti(hz), hz, "HERTZ")


def test_cifti_wrong_mesh(tmp_path):
    bm = ax.BrainModelAxis.from_surface(np.arange(100), 40962, "CortexLeft") + ax.BrainModelAxis.from_surface(
        np.arange(100), 40962, "CortexRight"
    )
    path = tmp_path / "fs7.dtseries.nii"
    nib.Cifti2Image(np.zeros((2, 200), np.float32), header=(ax.SeriesAxis(0, 1.0, 2), bm)).to_filename(path)
    _raises(lambda: io.load_run(path), path, "wrong vertex count.*40962")


# ----------------------------------------------------------------------------- GIFTI


@pytest.mark.parametrize("space,n_mesh", [("fsaverage5", 10242), ("fs_LR_32k", 32492)])
def test_gifti_pair(tmp_path, rng, space, n_mesh):
    lh, rh = rng.standard_normal((2, 3, n_mesh)).astype(np.float32)
    io.write_gifti(tmp_path / "sub-01_hemi-L_bold.func.gii", lh, tr=1.5)
    io.write_gifti(tmp_path / "sub-01_hemi-R_bold.func.gii", rh, tr=1.5)
    surf = load_surface(space)
    run = io.load_run(tmp_path / "sub-01_hemi-R_bold.func.gii")  # the left twin is found by name
    assert run.space == space and run.tr == pytest.approx(1.5) and run.data.shape == (3, surf.n_vertices)
    idx = surf.mesh_index
    np.testing.assert_array_equal(run.data[:, surf.hemi_slice(0)], lh[:, idx[surf.hemi_slice(0)]])
    np.testing.assert_array_equal(run.data[:, surf.hemi_slice(1)], rh[:, idx[surf.hemi_slice(1)]])


def test_gifti_bad_inputs(tmp_path):
    io.write_gifti(tmp_path / "x.L.func.gii", np.ones((2, 5000)), tr=1.0)
    io.write_gifti(tmp_path / "x.R.func.gii", np.ones((2, 5000)), tr=1.0)
    _raises(lambda: io.load_run(tmp_path / "x.L.func.gii"), "x.L.func.gii", "wrong vertex count: 5000")
    io.write_gifti(tmp_path / "lone_hemi-L.func.gii", np.ones((2, 10242)), tr=1.0)
    _raises(lambda: io.load_run(tmp_path / "lone_hemi-L.func.gii"), "lone_hemi-L", "both hemispheres")
    io.write_gifti(tmp_path / "a.L.func.gii", np.ones((2, 10242)))
    io.write_gifti(tmp_path / "a.R.func.gii", np.ones((2, 10242)))
    _raises(lambda: io.load_run(tmp_path / "a.L.func.gii"), "a.L.func.gii", "no TR")
    assert io.load_run(tmp_path / "a.L.func.gii", tr=0.8).tr == 0.8
    (tmp_path / "a.L.json").write_text('{"RepetitionTime": 1.6}')  # BIDS sidecar
    assert io.load_run(tmp_path / "a.L.func.gii").tr == 1.6
    _raises(lambda: io.load_run(tmp_path / "a.L.func.gii", space="fs_LR_32k"), "a.L.func.gii", "fsaverage5")


# ----------------------------------------------------------------------------- NIfTI


def _vol_to_surf_reference(img):
    from nilearn.surface import vol_to_surf

    surf = load_surface("fsaverage5")
    parts = []
    for h, hemi in enumerate(("left", "right")):
        tex = vol_to_surf(img, **io.VolumeSampling().vol_to_surf_kwargs(hemi))  # (n_mesh, T)
        parts.append(np.atleast_2d(tex.T)[:, surf.mesh_index[surf.hemi_slice(h)]])
    return np.concatenate(parts, axis=1)


def test_nifti_4d_matches_nilearn_vol_to_surf(tmp_path, rng):
    vol = rng.standard_normal(MNI8_SHAPE + (5,)).astype(np.float32)
    img = _nifti(tmp_path / "bold.nii.gz", vol, tr=2000.0, unit="msec")
    run = io.load_run(tmp_path / "bold.nii.gz")
    assert run.space == "fsaverage5" and run.tr == pytest.approx(2.0) and not run.is_map
    ref = _vol_to_surf_reference(img)
    assert run.data.shape == ref.shape == (5, load_surface("fsaverage5").n_vertices)
    np.testing.assert_allclose(run.data, ref, atol=2e-5)
    assert list((cache_dir() / "vol2surf").glob("fsaverage5_*.npz"))  # operator cached on disk
    io._VOLUME_OPERATORS.clear()  # the second read loads it from disk
    np.testing.assert_array_equal(io.load_run(tmp_path / "bold.nii.gz").data, run.data)


def test_nifti_3d_map_and_smooth_field(tmp_path):
    # a linear field is reproduced exactly by trilinear sampling: check against the vertices
    i, j, k = np.meshgrid(*(np.arange(n) for n in MNI8_SHAPE), indexing="ij")
    vol = (0.5 * i - 0.25 * j + k).astype(np.float32)
    img = _nifti(tmp_path / "map.nii", vol)
    run = io.load_run(tmp_path / "map.nii", tr=3.0)
    assert run.is_map and run.data.shape[0] == 1
    np.testing.assert_allclose(run.data, _vol_to_surf_reference(img), atol=1e-4)


def test_nifti_tr(tmp_path):
    vol = np.random.default_rng(0).standard_normal(MNI8_SHAPE + (3,))
    _nifti(tmp_path / "s.nii", vol, tr=2.5)
    assert io.load_run(tmp_path / "s.nii").tr == 2.5
    assert io.load_run(tmp_path / "s.nii", tr=1.25).tr == 1.25  # override
    _nifti(tmp_path / "zero.nii", vol, tr=0.0)
    _raises(lambda: io.load_run(tmp_path / "zero.nii"), "zero.nii", "no TR")
    assert io.load_run(tmp_path / "zero.nii", tr=2.0).tr == 2.0
    # int16 with scl_slope / scl_inter reads as the scaled float values
    ints = np.random.default_rng(1).integers(-900, 900, MNI8_SHAPE + (2,)).astype(np.int16)
    img = nib.Nifti1Image(ints, MNI8_AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    img.header["pixdim"][4] = 2.0
    nib.save(img, tmp_path / "int16.nii.gz")
    _nifti(tmp_path / "float.nii.gz", ints * 0.5 + 10.0, tr=2.0)
    np.testing.assert_allclose(io.load_run(tmp_path / "int16.nii.gz").data,
                               io.load_run(tmp_path / "float.nii.gz").data, atol=1e-4)


# ----------------------------------------------------------------------------- events


def test_bids_events(tmp_path):
    path = tmp_path / "sub-01_task-motor_events.tsv"
    path.write_text("onset\tduration\ttrial_type\tresponse_time\n12.5\t3\tleft\t0.4\n2\tn/a\tright\tn/a\n")
    ev = io.read_events(path)
    assert list(ev.columns) == ["onset", "duration", "trial_type"]
    assert ev.onset.tolist() == [2.0, 12.5] and ev.duration.tolist() == [0.0, 3.0]
    assert ev.trial_type.tolist() == ["right", "left"]
    # found beside a fMRIPrep-style run
    bold = tmp_path / "sub-01_task-motor_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    _nifti(bold, np.random.default_rng(0).standard_normal(MNI8_SHAPE + (2,)), tr=2.0)
    assert io.load_run(bold).events.onset.tolist() == [2.0, 12.5]


def test_hcp_evs(tmp_path, rng):
    evs = tmp_path / "EVs"
    evs.mkdir()
    (evs / "lf.txt").write_text("71.3\t12\t1\n10.0\t12\t1\n")
    (evs / "rh.txt").write_text("30.5 12 1\n")
    (evs / "empty.txt").write_text("")
    (evs / "Sync.txt").write_text("0.0\n")
    ev = io.read_events(evs)
    assert ev.onset.tolist() == [10.0, 30.5, 71.3] and ev.trial_type.tolist() == ["lf", "rh", "lf"]
    assert io.read_events(evs / "rh.txt").trial_type.tolist() == ["rh"]
    run_path = io.write_cifti(tmp_path / "tfMRI_MOTOR_LR_Atlas.dtseries.nii", rng.standard_normal((2, 59412)), tr=0.72)
    assert io.load_run(run_path).events.onset.tolist() == [10.0, 30.5, 71.3]
    assert io.load_run(run_path, events=False).events is None
    (evs / "bad.txt").write_text("1 2\n")
    _raises(lambda: io.read_events(evs), "bad.txt", "3")


# ----------------------------------------------------------------------------- bad inputs


def test_not_fmri(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 40)
    _raises(lambda: io.load_run(path), path, "not an fMRI image")
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    _raises(lambda: io.load_run(other), other, "unknown fMRI file type")
    _raises(lambda: io.load_run(tmp_path / "missing.nii.gz"), "missing.nii.gz", "not found")


def test_truncated_gzip(tmp_path, rng):
    path = tmp_path / "cut.nii.gz"
    _nifti(path, rng.standard_normal(MNI8_SHAPE + (4,)), tr=2.0)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    _raises(lambda: io.load_run(path), path, "truncated")
    path.write_bytes(blob[:200])  # cut inside the header
    _raises(lambda: io.load_run(path), path, "truncated|not an fMRI")


def test_nan_and_wrong_space(tmp_path, rng):
    data = rng.standard_normal((3, io.FSLR_N_CORTEX)).astype(np.float32)
    data[1, 7] = np.nan
    path = io.write_cifti(tmp_path / "nan.dtseries.nii", data, tr=1.0)
    _raises(lambda: io.load_run(path), path, "NaN/Inf")
    data[1, 7] = np.inf
    path = io.write_cifti(tmp_path / "inf.dtseries.nii", data, tr=1.0)
    _raises(lambda: io.load_run(path), path, "NaN/Inf")
    ok = io.write_cifti(tmp_path / "ok.dtseries.nii", np.ones((2, io.FSLR_N_CORTEX)), tr=1.0)
    _raises(lambda: io.load_run(ok, space="fsaverage5"), ok, "fs_LR_32k")
    _raises(lambda: io.load_run(ok, tr=-1), ok, "TR override")
    notr = io.write_cifti(tmp_path / "notr.dtseries.nii", np.ones((2, io.FSLR_N_CORTEX)))
    _raises(lambda: io.load_run(notr), notr, "no TR")


def test_volume_outside_mni(tmp_path, rng):
    far = MNI8_AFFINE.copy()
    far[:3, 3] += 500.0
    _nifti(tmp_path / "native.nii", rng.standard_normal(MNI8_SHAPE), affine=far)
    _raises(lambda: io.load_run(tmp_path / "native.nii"), "native.nii", "MNI152")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable(tmp_path):
    path = io.write_cifti(tmp_path / "locked.dtseries.nii", np.ones((2, io.FSLR_N_CORTEX)), tr=1.0)
    path.chmod(0)
    try:
        _raises(lambda: io.load_run(path), path, "unreadable|not an fMRI")
    finally:
        path.chmod(0o644)

