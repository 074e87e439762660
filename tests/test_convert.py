"""fmri-bench flatten: CIFTI -> shards, bad inputs, split jobs, determinism, the CLI.

Most tests use a toy fs_LR_32k flat map (a few pixels, each copying one vertex) so they run in
seconds; the real FlatMapper is used by the subprocess CLI test only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fmri_bench import convert
from fmri_bench.cli import main
from fmri_bench.errors import InputError
from fmri_bench.io import FSLR_N_CORTEX, write_cifti, write_gifti
from fmri_bench.preprocess import resample_tr, zscore_time
from fmri_bench.clips import ClipDataset
from fmri_bench.shards import iter_samples

V = FSLR_N_CORTEX
ROOT = Path(__file__).resolve().parents[1]


class ToyMapper:
    """A 'flat map' of 5 x 7 pixels; in-mask pixel j copies vertex verts[j]."""

    def __init__(self, space="fs_LR_32k", n_vertices=V):
        self.space, self.n_vertices = space, n_vertices
        self.mask = np.zeros((5, 7), bool)
        self.mask[1:4, 1:6] = True
        self.mask[2, 6] = True
        self.n_pixels = int(self.mask.sum())
        self.verts = np.linspace(0, n_vertices - 1, self.n_pixels).astype(int)

    def to_pixels(self, x):
        return np.atleast_2d(np.asarray(x, np.float32))[:, self.verts]

    def grid_meta(self):
        return {"space": self.space, "shape": list(self.mask.shape),
                "bbox": [0.0, 7.0, 0.0, 5.0], "pixel_size": 1.0, "max_edge_mm": 16.0}


@pytest.fixture
def toy(monkeypatch):
    mapper = ToyMapper()
    monkeypatch.setitem(convert._MAPPERS, "fs_LR_32k", mapper)
    return mapper


def series(rng, t):
    return (rng.standard_normal((t, V)) * 3 + 10).astype(np.float32)


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """An 8-frame CIFTI run (TR 1 s), written once: nibabel's CIFTI writer takes ~1 s."""
    x = series(np.random.default_rng(1), 8)
    return write_cifti(tmp_path_factory.mktemp("cifti") / "run8.dtseries.nii", x, tr=1.0)


def copies(src, folder, names):
    folder.mkdir(exist_ok=True)
    out = [folder / name for name in names]
    for path in out:
        shutil.copyfile(src, path)
    return out


def stem(key):
    """A run key without its path hash (``sub-01_bold_0123456789`` -> ``sub-01_bold``)."""
    return re.sub(r"_[0-9a-f]{10}$", "", key)


def keys_in(out):
    """The readable part of each stored key, in shard order."""
    return [stem(s["key"]) for s in iter_samples(out)]


def runs_in(out):
    """key -> bold of every stored run; a key stored twice is an error."""
    got = {}
    for s in iter_samples(out):
        assert s["key"] not in got, f"{s['key']} stored twice"
        got[s["key"]] = s["bold"]
    return got


def interrupt_at(monkeypatch, name):
    """Make converting the input whose path contains ``name`` raise KeyboardInterrupt (as if the
    user pressed Ctrl-C there); returns the real ``convert_run``."""
    real = convert.convert_run

    def flaky(item, *args, **kw):
        if name in str(item):
            raise KeyboardInterrupt
        return real(item, *args, **kw)

    monkeypatch.setattr(convert, "convert_run", flaky)
    return real


# ----------------------------------------------------------------------------- conversion


def test_flatten_cifti_runs_and_map(tmp_path, rng, toy):
    a, b, m = series(rng, 20), series(rng, 20), series(rng, 1)
    write_cifti(tmp_path / "sub-01_task-rest_bold.dtseries.nii", a, tr=1.0)
    write_cifti(tmp_path / "sub-02_task-rest_bold.dtseries.nii", b, tr=2.0)
    write_cifti(tmp_path / "sub-01_desc-zmap.dscalar.nii", m, kind="dscalar")
    inputs = sorted(str(p) for p in tmp_path.glob("*.nii"))
    out = tmp_path / "shards"

    summary = convert.flatten(inputs, out, shard_size=2, progress=False)
    assert (summary.runs, summary.frames, summary.failed) == (3, 1 + 20 + 39, [])
    assert [Path(p).name for p in summary.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert summary.line().startswith("runs=3 frames=60 seconds=")
    assert "frames/s=" in summary.line() and summary.line().endswith("failed=0")

    got = {stem(s["key"]): s for s in iter_samples(out)}
    assert list(got) == ["sub-01_desc-zmap", "sub-01_task-rest_bold", "sub-02_task-rest_bold"]
    s = got["sub-01_task-rest_bold"]
    assert s["bold"].dtype == np.float16 and s["bold"].shape == (20, toy.n_pixels)
    assert np.array_equal(s["bold"], zscore_time(a)[:, toy.verts].astype(np.float16))
    assert np.array_equal(s["mask"], toy.mask)
    meta = s["meta"]
    assert meta["space"] == "fs_LR_32k" and meta["tr"] == 1.0 and meta["n_frames"] == 20
    assert meta["grid"]["shape"] == [5, 7] and meta["grid"]["pixel_size"] == 1.0
    assert meta["source"] == "sub-01_task-rest_bold.dtseries.nii" and meta["is_map"] is False
    assert meta["entities"] == {"sub": "01", "task": "rest"} and meta["n_pixels"] == 16
    # TR 2 s -> 1 s: 39 frames, the even ones are the original samples
    s2 = got["sub-02_task-rest_bold"]
    expect = resample_tr(zscore_time(b), 2.0, 1.0)[:, toy.verts].astype(np.float16)
    assert s2["bold"].shape == (39, 16) and np.array_equal(s2["bold"], expect)
    assert s2["meta"]["input_tr"] == 2.0 and s2["meta"]["tr"] == 1.0
    # a dscalar is a single-frame map, stored as given (no z-score)
    sm = got["sub-01_desc-zmap"]
    assert sm["meta"]["is_map"] is True and sm["meta"]["tr"] is None
    assert np.array_equal(sm["bold"], m[:, toy.verts].astype(np.float16))


def test_events_stored_and_event_clips(tmp_path, rng, toy):
    run = tmp_path / "sub-01_task-faces_bold.dtseries.nii"
    write_cifti(run, series(rng, 40), tr=2.0)  # -> 79 frames at 1 s
    pd.DataFrame({"onset": [4.0, 21.6, 70.0], "duration": [2.0, 2.0, 2.0],
                  "trial_type": ["face", "house", "face"]}).to_csv(
        tmp_path / "sub-01_task-faces_events.tsv", sep="\t", index=False)  # found beside it
    other = tmp_path / "ev.tsv"
    pd.DataFrame({"onset": [1.0], "duration": [1.0], "trial_type": ["x"]}).to_csv(
        other, sep="\t", index=False)

    convert.flatten([run], tmp_path / "a", progress=False)
    (s,) = iter_samples(tmp_path / "a")
    assert s["events"] == [{"onset": 4.0, "duration": 2.0, "trial_type": "face"},
                           {"onset": 21.6, "duration": 2.0, "trial_type": "house"},
                           {"onset": 70.0, "duration": 2.0, "trial_type": "face"}]
    clips = list(ClipDataset(tmp_path / "a", mode="event", label_map={"face": 0, "house": 1}))
    assert [(c["start"], c["label"]) for c in clips] == [(4, 0), (22, 1)]  # 70 + 16 > 79

    convert.flatten([run], tmp_path / "b", events=[other], progress=False)
    (s,) = iter_samples(tmp_path / "b")
    assert s["events"] == [{"onset": 1.0, "duration": 1.0, "trial_type": "x"}]
    with pytest.raises(InputError, match="one per input"):
        convert.flatten([run], tmp_path / "c", events=[other, other], progress=False)


def test_split_jobs_never_collide(tmp_path, run8, toy):
    inputs = copies(run8, tmp_path / "in", [f"sub-{i:02d}_bold.dtseries.nii" for i in range(5)])
    out = tmp_path / "out"
    per_job = []
    for job in range(2):
        summary = convert.flatten(inputs, out, shard_size=2, shard_index=job, num_shards=2,
                                  progress=False)
        per_job.append([Path(p).name for p in summary.shards])
    assert per_job == [["shard-000000.tar", "shard-000002.tar"], ["shard-000001.tar"]]
    assert sorted(keys_in(out)) == [f"sub-{i:02d}_bold" for i in range(5)]
    assert keys_in(out / "shard-000001.tar") == ["sub-01_bold", "sub-03_bold"]
    with pytest.raises(InputError, match="shard-index"):
        convert.flatten(inputs, out, shard_index=2, num_shards=2, progress=False)


def test_deterministic_bytes_any_worker_count(tmp_path, run8, toy):
    inputs = copies(run8, tmp_path / "in", [f"sub-{i}_bold.dtseries.nii" for i in range(3)])
    a = convert.flatten(inputs, tmp_path / "a", shard_size=2, input_tr=1.5, progress=False)
    b = convert.flatten(inputs, tmp_path / "b", shard_size=2, input_tr=1.5, workers=2,
                        progress=False)
    assert a.frames == 3 * 11  # 8 frames at 1.5 s -> 11 at 1 s
    assert len(a.shards) == len(b.shards) == 2
    assert [Path(p).read_bytes() for p in a.shards] == [Path(p).read_bytes() for p in b.shards]


def test_interrupt_mid_shard_leaves_no_partial_shard(tmp_path, run8, toy, monkeypatch):
    inputs = copies(run8, tmp_path / "in", [f"sub-{i}_bold.dtseries.nii" for i in range(3)])
    interrupt_at(monkeypatch, "sub-2")
    with pytest.raises(KeyboardInterrupt):
        convert.flatten(inputs, tmp_path / "out", shard_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard-000000.tar"]


def test_gifti_pair_listed_twice_is_one_run(tmp_path, rng, monkeypatch):
    from fmri_bench.surfaces import load_surface

    surf = load_surface("fsaverage5")
    mapper = ToyMapper("fsaverage5", surf.n_vertices)
    monkeypatch.setitem(convert._MAPPERS, "fsaverage5", mapper)
    lh, rh = (rng.standard_normal((6, 10242)).astype(np.float32) for _ in range(2))
    paths = [write_gifti(tmp_path / f"sub-01_hemi-{h}_task-x_bold.func.gii", x, tr=2.0)
             for h, x in (("L", lh), ("R", rh))]
    summary = convert.flatten(paths, tmp_path / "out", progress=False)
    assert (summary.runs, summary.frames, summary.failed) == (1, 11, [])
    (s,) = iter_samples(tmp_path / "out")
    assert stem(s["key"]) == "sub-01_task-x_bold" and s["meta"]["space"] == "fsaverage5"
    both = np.concatenate([lh[:, surf.mesh_index[surf.hemi_slice(0)]],
                           rh[:, surf.mesh_index[surf.hemi_slice(1)]]], axis=1)
    expect = resample_tr(zscore_time(both), 2.0, 1.0)[:, mapper.verts].astype(np.float16)
    assert np.array_equal(s["bold"], expect)


def test_sample_keys():
    key = convert.sample_key
    assert key("a/sub-01_ses-2_task-rest_bold.dtseries.nii") == "sub-01_ses-2_task-rest_bold"
    assert key("100206/MNINonLinear/Results/tfMRI_WM_LR/tfMRI_WM_LR_Atlas_MSMAll.dtseries.nii") \
        == "sub-100206_tfMRI_WM_LR_Atlas_MSMAll"
    assert key("sub-01_hemi-L_task-x_bold.func.gii") == key("sub-01_hemi-R_task-x_bold.func.gii") \
        == "sub-01_task-x_bold"
    assert key("run.1.v2.nii.gz") == "run_1_v2"


def test_run_keys_are_one_per_input_path(tmp_path, monkeypatch):
    """A run's key depends on its own path (relative to the output folder) only: not on the
    other inputs, their order, or where the folders are when moved together."""
    from fmri_bench.harness.datasets import run_identity

    out = tmp_path / "out"
    a, b = tmp_path / "in" / "siteA" / "run.dtseries.nii", tmp_path / "in" / "siteB" / "run.dtseries.nii"
    ka, kb = convert.run_keys([a, b], out)
    assert ka != kb and stem(ka) == stem(kb) == "run"
    assert convert.run_keys([b, a], out) == [kb, ka] and convert.run_keys([b], out) == [kb]
    moved = tmp_path / "elsewhere"
    assert convert.run_keys([moved / "in" / "siteA" / "run.dtseries.nii"], moved / "out") == [ka]
    monkeypatch.chdir(tmp_path)  # a relative path is the same input as the absolute one
    assert convert.run_key(Path("in/siteA/run.dtseries.nii"), "out") == ka
    # still HCP / BIDS names: the harness reads subject and run from them
    hcp = convert.run_key("/d/100206/MNINonLinear/Results/tfMRI_WM_LR/tfMRI_WM_LR_Atlas_MSMAll.dtseries.nii", "/o")
    assert re.fullmatch(r"sub-100206_tfMRI_WM_LR_Atlas_MSMAll_[0-9a-f]{10}", hcp)
    assert run_identity(hcp, {}) == ("100206", "task", "WM", "WM")
    bids = convert.run_key("/d/sub-01/func/sub-01_ses-2_task-rest_bold.dtseries.nii", "/o")
    assert convert._entities(bids) == {"sub": "01", "ses": "2", "task": "rest"}
    assert run_identity(bids, {"entities": convert._entities(bids)}) == ("01", "rest", "REST2", None)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def bad_inputs(tmp_path, rng, run8):
    """{name: path} of one good run and one file per kind of bad input."""
    d = tmp_path / "in"
    files = {}
    files["good"], good2 = copies(run8, d, ["sub-01_bold.dtseries.nii",
                                            "sub-08_bold.dtseries.nii"])
    files["not_fmri"] = d / "notes.dtseries.nii"
    files["not_fmri"].write_text("this is not an image\n")
    lh = write_gifti(d / "sub-03_hemi-L_bold.func.gii", rng.standard_normal((4, 500)), tr=1.0)
    write_gifti(d / "sub-03_hemi-R_bold.func.gii", rng.standard_normal((4, 500)), tr=1.0)
    files["wrong_vertices"] = lh
    x = series(rng, 8)
    x[3, 100] = np.nan
    files["nan"] = write_cifti(d / "sub-04_bold.dtseries.nii", x, tr=1.0)
    files["zero_variance"] = write_cifti(d / "sub-05_bold.dtseries.nii",
                                         np.ones((8, V), np.float32), tr=1.0)
    files["no_tr"] = write_cifti(d / "sub-06_bold.dtseries.nii", series(rng, 8), tr=None)
    # an MNI-covering 4D NIfTI whose gzip stream is cut in the data (the header still reads)
    affine = np.diag([50.0, 50.0, 50.0, 1.0])
    affine[:3, 3] = -100.0
    img = nib.Nifti1Image(rng.standard_normal((5, 5, 5, 30)).astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    files["truncated_gzip"] = d / "sub-07_bold.nii.gz"
    nib.save(img, files["truncated_gzip"])
    blob = files["truncated_gzip"].read_bytes()
    files["truncated_gzip"].write_bytes(blob[: len(blob) // 2])
    files["good2"] = good2
    return files


def test_cli_bad_inputs_are_skipped_and_named(tmp_path, bad_inputs, toy, capsys):
    out = tmp_path / "out"
    inputs = [str(p) for p in bad_inputs.values()]
    inputs.append(str(bad_inputs["wrong_vertices"]).replace("hemi-L", "hemi-R"))  # its twin
    code = main(["flatten", *inputs, "--out", str(out), "--shard-size", "1"])
    err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.err.splitlines() if "error:" in ln]
    problems = {"not_fmri": "not", "wrong_vertices": "vertex count", "nan": "NaN",
                "zero_variance": "zero-variance", "no_tr": "no TR",
                "truncated_gzip": "gzip"}
    for name, word in problems.items():
        (line,) = [ln for ln in lines if str(bad_inputs[name]) in ln]  # one line per file
        assert word in line, (name, line)
    assert len(lines) == len(problems)
    # the good runs are converted, nothing partial is left
    assert keys_in(out) == ["sub-01_bold", "sub-08_bold"]
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    summary = err.out.strip().splitlines()[-1]
    assert summary.startswith("runs=2 frames=16 ") and "failed=6 (" in summary
    assert "notes.dtseries.nii" in summary and "sub-07_bold.nii.gz" in summary


def test_cli_unwritable_output(tmp_path, run8, toy, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["flatten", str(run8), "--out", str(blocker / "shards")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fmri-bench flatten: error: ") and str(blocker / "shards") in err
    assert "not writable" in err and len(err.splitlines()) == 1


def test_cli_subprocess_with_real_flatmap(tmp_path, rng):
    """The installed command, end to end, with the real fs_LR_32k flat map (cached operator)."""
    from fmri_bench.flatmap import FlatMapper

    run = write_cifti(tmp_path / "sub-01_task-rest_bold.dtseries.nii", series(rng, 5), tr=1.0)
    bad = tmp_path / "sub-02_bold.dtseries.nii"
    bad.write_bytes(b"\0" * 10)
    exe = ROOT / ".venv" / "bin" / "fmri-bench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fmri_bench.cli"]
    res = subprocess.run([*cmd, "flatten", str(run), str(bad), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr
    assert f"error: {bad}:" in res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("runs=1 frames=5 ")
    (s,) = iter_samples(tmp_path / "out")
    mapper = FlatMapper("fs_LR_32k")
    assert s["mask"].shape == (224, 560) and np.array_equal(s["mask"], mapper.mask)
    from fmri_bench.io import load_run

    expect = mapper.to_pixels(zscore_time(load_run(run).data)).astype(np.float16)
    assert np.array_equal(s["bold"], expect)
    assert s["meta"]["grid"] == mapper.grid_meta()


# ----------------------------------------------------------------------------- again into one folder


def test_existing_shards_refused_resumed_or_replaced(tmp_path, run8, toy, monkeypatch, capsys):
    inputs = copies(run8, tmp_path / "in", [f"sub-{i}_bold.dtseries.nii" for i in range(5)])
    out = tmp_path / "out"
    full = convert.flatten(inputs, tmp_path / "full", shard_size=2, progress=False)
    # an interrupted call: the first shard finished, the second was being filled
    real = interrupt_at(monkeypatch, "sub-3")
    with pytest.raises(KeyboardInterrupt):
        convert.flatten(inputs, out, shard_size=2, progress=False)
    monkeypatch.setattr(convert, "convert_run", real)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]

    # neither flag: refused, nothing touched
    before = (out / "shard-000000.tar").read_bytes()
    with pytest.raises(InputError, match="already holds 1 shards of this job.*--resume"):
        convert.flatten(inputs, out, shard_size=2, progress=False)
    assert main(["flatten", *map(str, inputs), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # resume: only the runs not in a finished shard are converted, and the data are the same
    done = convert.flatten(inputs, out, shard_size=2, progress=False, resume=True)
    assert (done.runs, done.resumed) == (3, 2) and done.line().endswith("resumed=2")
    assert [Path(p).name for p in done.shards] == ["shard-000001.tar", "shard-000002.tar"]
    assert (out / "shard-000000.tar").read_bytes() == before
    got, want = runs_in(out), runs_in(tmp_path / "full")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert convert.flatten(inputs, out, shard_size=2, progress=False, resume=True).runs == 0
    # overwrite: written anew, and this job's shards it did not write again are gone
    again = convert.flatten(inputs[:2], out, shard_size=2, progress=False, overwrite=True)
    assert [Path(p).name for p in again.shards] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert keys_in(out) == ["sub-0_bold", "sub-1_bold"]
    with pytest.raises(InputError, match="one of --resume and --overwrite"):
        convert.flatten(inputs, out, progress=False, resume=True, overwrite=True)
    assert len(full.shards) == 3


def test_resume_with_an_unreadable_shard_names_it(tmp_path, run8, toy):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"not a tar file at all" * 50)
    inputs = copies(run8, tmp_path / "in", ["sub-0_bold.dtseries.nii"])
    with pytest.raises(InputError, match="shard-000000.tar.*cannot read shard"):
        convert.flatten(inputs, out, progress=False, resume=True)


def test_resume_matches_runs_by_path_not_position(tmp_path, rng, toy):
    """``flatten siteB/run`` then ``flatten siteA/run siteB/run --resume``: siteA is converted and
    siteB is stored once (keys that depended on the input order matched siteA to siteB's run)."""
    runs = []
    for site, scale in (("siteA", 1.0), ("siteB", 5.0)):
        (tmp_path / "in" / site).mkdir(parents=True)
        runs.append(write_cifti(tmp_path / "in" / site / "run.dtseries.nii", series(rng, 8) * scale, tr=1.0))
    out = tmp_path / "out"
    convert.flatten(runs[1:], out, progress=False)
    again = convert.flatten(runs, out, progress=False, resume=True)
    assert (again.runs, again.resumed) == (1, 1)
    convert.flatten(runs, tmp_path / "fresh", progress=False)
    got, want = runs_in(out), runs_in(tmp_path / "fresh")
    assert len(want) == 2 and got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def _rewrite(path, rng, frames):
    """The input changes in place (a regenerated cohort): new data, size and mtime."""
    write_cifti(path, series(rng, frames), tr=1.0)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def test_resume_after_an_interrupted_overwrite_of_changed_inputs(tmp_path, rng, toy, monkeypatch):
    """``--overwrite`` on changed inputs killed midway, then ``--resume``: the runs still stored from
    the old inputs are stale, converted again, and their shard removed (they counted as done)."""
    (tmp_path / "in").mkdir()
    paths = [write_cifti(tmp_path / "in" / f"sub-{i}_bold.dtseries.nii", series(rng, 8), tr=1.0) for i in range(4)]
    out = tmp_path / "out"
    convert.flatten(paths, out, shard_size=2, progress=False)  # shard 0: sub-0, sub-1; shard 1: sub-2, sub-3
    for p in paths:
        _rewrite(p, rng, 12)
    real = interrupt_at(monkeypatch, "sub-2")
    with pytest.raises(KeyboardInterrupt):
        convert.flatten(paths, out, shard_size=2, progress=False, overwrite=True)
    monkeypatch.setattr(convert, "convert_run", real)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]  # new, old

    done = convert.flatten(paths, out, shard_size=2, progress=False, resume=True)
    assert (done.runs, done.resumed) == (2, 2)
    assert done.stale == 2 and done.line().endswith("resumed=2 stale=2")
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000002.tar"]
    convert.flatten(paths, tmp_path / "fresh", shard_size=2, progress=False)
    got, want = runs_in(out), runs_in(tmp_path / "fresh")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert {v.shape[0] for v in got.values()} == {12}
    assert convert.flatten(paths, out, shard_size=2, progress=False, resume=True).runs == 0


def test_resume_with_changed_settings_or_a_stale_shard_it_cannot_rewrite(tmp_path, rng, toy):
    (tmp_path / "in").mkdir()
    a, b = (write_cifti(tmp_path / "in" / f"sub-{i}_bold.dtseries.nii", series(rng, 8), tr=1.0) for i in "ab")
    out = tmp_path / "out"
    convert.flatten([a, b], out, shard_size=2, progress=False)
    # another --tr is another conversion: nothing is kept as done
    again = convert.flatten([a, b], out, shard_size=2, tr=2.0, progress=False, resume=True)
    assert (again.runs, again.resumed) == (2, 0)
    assert again.stale == 2
    assert {v.shape[0] for v in runs_in(out).values()} == {4} and len(runs_in(out)) == 2
    # a changed run whose shard also holds a run not given now: refused, nothing touched
    _rewrite(a, rng, 8)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(InputError, match=r"shard-000001.tar: holds runs whose inputs changed since \(sub-a_bold_"
                                         r"[0-9a-f]+\) beside runs of inputs not given now \(sub-b_bold_"):
        convert.flatten([a], out, shard_size=2, tr=2.0, progress=False, resume=True)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_resume_refuses_shards_without_input_records(tmp_path, run8, toy):
    from fmri_bench.shards import ShardWriter

    out = tmp_path / "out"
    with ShardWriter(out) as sink:  # a shard from before input records (or not made by flatten)
        sink.write("sub-0_bold", np.zeros((4, toy.n_pixels), np.float16), toy.mask, {"tr": 1.0})
    with pytest.raises(InputError, match="shard-000000.tar: run 'sub-0_bold' has no input record.*--overwrite"):
        convert.flatten([run8], out, progress=False, resume=True)
