"""How fast does the tiny MAE leave the predict-zero plateau? A short, seeded sweep of the settings
a CPU run can afford (learning rate, patch grid, mask ratio, position embedding), in memory.

Why it exists: on the synthetic book cohort the tiny MAE's masked-patch loss stays at the
predict-zero loss for hundreds of steps (chapter 02), while PCA-20 fitted on the training
subjects is ~18 % lower. This sweep separates the model and its optimisation from the data
pipeline: it reads ``--clips`` training clips and ``--val-clips`` validation clips once (pooled
2 x 2 as ``configs/pretrain_tiny_cpu.yaml``), then trains each variant on them with AdamW (0.9,
0.95), weight decay 0.05, gradient clipping 1.0, linear warm-up and cosine decay, the same
optimiser as ``fmri_bench.train``. Every variant sees the same clips, batches and mask draws
(seeded); validation uses one fixed mask draw and reports predict-zero on the very same hidden
pixels beside the model.

A variant is ``key=value,key=value``: ``lr`` (the peak learning rate itself, not base_lr),
``steps``, any ``MAEConfig`` field (``patch_size``, ``mask_ratio``, ...) and ``pos=sincos``
(fixed 2-D sin-cos position embeddings in encoder and decoder instead of the learned separable
ones, an option of the upstream code).

    python benchmarks/sweep_mae.py --shards DATA/pretrain_shards/book-seed0 \
        --variant lr=1e-3,steps=1000 --variant lr=1e-3,steps=1600,patch_size=14

Default shards: the smoke cohort's (built if missing). The last line is machine-readable JSON:
one record per variant with its validation loss, predict-zero and seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from fmri_bench.clips import ClipDataset
from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config
from fmri_bench.train import param_groups, warmup_cosine

MODEL_KEYS = {"patch_size": int, "t_patch_size": int, "mask_ratio": float, "depth": int, "embed_dim": int,
              "decoder_depth": int, "decoder_embed_dim": int}


def read_clips(root: str, split: str, n: int, seed: int, downsample: int = 2):
    """n clips of 16 frames from the shards under root/split -> bold (n, 1, 16, H, W), mask (n, H, W)."""
    ds = ClipDataset(f"{root}/{split}", clip_len=16, mode="random", oversample=4.0, seed=seed, shuffle=True,
                     downsample=downsample, buffer_size=512)
    clips = list(itertools.islice(iter(ds), n))
    if not clips:
        raise SystemExit(f"{root}/{split}: no clips")
    return torch.stack([c["bold"] for c in clips]), torch.stack([c["mask"] for c in clips])


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of an h x w grid (half the width for rows, half for columns) -> (1, h*w, dim)."""
    def axis(n, d):
        freq = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        angle = np.arange(n)[:, None] * freq[None]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    rows, cols = axis(h, dim // 2), axis(w, dim // 2)
    grid = np.concatenate([np.repeat(rows, w, axis=0), np.tile(cols, (h, 1))], axis=1)
    return torch.tensor(grid, dtype=torch.float32)[None]


def build(variant: dict, seed: int) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(preset_config("mae_vit_tiny", **{k: MODEL_KEYS[k](v) for k, v in variant.items()
                                                                  if k in MODEL_KEYS}))
    if variant.get("pos") == "sincos":
        _, h, w = model.config.grid_size
        for spatial, temporal in ((model.pos_embed_spatial, model.pos_embed_temporal),
                                  (model.decoder_pos_embed_spatial, model.decoder_pos_embed_temporal)):
            spatial.data = sincos_2d(h, w, spatial.shape[-1])
            temporal.data.zero_()
            spatial.requires_grad_(False)
            temporal.requires_grad_(False)
    return model


@torch.no_grad()
def validate(model, bold, mask, seed: int) -> tuple[float, float]:
    """(model loss, predict-zero loss) on the same clips, hidden pixels and mask draw."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    loss_sum = zero_sum = 0.0
    for i in range(0, len(bold), 32):
        x, m = bold[i:i + 32], mask[i:i + 32]
        loss, _, visible = model(x, m, noise=model.draw_noise(len(x), gen))
        x, m = model.check_inputs(x, m)
        ids, valid = model.hidden_brain_ids(model.brain_patches(m), visible)
        zeros = torch.zeros(len(x), ids.shape[1], model.decoder_pred.out_features)
        loss_sum += float(loss) * len(x)
        zero_sum += float(model.decoded_loss(x, m, zeros, ids, valid)) * len(x)
    model.train()
    return loss_sum / len(bold), zero_sum / len(bold)


def run(variant: dict, train, val, batch: int, seed: int, evals: int) -> dict:
    model = build(variant, seed)
    lr, steps = float(variant.get("lr", 1e-3)), int(variant.get("steps", 300))
    warmup = max(1, steps // 10)
    groups = [g for g in param_groups(model, 0.05) if g["params"]]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(lr, step - 1, warmup, steps)
        idx = torch.randint(0, len(train[0]), (batch,), generator=gen)
        loss, _, _ = model(train[0][idx], train[1][idx], generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // evals) == 0 or step == steps:
            v, z = validate(model, *val, seed + 1)
            curve.append({"step": step, "val": round(v, 5), "zero": round(z, 5)})
            print(f"  {variant}: step {step} train {float(loss.detach()):.4f} val {v:.4f} "
                  f"predict-zero {z:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"variant": variant, "val": curve[-1]["val"], "zero": curve[-1]["zero"],
            "seconds": round(time.perf_counter() - t0, 1), "curve": curve}


def parse_variant(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in MODEL_KEYS and key not in ("lr", "steps", "pos"):
            raise SystemExit(f"--variant {text!r}: unknown key {key!r}")
        out[key] = value
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="folder with train/ and val/ shards (default: the smoke cohort's)")
    ap.add_argument("--variant", action="append", default=[], help="key=value,... (repeat)")
    ap.add_argument("--clips", type=int, default=2048)
    ap.add_argument("--val-clips", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--evals", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.shards
    if root is None:
        from pathlib import Path

        from fmri_bench.harness import cohort_shards
        from fmri_bench.synth import ensure_cohort
        root = str(Path(cohort_shards(ensure_cohort("smoke", seed=0), seed=0)["train"]).parent)
    train = read_clips(root, "train", args.clips, args.seed)
    val = read_clips(root, "val", args.val_clips, args.seed + 1)
    print(f"{len(train[0])} training clips, {len(val[0])} validation clips from {root}", flush=True)
    results = [run(parse_variant(v), train, val, args.batch, args.seed, args.evals)
               for v in (args.variant or ["lr=1e-3,steps=300"])]
    print(json.dumps([{k: r[k] for k in ("variant", "val", "zero", "seconds")} for r in results]))


if __name__ == "__main__":
    main()
