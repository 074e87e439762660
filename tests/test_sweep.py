"""The scaling sweep: subsets of a geometric series of sizes, resume skips finished points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmri_bench import scaling
from fmri_bench.errors import InputError
from fmri_bench.shards import ShardWriter

TINY = {"img_size": [16, 40], "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
        "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


def write_shards(out, subjects, frames=32):
    rng = np.random.default_rng(len(subjects))
    mask = np.zeros((16, 40), bool)
    mask[2:14, 2:38] = True
    with ShardWriter(out, shard_size=4) as w:
        for s in subjects:
            for ses in ("REST1", "REST2"):
                w.write(f"sub-{s}_rfMRI_{ses}_LR", rng.normal(size=(frames, int(mask.sum()))).astype(np.float16),
                        mask, {"subject": s, "tr": 1.0}, [])
    return str(out)


def test_sweep_subsets_are_disjoint_when_the_pool_allows():
    pool = [f"s{i}" for i in range(8)]
    sub = scaling.sweep_subsets(pool, [1, 2, 4], repeats=2, seed=0)
    assert sorted(sub) == [(1, 0), (1, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    for n in (1, 2, 4):
        assert len(sub[(n, 0)]) == n and not set(sub[(n, 0)]) & set(sub[(n, 1)])
    with pytest.raises(InputError, match="outside 1..8"):
        scaling.sweep_subsets(pool, [9], 1)


def test_sweep_runs_fits_and_resumes(tmp_path, monkeypatch, one_thread):
    shards = {"train": write_shards(tmp_path / "train", ["1", "2", "3", "4"]),
              "val": write_shards(tmp_path / "val", ["5"]), "val_ood": write_shards(tmp_path / "ood", ["6"])}
    overrides = dict(model_overrides=TINY, steps=2, batch_size=2, warmup_steps=1, eval_every=1, log_every=1,
                     data=dict(downsample=1, val_batches=1))
    res = scaling.run_sweep([1, 2], shards, tmp_path / "sweep", unit="subjects", train_overrides=overrides,
                            n_boot=20)
    assert [(p.size, p.n_runs, p.frames) for p in res.points] == [(1, 2, 64), (2, 4, 128)]
    assert all(np.isfinite(p.best_val) and np.isfinite(p.best_val_ood) and not p.resumed for p in res.points)
    assert res.fits["val"]["paper"].n_points == 2 and res.fits["val"]["offset"] is None
    assert any("4 distinct sizes" in n for n in res.notes)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(saved["points"]) == 2

    def no_training(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr("fmri_bench.train.train", no_training)
    again = scaling.run_sweep([1, 2], shards, tmp_path / "sweep", unit="subjects", train_overrides=overrides,
                              n_boot=20)
    assert all(p.resumed for p in again.points)
    assert [p.best_val for p in again.points] == [p.best_val for p in res.points]
    # a new size trains only itself
    monkeypatch.undo()
    more = scaling.run_sweep([1, 2, 4], shards, tmp_path / "sweep", unit="subjects", train_overrides=overrides,
                             n_boot=20)
    assert [p.resumed for p in more.points] == [True, True, False]
    # another training config: every point is trained afresh (its old run is not resumed)
    changed = scaling.run_sweep([1, 2], shards, tmp_path / "sweep", unit="subjects",
                                train_overrides={**overrides, "base_lr": 2e-3}, n_boot=20)
    assert [p.resumed for p in changed.points] == [False, False]
    assert json.loads((tmp_path / "sweep" / "n0001_r0" / "result.json").read_text())["spec"]["config"]["base_lr"] == 2e-3


def test_offset_law_dropped_on_a_flat_sweep():
    n = np.array([1e3, 2e3, 4e3, 8e3] * 2)
    flat = np.array([0.7337, 0.7338, 0.7337, 0.7337, 0.7321, 0.7321, 0.7321, 0.7321])  # seed, not size
    res = scaling.SweepResult([], {}, "subjects")
    fits = scaling._sweep_fits(res, "val", n, flat, n_boot=20, seed=0)
    assert fits["offset"] is None and fits["paper"] is not None
    assert any("does not fit" in note for note in res.notes)
    # a saturating sweep keeps it
    curve = 0.5 + (n / 100.0) ** -0.4
    kept = scaling._sweep_fits(scaling.SweepResult([], {}, "subjects"), "val", n, curve, n_boot=20, seed=0)
    assert kept["offset"] is not None and kept["offset"].r2 > 0.99



def _point(size, best, zero_lo, pca):
    from fmri_bench.scaling import SweepPoint

    ys = {"predict zero": {"loss": zero_lo + 0.01, "ci_low": zero_lo, "ci_high": zero_lo + 0.02, "captured": None},
          "PCA-70": {"loss": pca, "ci_low": pca - 0.01, "ci_high": pca + 0.01, "captured": None}}
    return SweepPoint(size, 0, [], 1, 100 * size, best, best, 10, 1.0, "", yardsticks={"val": ys, "val_ood": ys})


def test_verdict_reads_predict_zero_and_the_pca_yardstick():
    from fmri_bench.scaling import SweepResult, _sweep_fits

    flat = SweepResult([_point(n, 0.75, 0.70, 0.3) for n in (1, 2, 4, 8)], {}, "subjects")
    assert flat.learned() == [False] * 4
    assert "measures optimisation, not data; no law is fitted" in flat.verdict()
    pts = [_point(n, 0.6 - 0.02 * i, 0.70, 0.40 - 0.05 * i) for i, n in enumerate((1, 2, 4, 8))]
    res = SweepResult(pts, {}, "subjects")
    n, loss = res.arrays("val")
    res.fits["val"] = _sweep_fits(res, "val", n, loss, n_boot=50, seed=0)
    text = res.verdict()
    assert text.startswith("same site: 4 of 4 points beat predicting zero; the loss falls with data")
    assert "PCA-70 on the same subsets goes from 0.400 to 0.250" in text
