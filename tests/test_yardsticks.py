"""Yardsticks of the masked-patch loss on toy problems with known answers, and the generator's
oracle on the smoke cohort."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from fmri_bench import yardsticks as ys
from fmri_bench.errors import InputError
from fmri_bench.models.mae import MaskedAutoencoderViT, from_pretrained, preset_config
from fmri_bench.results import bootstrap_ci
from fmri_bench.shards import ShardWriter
from fmri_bench.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, T, RANK = 16, 32, 4, 3
TINY = {"img_size": [H, W], "num_frames": T, "patch_size": 8, "t_patch_size": 4, "t_pred_stride": 2,
        "mask_ratio": 0.5, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2}


def toy_mask() -> np.ndarray:
    mask = np.ones((H, W), bool)
    mask[:3, :5] = mask[-4:, -6:] = False  # partly empty corner patches
    return mask


def toy_maps(k: int = RANK) -> np.ndarray:
    """k orthonormal, zero-mean smooth maps over the toy mask's pixels: (k, P)."""
    rr, cc = np.nonzero(toy_mask())
    maps = [np.cos(2 * np.pi * (a * rr / H + b * cc / W) + f) for a, b, f in ((1, 0, 0.3), (0, 1, 1.1), (1, 2, 2.0))]
    m = np.stack(maps[:k])
    m -= m.mean(1, keepdims=True)
    return np.linalg.qr(m.T)[0].T


def rank_k_frames(rng, n: int) -> np.ndarray:
    """n frames exactly in the span of toy_maps, each with brain mean 0 and RMS 1 (so the loader's
    per-frame z-score leaves them as they are) -> (n, P)."""
    x = rng.normal(size=(n, RANK)) @ toy_maps()
    x /= np.sqrt((x ** 2).mean(1, keepdims=True))
    assert np.abs(x).max() < 2.9  # nothing clipped at +-3
    return x


def write_runs(out, subjects, rng, runs=2, frames=8, noise=0.0) -> str:
    mask = toy_mask()
    with ShardWriter(out, shard_size=4) as w:
        for s in subjects:
            for r in range(runs):
                x = rank_k_frames(rng, frames) + noise * rng.normal(size=(frames, int(mask.sum())))
                w.write(f"sub-{s}_rfMRI_REST{r + 1}_LR", x.astype(np.float16), mask, {"subject": s, "tr": 1.0}, [])
    return str(out)


def toy_config(tmp_path, rng, val_subjects=("3",), **kw) -> TrainConfig:
    data = {"train_urls": [write_runs(tmp_path / "train", ["1", "2"], rng)],
            "val_urls": [write_runs(tmp_path / "val", list(val_subjects), rng)],
            "val_ood_urls": [write_runs(tmp_path / "ood", ["9"], rng)], "downsample": 1, "val_batches": 2}
    return TrainConfig.from_dict({"model": "mae_vit_tiny", "model_overrides": TINY, "batch_size": 2, "steps": 2,
                                  "warmup_steps": 1, "log_every": 1, "eval_every": 1, "ckpt_every": 0,
                                  "progress": False, "figures": False, "data": data, **kw})


def hidden_mean_square(model, imgs, mask, visible) -> np.ndarray:
    """Predict-zero by hand: mean square of the predicted frames' brain pixels under hidden tokens."""
    p, s = model.config.patch_size, model.config.t_pred_stride
    x, m, vis = imgs.numpy()[:, 0, ::s], mask.numpy(), visible.numpy()
    _, h, w = model.config.grid_size
    out = []
    for i in range(len(x)):
        total, count = 0.0, 0
        for tok in range(h * w):  # one temporal token (t_patch_size = num_frames)
            if vis[i, tok]:
                continue
            r, c = divmod(tok, w)
            block = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
            brain = m[i][block]
            total += float((x[i][:, block[0], block[1]][:, brain] ** 2).sum())
            count += int(brain.sum()) * x.shape[1]
        out.append(total / count)
    return np.array(out)


# --- the loss and the fill-in --------------------------------------------------------------------
def test_clip_losses_average_to_forward_loss(rng):
    model = MaskedAutoencoderViT(preset_config("mae_vit_tiny", **TINY))
    imgs = torch.from_numpy(rng.normal(size=(3, 1, T, H, W)).astype(np.float32))
    mask = torch.from_numpy(np.stack([toy_mask()] * 3))
    imgs, mask = model.check_inputs(imgs, mask)
    with torch.no_grad():
        loss, pred, visible = model(imgs, mask, generator=torch.Generator().manual_seed(0))
    per = ys.clip_losses(model, imgs, model.unpatchify(pred, model.config.t_pred_patch_size), visible, mask)
    assert per.shape == (3,)
    assert float(per.mean()) == pytest.approx(float(loss), rel=1e-5)
    zero = ys.clip_losses(model, imgs, torch.zeros_like(ys.predicted_frames(model, imgs)), visible, mask)
    np.testing.assert_allclose(zero.numpy(), hidden_mean_square(model, imgs, mask, visible), rtol=1e-6)


def test_fill_from_visible_recovers_a_rank_k_frame(rng):
    basis = toy_maps()
    frames = 20 * rng.normal(size=(4, RANK)) @ basis + 0.5  # entries ~1, plus an offset the mean carries
    visible = rng.random(frames.shape) < 0.2
    mean = np.full(basis.shape[1], 0.5)
    np.testing.assert_allclose(ys.fill_from_visible(frames, visible, basis, mean), frames, atol=1e-5)
    # one map too few: the frame is not recovered
    assert np.abs(ys.fill_from_visible(frames, visible, basis[:2], mean) - frames).max() > 0.1
    # hidden pixels are never read: changing them changes nothing
    garbage = np.where(visible, frames, rng.normal(size=frames.shape) * 100)
    np.testing.assert_array_equal(ys.fill_from_visible(garbage, visible, basis, mean),
                                  ys.fill_from_visible(frames, visible, basis, mean))
    # no visible pixel: the mean
    np.testing.assert_allclose(ys.fill_from_visible(frames[:1], np.zeros_like(visible[:1]), basis, mean), mean[None])


def test_bootstrap_ci_of_a_mean_and_a_paired_ratio(rng):
    v = rng.normal(0.5, 0.1, 400)
    m, lo, hi = bootstrap_ci(v, n_boot=2000, seed=1)
    assert m == pytest.approx(v.mean()) and lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 0.1 / 20, rel=0.2)
    assert bootstrap_ci(v, n_boot=2000, seed=1) == (m, lo, hi)  # seeded
    rows = np.stack([np.ones(50), np.full(50, 0.6), np.full(50, 0.2)], 1) + rng.normal(0, 0.01, (50, 1))
    est, lo, hi = bootstrap_ci(rows, lambda r: (r[:, 0].mean() - r[:, 1].mean()) / (r[:, 0].mean() - r[:, 2].mean()))
    assert est == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    assert all(math.isnan(x) for x in bootstrap_ci([0.3])[1:])  # one clip: no interval


def test_config_rejects_bad_settings():
    assert ys.YardstickConfig(pca_k=[70, 20, 20]).pca_k == (20, 70)
    with pytest.raises(InputError, match="pca_k"):
        ys.YardstickConfig(pca_k=(0,))
    with pytest.raises(InputError, match="did you mean 'pca_k'"):
        ys.YardstickConfig.from_dict({"pca_kk": [20]})
    with pytest.raises(InputError, match="n_boot"):
        ys.YardstickConfig(n_boot=-1)


# --- the yardsticks on toy shards ----------------------------------------------------------------
def test_rank_k_clips_pca_is_exact_and_zero_is_the_mean_square(tmp_path, rng):
    cfg = toy_config(tmp_path, rng)
    report = ys.yardsticks(cfg, config=ys.YardstickConfig(pca_k=(1, RANK), n_boot=200), source="synthetic")
    assert set(report.losses) == {"val", "val_ood"}
    for split in report.losses:
        d = report.losses[split]
        assert len(d[ys.ZERO]) == 4  # 2 batches of 2 clips
        assert d[ys.ZERO].min() > 0.5  # the clips have RMS 1
        assert d[ys.pca_name(RANK)].max() < 1e-4  # rank-k data: PCA-k fills the hidden pixels exactly
        assert d[ys.pca_name(1)].mean() > 0.2  # one component is not enough
        assert not any(name.startswith("oracle") for name in d)  # no cohort, no oracle
    # predict-zero by hand, on the same clips and the draws train.evaluate makes
    from fmri_bench.streams import val_batches

    model = MaskedAutoencoderViT(preset_config("mae_vit_tiny", **TINY))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    by_hand = []
    for batch in val_batches(cfg, "val", model.config):
        imgs, mask = model.check_inputs(batch["bold"], batch["mask"])
        _, _, visible = model(imgs, mask, noise=model.draw_noise(len(imgs), gen))
        by_hand.append(hidden_mean_square(model, imgs, mask, visible))
    np.testing.assert_allclose(report.losses["val"][ys.ZERO], np.concatenate(by_hand), rtol=1e-6)
    # the CIs hold the estimates, and the table says what the numbers are
    for row in report.rows():
        assert row["ci_low"] <= row["loss"] <= row["ci_high"]
        assert row["source"] == "synthetic"
    assert report.fit["subjects"] == ["1", "2"] and report.fit["k_used"] == {"PCA-1": 1, "PCA-3": 3}
    assert any("no oracle" in n for n in report.notes)


def test_mae_yardstick_is_the_training_val_loss(tmp_path, rng):
    cfg = toy_config(tmp_path, rng)
    metrics = train(cfg, tmp_path / "run")
    model = from_pretrained(tmp_path / "run" / "model.pt")
    report = ys.yardsticks(cfg, model, config=ys.YardstickConfig(pca_k=(1, RANK), n_boot=100), source="synthetic")
    for split, key in (("val", "val_loss"), ("val_ood", "val_ood_loss")):
        assert float(report.losses[split][ys.MODEL].mean()) == pytest.approx(metrics[key], rel=1e-5)
    # PCA-1, not the exact PCA-3: a reference with a loss of its own
    cap = report.captured("val", ys.pca_name(1))
    d = report.losses["val"]
    want = (d[ys.ZERO].mean() - d[ys.MODEL].mean()) / (d[ys.ZERO].mean() - d[ys.pca_name(1)].mean())
    assert cap[0] == pytest.approx(want) and cap[1] <= cap[0] <= cap[2]
    row = next(r for r in report.rows() if r["split"].startswith("val, same") and r["predictor"] == "PCA-1")
    assert row["MAE captured"] == pytest.approx(round(want, 3))
    # a scaling point gives its best loss instead of per-clip losses: estimate only
    est, lo, hi = report.captured("val", ys.pca_name(1), model_loss=0.5)
    assert est == pytest.approx((d[ys.ZERO].mean() - 0.5) / (d[ys.ZERO].mean() - d[ys.pca_name(1)].mean()))
    assert math.isnan(lo) and math.isnan(hi)


def test_held_out_subjects_never_enter_the_pca_fit(tmp_path, rng):
    cfg = toy_config(tmp_path, rng)
    report = ys.yardsticks(cfg, config=ys.YardstickConfig(pca_k=(RANK,), n_boot=0), source="real")
    from fmri_bench.harness import scan_runs

    val_subjects = {r.subject for r in scan_runs(cfg.data.val_urls) + scan_runs(cfg.data.val_ood_urls)}
    assert set(report.fit["subjects"]) == {"1", "2"} and not set(report.fit["subjects"]) & val_subjects
    leaky = toy_config(tmp_path / "leak", rng, val_subjects=("2",))  # subject 2 trains and validates
    with pytest.raises(InputError, match=r"val subjects \['2'\] are also PCA training subjects"):
        ys.yardsticks(leaky, config=ys.YardstickConfig(pca_k=(RANK,), n_boot=0), source="real")


def test_a_known_oracle_scores_its_error(tmp_path, rng):
    """An oracle that returns the data clip (+ a constant c on the brain) scores c^2 exactly."""
    cfg = toy_config(tmp_path, rng)

    class Known:
        offset, seen = 0.0, {}

        def clip(self, key, start, clip_len, downsample, part, data):
            if data is not None:  # the data come with a clip's first part only (checked once)
                self.seen[key, start] = data
            return self.seen[key, start] + self.offset * torch.from_numpy(toy_mask())

    oracle = Known()
    exact = ys.yardsticks(cfg, oracle=oracle, config=ys.YardstickConfig(pca_k=(1,), n_boot=50))
    oracle.offset = 0.3
    off = ys.yardsticks(cfg, oracle=oracle, config=ys.YardstickConfig(pca_k=(1,), n_boot=50))
    for split in ("val", "val_ood"):
        for name in ys.ORACLES.values():
            assert exact.losses[split][name].max() < 1e-12
            np.testing.assert_allclose(off.losses[split][name], 0.09, rtol=1e-5)
    assert exact.source == "synthetic"


def test_real_data_have_no_oracle_row(tmp_path, rng):
    report = ys.yardsticks(toy_config(tmp_path, rng), config=ys.YardstickConfig(pca_k=(1,), n_boot=0))
    assert report.source == "real"
    assert report.loss("val", ys.ORACLES["clean"]) is None and report.captured("val", ys.ORACLES["clean"]) is None
    assert not any(r["predictor"].startswith("oracle") for r in report.rows())
    again = ys.YardstickReport.from_dict(report.to_dict())
    assert again.summary() == report.summary()


def test_draw_yardsticks_labels_every_line(tmp_path, rng):
    import matplotlib.pyplot as plt

    report = ys.yardsticks(toy_config(tmp_path, rng), config=ys.YardstickConfig(pca_k=(1, RANK), n_boot=20),
                           source="synthetic")
    fig, ax = plt.subplots()
    ys.draw_yardsticks(ax, report, "val")
    labels = [line.get_label() for line in ax.get_lines()]
    assert len(labels) == 3 and all("(synthetic)" in lab for lab in labels)
    assert labels[0].startswith("predict zero") and any(lab.startswith("PCA-3") for lab in labels)
    plt.close(fig)


# --- the generator's oracle on the smoke cohort ----------------------------------------------------
@pytest.mark.slow
def test_cohort_oracle_regenerates_the_shards_and_orders_the_yardsticks():
    from fmri_bench.harness import cohort_shards
    from fmri_bench.synth import ensure_cohort
    from fmri_bench.train import tiny_config

    cohort = ensure_cohort("smoke", seed=0)
    shards = cohort_shards(cohort, seed=0)
    cfg = tiny_config(shards, steps=4, batch_size=2, val_batches=1)
    oracle = ys.CohortOracle(cohort)
    report = ys.yardsticks(cfg, oracle=oracle, config=ys.YardstickConfig(pca_k=(20,), n_boot=100))
    assert report.source == "synthetic"
    for split in ("val", "val_ood"):
        d = {k: float(v.mean()) for k, v in report.losses[split].items()}
        # knowing everything but the thermal noise beats knowing the neural signal, which beats 0
        assert d[ys.ORACLES["structured"]] < d[ys.ORACLES["clean"]] < d[ys.ZERO]
        assert d[ys.ORACLES["structured"]] < 0.5 * d[ys.ZERO]
    # the regenerated run is the stored one; a clip that is not raises instead of a wrong oracle
    key, start = report.clips["val"][0].split("@")
    bold, parts = oracle.run(key)
    from fmri_bench.shards import iter_samples

    stored = next(s for s in iter_samples(shards["val"]) if s["key"] == key)["bold"]
    np.testing.assert_array_equal(bold, stored)
    good = oracle.clip(key, int(start), 16, 2)
    with pytest.raises(InputError, match="regenerated data differ"):
        oracle.clip(key, int(start), 16, 2, data=good + 0.1)


# --- per scaling point ---------------------------------------------------------------------------
def test_each_sweep_point_has_yardsticks_fitted_on_its_own_subset(tmp_path, rng, monkeypatch):
    from fmri_bench import scaling

    shards = {"train": write_runs(tmp_path / "train", ["1", "2", "3"], rng),
              "val": write_runs(tmp_path / "val", ["5"], rng), "val_ood": write_runs(tmp_path / "ood", ["6"], rng)}
    overrides = dict(model_overrides=TINY, steps=2, batch_size=2, warmup_steps=1, eval_every=1, log_every=1,
                     data=dict(downsample=1, val_batches=1))
    ycfg = ys.YardstickConfig(pca_k=(1, RANK), n_boot=50)
    res = scaling.run_sweep([1, 2], shards, tmp_path / "sweep", train_overrides=overrides, n_boot=10,
                            yardstick_config=ycfg)
    for p in res.points:
        assert set(p.yardsticks) == {"val", "val_ood"}
        val = p.yardsticks["val"]
        assert val["PCA-3"]["loss"] < 1e-4 < val["predict zero"]["loss"]
        want = (val["predict zero"]["loss"] - p.best_val) / (val["predict zero"]["loss"] - val["PCA-1"]["loss"])
        assert val["PCA-1"]["captured"] == pytest.approx(want, abs=2e-3)
        saved = json.loads((tmp_path / "sweep" / f"n{p.size:04d}_r0" / "result.json").read_text())
        assert saved["yardsticks"]["report"]["fit"]["subjects"] == p.items  # the point's own subjects only
    rows = res.rows()
    assert all("val PCA-1" in r and "captured of PCA-3" in r for r in rows)
    long = res.yardstick_rows()
    assert {r["predictor"] for r in long} == {"MAE (best val)", "predict zero", "PCA-1", "PCA-3"}
    n, loss = res.yardstick_arrays("val")["PCA-1"]
    assert list(n) == [p.frames for p in res.points] and len(loss) == 2
    # a finished point reads its yardsticks back; new yardstick settings compute them again
    monkeypatch.setattr("fmri_bench.yardsticks.yardsticks", lambda *a, **k: pytest.fail("recomputed"))
    again = scaling.run_sweep([1, 2], shards, tmp_path / "sweep", train_overrides=overrides, n_boot=10,
                              yardstick_config=ycfg)
    assert [p.yardsticks for p in again.points] == [p.yardsticks for p in res.points]
    monkeypatch.undo()
    from fmri_bench import streams

    reads, real_val_batches = [], streams.val_batches
    monkeypatch.setattr(streams, "val_batches", lambda *a: reads.append(a[1]) or real_val_batches(*a))
    other = scaling.run_sweep([1, 2], shards, tmp_path / "sweep", train_overrides=overrides, n_boot=10,
                              yardstick_config=ys.YardstickConfig(pca_k=(2,), n_boot=10))
    assert all(set(p.yardsticks["val"]) == {"predict zero", "PCA-2"} for p in other.points)
    assert sorted(reads) == ["val", "val_ood"]  # both points' yardsticks read the validation clips once
    assert all(p.resumed for p in other.points)  # no retraining for new yardsticks


def test_verdicts_read_the_intervals():
    def report(zero, model, ref):
        n = len(zero)
        return ys.YardstickReport({"val": {ys.ZERO: np.asarray(zero, float), ys.MODEL: np.asarray(model, float),
                                           "PCA-20": np.asarray(ref, float)}}, {"val": [str(i) for i in range(n)]},
                                  ys.YardstickConfig(n_boot=500), "synthetic")

    noise = np.random.default_rng(1).normal(0, 0.01, 40)
    zero, ref = 1 + noise, 0.4 + noise
    assert "captures 50 % [" in ys.verdict(report(zero, 0.7 + noise, ref), "val", "PCA-20")
    assert "not distinguishable from predicting zero" in ys.verdict(report(zero, zero + noise[::-1], ref), "val", "PCA-20")
    assert "beats PCA-20" in ys.verdict(report(zero, 0.2 + noise, ref), "val", "PCA-20")
    assert "worse than predicting zero" in ys.verdict(report(zero, 1.2 + noise, ref), "val", "PCA-20")
    assert "not distinguishable from PCA-20" in ys.verdict(report(zero, ref + noise[::-1], ref), "val", "PCA-20")
    text = ys.describe(report(zero, 0.7 + noise, ref), "val")
    assert text.startswith("val, same site (held-out subjects) (synthetic cohort, 40 clips")
    assert "No oracle: no cohort given." in text
    assert "The MAE captures 50 % [" in text
    worse = ys.describe(report(zero, 1.2 + noise, ref), "val")
    assert "The MAE is worse than predicting zero (zero - MAE = -0.200" in worse and "PCA-20's gain" not in worse
