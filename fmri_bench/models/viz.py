"""Figures of the MAE on the flat map: the patch grid and masking, reconstructions, loss curves.

In: tensors from ``MaskedAutoencoderViT`` (a clip, its brain mask, ``reconstruct`` output) or the
records of ``fmri_bench.rundir.read_metrics``. Out: matplotlib Figures (no pyplot state, so they
work under any backend, e.g. Agg in tests and papermill).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure


def _show(ax, img, mask, title, vmax=3.0, cmap="RdBu_r"):
    img = np.where(np.asarray(mask, dtype=bool), np.asarray(img, dtype=float), np.nan)
    ax.imshow(img, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_masking(model, clip: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                 frame: int = 0) -> Figure:
    """One frame of a clip, its patch grid with the brain patches, and one random masking draw.

    clip: (1, T, H, W) or (C, T, H, W); mask: (H, W) bool.
    """
    cfg = model.config
    p, (t, h, w) = cfg.patch_size, cfg.grid_size
    imgs, m = model.check_inputs(clip[None].float(), mask)
    brain = model.brain_patches(m)[0, : h * w].reshape(h, w).cpu().numpy()
    _, _, visible = model(imgs, m, generator=generator)
    vis = visible[0].reshape(t, h, w)[frame // cfg.t_patch_size].cpu().numpy()
    x = imgs[0, 0, frame].cpu().numpy()
    mask_np = m[0].cpu().numpy()

    fig = Figure(figsize=(12, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    _show(axes[0], x, mask_np, f"frame {frame} on the flat map ({cfg.img_size[0]} x {cfg.img_size[1]})")
    _show(axes[1], x, mask_np, f"{h} x {w} patches of {p} x {p} px: {int(brain.sum())} hold brain")
    shade = np.kron(~brain, np.ones((p, p)))
    axes[1].imshow(np.where(shade > 0, 0.5, np.nan), cmap="gray", vmin=0, vmax=1, alpha=0.6)
    for i in range(1, h):
        axes[1].axhline(i * p - 0.5, color="k", lw=0.3)
    for j in range(1, w):
        axes[1].axvline(j * p - 0.5, color="k", lw=0.3)
    _show(axes[2], x * np.kron(vis, np.ones((p, p))), mask_np,
          f"visible to the encoder: {int(visible[0].sum())} of {cfg.num_patches} tokens "
          f"(mask ratio {cfg.mask_ratio})")
    return fig


def plot_reconstruction(rec: dict, mask: torch.Tensor, index: int = 0, frames: tuple[int, ...] = (0,),
                        title: str | None = None) -> Figure:
    """Input / masked input / prediction for predicted frame(s) ``frames`` of clip ``index``.

    rec: ``MaskedAutoencoderViT.reconstruct`` output; mask: (H, W) bool.
    """
    mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask, dtype=bool)
    fig = Figure(figsize=(12, 2.6 * len(frames) + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(frames), 3))
    for row, f in zip(axes, frames):
        for ax, key, name in zip(row, ("target", "masked_input", "pred"), ("input", "masked", "prediction")):
            _show(ax, rec[key][index, 0, f].float().cpu().numpy(), mask, f"{name} (predicted frame {f})")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_losses(records: list[dict], title: str | None = None) -> Figure:
    """Train loss and validation losses (in-distribution, out-of-distribution) against step."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    for key, label in (("val_loss", "val (same site)"), ("val_ood_loss", "val (second site, OOD)")):
        recs = [r for r in records if key in r]
        if recs:
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], "o-", label=label, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE")
    ax.legend()
    if title:
        ax.set_title(title)
    return fig
