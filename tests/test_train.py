"""Pretraining: config files and errors, schedule, exact resume, run-directory guard, gloo DDP."""

import json
import os
import socket

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fmri_bench.errors import InputError
from fmri_bench.models.mae import MaskedAutoencoderViT, from_pretrained, preset_config
from fmri_bench.rundir import read_metrics
from fmri_bench.train import TrainConfig, load_config, lr_at, param_groups, train

SMALL_MODEL = dict(img_size=[32, 64], num_frames=4, patch_size=8, t_patch_size=2, embed_dim=32, depth=1,
                   num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**kw) -> TrainConfig:
    d = dict(model_overrides=SMALL_MODEL, data={"synthetic": True, "val_batches": 1}, batch_size=4, steps=6,
             warmup_steps=2, log_every=1, eval_every=3, ckpt_every=3, progress=False, figures=False)
    return TrainConfig.from_dict({**d, **kw})


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def write_shards(out, n_runs=4, T=8, shape=(32, 64)):
    from fmri_bench.shards import ShardWriter

    rng = np.random.default_rng(0)
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 3:-3] = True
    with ShardWriter(out, shard_size=2) as sink:
        for i in range(n_runs):
            bold = rng.standard_normal((T, int(mask.sum()))).astype(np.float16)
            sink.write(f"sub-{i}", bold, mask, {"tr": 1.0})
    return str(out)


def test_config_file_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("batch_size: 8\ndata:\n  synthetic: true\nmodel_overrides:\n  depth: 2\n")
    cfg = load_config(path, ["steps=7", "data.downsample=2", "model_overrides.embed_dim=96", "betas=[0.8, 0.9]"])
    assert (cfg.batch_size, cfg.steps, cfg.data.downsample, cfg.betas) == (8, 7, 2, (0.8, 0.9))
    assert cfg.model_overrides == {"depth": 2, "embed_dim": 96}
    assert cfg.lr == pytest.approx(1e-3 * 8 / 256)
    with pytest.raises(InputError, match=r"unknown train config key 'step'.*did you mean 'steps'"):
        load_config(path, ["step=3"])
    with pytest.raises(InputError, match=r"unknown data config key 'trian_urls'.*'train_urls'"):
        load_config(path, ["data.trian_urls=[a.tar]"])
    with pytest.raises(InputError, match="unknown MAE config key 'depht'"):
        load_config(path, ["model_overrides.depht=3"])
    (tmp_path / "bad.yaml").write_text("lr: 0.1\n")
    with pytest.raises(InputError, match="bad.yaml: unknown train config key 'lr'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="not key=value"):
        load_config(None, ["steps"])


def test_schedule_and_weight_decay_groups():
    cfg = TrainConfig(batch_size=256, steps=110, warmup_steps=10, base_lr=1e-3)
    assert [lr_at(cfg, s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(cfg, 10) == pytest.approx(1e-3) and lr_at(cfg, 60) == pytest.approx(5e-4)
    assert lr_at(cfg, 109) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 99 / 100)))
    model = MaskedAutoencoderViT(preset_config("mae_vit_tiny", **SMALL_MODEL))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "pos_embed_spatial", "decoder_pos_embed_temporal",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= skipped
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert "patch_embed.weight" not in skipped and no_decay["weight_decay"] == 0.0


def test_resume_is_exact(tmp_path):
    full = train(small_cfg(figures=True), tmp_path / "full")
    assert (tmp_path / "full" / "figures" / "recon_000003.png").exists()
    assert full["val_loss"] is not None and full["val_ood_loss"] is not None
    # killed at step 4: the checkpoint of step 3 survives, step 4 is lost and recomputed
    part = train(small_cfg(), tmp_path / "part", stop_at=4)
    assert part["step"] == 4
    rest = train(small_cfg(), tmp_path / "part", resume=True)
    assert rest["step"] == 6
    recs = read_metrics(tmp_path / "part")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(recs) == pytest.approx(losses(full["history"]), rel=1e-6, abs=1e-7)
    assert rest["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    a, b = from_pretrained(tmp_path / "full" / "model.pt"), from_pretrained(tmp_path / "part" / "model.pt")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_early_stopping_ends_the_run_and_a_resume_trains_no_further(tmp_path):
    """min_delta 10 is never reached: the run stops after patience + 1 evaluations, writes its
    model there, and resuming it changes nothing."""
    cfg = small_cfg(steps=40, eval_every=2, ckpt_every=10, early_stop_patience=2, early_stop_min_delta=10.0)
    out = train(cfg, tmp_path / "run")
    assert out["stopped_early"] and out["step"] == 6
    assert [r["step"] for r in out["history"] if r.get("early_stop")] == [6]
    assert (tmp_path / "run" / "model.pt").is_file()
    again = train(cfg, tmp_path / "run", resume=True)
    assert again["step"] == 6 and again["stopped_early"]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, 7))
    # without early stopping the same run goes on
    assert train(small_cfg(steps=8, eval_every=2), None)["step"] == 8


def test_early_stopped_counts_evaluations_without_a_new_best():
    from fmri_bench.train import early_stopped

    hist = [{"val_loss": v} for v in (1.0, 0.9, 0.95, 0.92)]
    assert early_stopped(hist, 2) and not early_stopped(hist, 3) and not early_stopped(hist, 0)
    assert not early_stopped(hist + [{"val_loss": 0.89}], 2)
    assert early_stopped(hist + [{"val_loss": 0.89}], 2, min_delta=0.05)
    with pytest.raises(InputError, match="needs eval_every"):
        small_cfg(eval_every=0, early_stop_patience=2)


def test_resume_is_exact_on_shards_across_epochs(tmp_path):
    urls = [write_shards(tmp_path / "shards")]  # 4 runs x 8 clips = 8 batches of 4 per epoch
    cfg = small_cfg(data={"train_urls": urls, "val_urls": urls, "val_batches": 1}, steps=11, ckpt_every=5,
                    eval_every=0)
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part", stop_at=7)
    train(cfg, tmp_path / "part", resume=True)
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert ckpt["train"]["data"] == [{"epoch": 1, "position": 3}]
    assert losses(read_metrics(tmp_path / "part")) == pytest.approx(losses(full["history"]), rel=1e-6)


def test_run_dir_refuses_a_different_config(tmp_path):
    train(small_cfg(steps=3), tmp_path / "run")
    with pytest.raises(InputError, match=r"different config \(base_lr: 0.001 -> 0.002\)"):
        train(small_cfg(steps=3, base_lr=2e-3), tmp_path / "run", resume=True)
    with pytest.raises(InputError, match="already holds a checkpoint: pass --resume"):
        train(small_cfg(steps=3), tmp_path / "run")
    # operational keys (logging, figures, checkpoint period) may change on resume
    out = train(small_cfg(steps=3, log_every=2, figures=True), tmp_path / "run", resume=True)
    assert out["step"] == 3


def test_clip_of_the_wrong_shape_is_a_clear_error(tmp_path):
    urls = [write_shards(tmp_path / "shards", shape=(32, 64))]
    small = {**SMALL_MODEL, "img_size": [16, 32]}
    with pytest.raises(InputError, match=r"clip 'sub-\d' \(after data.downsample=1\).*expects.*data.downsample"):
        train(small_cfg(model_overrides=small, data={"train_urls": urls}, steps=1))
    out = train(small_cfg(model_overrides=small, data={"train_urls": urls, "downsample": 2}, steps=1))
    assert np.isfinite(out["train_loss"])
    odd = [write_shards(tmp_path / "odd", shape=(30, 64))]
    with pytest.raises(InputError, match=r"training shards: .*flat map 30 x 64 is not divisible by downsample=4"):
        train(small_cfg(model_overrides=small, data={"train_urls": odd, "downsample": 4}, steps=1))
    with pytest.raises(InputError, match="no training data"):
        train(small_cfg(data={}, steps=1))


def _ddp_worker(rank, world, port, cfg_dict, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    result = train(TrainConfig.from_dict(cfg_dict))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result["history"], f)


@pytest.mark.slow  # two fresh interpreters import torch and DDP: seconds on a quiet machine
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    cfg = small_cfg(steps=4, eval_every=2)
    single = train(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, port, cfg.to_dict(), str(out)), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    assert losses(ddp) == pytest.approx(losses(single["history"]), rel=1e-5)
    val = [r["val_loss"] for r in ddp if "val_loss" in r]
    assert val == pytest.approx([r["val_loss"] for r in single["history"] if "val_loss" in r], rel=1e-5)


def test_cli_pretrain(tmp_path, capsys):
    from fmri_bench.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(small_cfg(steps=2).to_dict()))  # JSON is YAML
    assert main(["pretrain", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    assert "step 2: train loss" in capsys.readouterr().out
    assert from_pretrained(tmp_path / "run" / "model.pt").config.embed_dim == 32
    assert main(["pretrain", "--config", str(path), "stepz=3", "--run-dir", str(tmp_path / "x")]) == 2
    assert "unknown train config key 'stepz'" in capsys.readouterr().err
