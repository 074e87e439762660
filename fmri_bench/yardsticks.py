"""Yardsticks for the MAE's masked-patch loss: what trivial, simple and all-knowing predictors score
on the very clips and mask draws of the model's validation loss.

In: a pretraining ``TrainConfig`` (its validation shards, batch size, seed and model preset), a
trained model (optional) and, for a synthetic cohort, its directory (``fmri_bench.synth``).
Out: a ``YardstickReport``: per validation split ("val": held-out subjects of the training site,
"val_ood": the second site) and predictor, the loss of every clip, the mean with a bootstrap
95 % CI over clips, and how much of each yardstick's gain over predicting zero the model has
captured; ``rows()`` for ``book.save_results``, ``draw_yardsticks`` for the loss-curve figure.

The loss is the one the MAE optimises (``MaskedAutoencoderViT.forward_loss``): squared error
over the brain pixels of the hidden tokens on the predicted frames (every ``t_pred_stride``-th
frame), divided by that pixel count per clip, then averaged over clips. The clips are
``streams.val_batches(cfg, ...)`` and the masks are drawn as ``train.evaluate`` draws them
(``draw_noise`` from a generator seeded ``cfg.seed + 2``, one draw per batch), so every number
here is comparable with the ``val_loss`` the training run logs.

Predictors (each fills in the hidden pixels of the predicted frames):
- ``predict zero``: 0 everywhere; the loss is the mean square of the hidden brain pixels.
- ``PCA-k``: a spatial PCA of single frames fitted on the TRAINING runs only (every frame of
  every training run, per-frame z-scored and clipped at +-3 and pooled to the model's grid
  exactly as the clips are; at most ``max_fit_frames`` frames, a seeded uniform subsample
  beyond that), brain pixels only, centred on the training mean frame. For a held-out clip
  and its mask draw, each predicted frame gets its k coefficients by ordinary least squares
  on its visible brain pixels (minimum-norm solution if fewer visible pixels than k), and the
  hidden pixels are read off the reconstruction ``mean + coefficients @ components``. The
  subjects of the fit are recorded and a validation clip of one of them is an error.
  An earlier measurement on the book cohort (synthetic), with a PCA fitted on 12 subjects and
  tested on 4, gave 0.444 (k=20) and 0.248 (k=70); here the fit uses every training subject of
  the pretraining split (at most ``max_fit_frames`` frames of whole runs, not 16-frame clips)
  and the test clips and masks are the MAE's validation ones, so the numbers need not agree.
- the oracles, synthetic cohorts only. The generator's own parts of the run, taken through
  the data's pipeline: every linear step splits the data into a part and the rest, and the
  oracle keeps its part; the scale factors are the data's. In order: the part's share of the
  data in scanner units (baseline x part / 100) centred over the run and divided by the data's
  vertex SD over time (the vertex z-score), resampled to TR 1 s like the data (anti-alias
  low-pass, then PCHIP, which is not linear: applied to the part alone), rasterised onto the
  flat map, centred per frame on its own mean over the brain pixels and divided by the data
  frame's SD (the per-frame z-score), clipped at +-3, pooled to the model's grid. Two parts:
  ``oracle: clean signal`` is the noise-free signal (network sources + task responses,
  ``Synthesizer.run_data(return_signal=True)``), the loss of knowing the neural truth and
  nothing else; it is not a floor, since the generator's structured noise (physiological,
  drift, spikes) lies on smooth maps shared by all subjects and a model can learn part of it.
  ``oracle: all but thermal noise`` adds that structured noise: only the vertex-wise thermal
  noise is unknown to it, so it is close to the floor of any predictor (not exactly: pooling
  and interpolation correlate neighbouring pixels' thermal noise a little). The regenerated
  data are checked against the shards' clips: a cohort that no longer regenerates (another
  generator version or profile) is an error, never a quietly wrong oracle. Real data have no
  oracle: it is absent (``None``), never estimated.
- ``MAE``: the model's own loss per clip (its forward pass, one clip at a time, same draws).

Captured fraction of a reference R: ``(L_zero - L_model) / (L_zero - L_R)``: 0 = no better than
predicting zero, 1 = as good as R, above 1 = better than R. Its CI resamples clips (paired).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fmri_bench.errors import InputError
from fmri_bench.results import bootstrap_ci

ZERO, MODEL = "predict zero", "MAE"
ORACLES = {"clean": "oracle: clean signal", "structured": "oracle: all but thermal noise"}
SPLITS = {"val": "val, same site (held-out subjects)", "val_ood": "val, second site (OOD)"}
VAL_MASK_SEED_OFFSET = 2  # train.train evaluates with masks drawn from seed cfg.seed + 2


def pca_name(k: int) -> str:
    return f"PCA-{k}"


@dataclass
class YardstickConfig:
    """Settings of the yardsticks; the defaults run on a CPU in seconds for the tiny model."""

    pca_k: tuple[int, ...] = (20, 70)
    max_fit_frames: int = 2000  # training frames for the PCA fit (seeded subsample beyond)
    n_boot: int = 1000  # bootstrap resamples of the clips
    level: float = 0.95
    seed: int = 0  # PCA solver, frame subsample and bootstrap

    def __post_init__(self):
        from fmri_bench.models.mae import check_values

        ks = self.pca_k if isinstance(self.pca_k, (list, tuple)) else [self.pca_k]
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
            raise InputError(f"bad yardstick config: pca_k must be whole numbers >= 1, got {self.pca_k!r}")
        self.pca_k = tuple(sorted(set(int(k) for k in ks)))
        check_values(self, {"max_fit_frames": 2, "n_boot": 0, "seed": 0}, "yardstick config")
        if not 0 < self.level < 1:
            raise InputError(f"bad yardstick config: level must be in (0, 1), got {self.level!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "YardstickConfig":
        from fmri_bench.models.mae import check_keys

        check_keys(d, cls, what="yardstick config")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pca_k"] = list(self.pca_k)
        return d


# --- the loss and the masks ------------------------------------------------------------------
def clip_losses(model, imgs: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Per-clip masked-patch loss of ``forward_loss`` (its mean over clips is that loss).

    imgs: (N, C, T, H, W) zeroed outside the brain (``check_inputs``), pred: images of the
    predicted frames (N, C, T / t_pred_stride, H, W), visible: (N, L) bool, mask: (N, H, W) bool
    -> (N,) float64.
    """
    return Scorer(model, imgs, visible, mask)(pred)


class Scorer:
    """``clip_losses`` for many predictions of one batch: the target frames and the per-pixel
    weight (brain x hidden, ``loss_weight``) are made once, as images of the predicted frames."""

    def __init__(self, model, imgs: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor):
        u = model.config.t_pred_patch_size
        self.target = model.unpatchify(model.pred_target(imgs), u).float()  # (N, C, T', H, W)
        self.weight = model.unpatchify(model.loss_weight(mask, visible), u).float()
        self.count = self.weight.sum(dim=(1, 2, 3, 4)).double().clamp_min(1.0)

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        if pred.shape != self.target.shape:
            raise InputError(f"prediction of shape {tuple(pred.shape)}, the predicted frames are "
                             f"{tuple(self.target.shape)}")
        err = (pred.float() - self.target).pow_(2).mul_(self.weight)
        return err.sum(dim=(1, 2, 3, 4), dtype=torch.float64) / self.count


def visible_mask(model, imgs: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The tokens the encoder sees for this noise: imgs (N, C, T, H, W), mask (N, H, W), noise from
    ``draw_noise`` -> visible (N, L) bool (``random_masking`` at the model's mask ratio)."""
    return model.random_masking(model.brain_patches(mask), model.config.mask_ratio, noise=noise)[0]


def visible_pixels(model, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """visible: (N, L) bool, mask: (N, H, W) -> (N, C, T / t_pred_stride, H, W) bool: brain pixels of
    visible tokens on the predicted frames (what a predictor may read)."""
    cfg = model.config
    N = mask.shape[0]
    brain = mask[:, None, None].expand(N, cfg.in_chans, cfg.num_frames, *cfg.img_size).float()
    shown = model.pred_target(brain) * visible.unsqueeze(-1).float()
    return model.unpatchify(shown, cfg.t_pred_patch_size) > 0.5


def predicted_frames(model, imgs: torch.Tensor) -> torch.Tensor:
    """imgs: (N, C, T, H, W) -> the frames the decoder predicts, (N, C, T / t_pred_stride, H, W)."""
    return imgs[:, :, ::model.config.t_pred_stride]


# --- PCA on the training frames --------------------------------------------------------------
@dataclass
class PixelPCA:
    """A spatial PCA of single frames. mean (P,), components (K, P) orthonormal rows, over the
    brain pixels (row-major order) of ``mask`` (H, W)."""

    mean: np.ndarray
    components: np.ndarray
    mask: np.ndarray
    subjects: tuple[str, ...] = ()
    n_frames: int = 0
    explained: np.ndarray = field(default_factory=lambda: np.zeros(0))  # variance ratio per component

    @property
    def k_max(self) -> int:
        return len(self.components)

    def predict(self, frames: np.ndarray, visible: np.ndarray, k: int) -> np.ndarray:
        """frames (F, P), visible (F, P) bool -> (F, P) float32: per frame, the k coefficients that
        fit its visible pixels best (least squares), then mean + coefficients @ components.
        k above ``k_max`` uses ``k_max``."""
        return fill_from_visible(frames, visible, self.components[:min(k, self.k_max)], self.mean)


def fill_from_visible(frames: np.ndarray, visible: np.ndarray, basis: np.ndarray,
                      mean: np.ndarray | None = None) -> np.ndarray:
    """Least-squares fill-in: frames (F, P), visible (F, P) bool, basis (K, P), mean (P,) or None
    -> (F, P) float32 = mean + c @ basis, c = argmin ||(mean + c @ basis - frame)[visible]||
    per frame (minimum-norm c when the visible pixels do not determine it). Frames with the
    same visible pixels are solved together; a frame with none visible gets the mean."""
    from threadpoolctl import threadpool_limits

    frames, visible = np.asarray(frames, np.float64), np.asarray(visible, bool)
    basis = np.asarray(basis, np.float64)
    mean = np.zeros(frames.shape[-1]) if mean is None else np.asarray(mean, np.float64)
    if frames.shape != visible.shape or basis.ndim != 2 or frames.shape[-1] != basis.shape[1] != len(mean):
        raise InputError(f"fill-in on {basis.shape[-1]} pixels: got frames {frames.shape}, "
                         f"visible {visible.shape}, basis {basis.shape}")
    out = np.empty(frames.shape, np.float32)
    groups: dict[bytes, list[int]] = {}
    for i, v in enumerate(visible):
        groups.setdefault(np.packbits(v).tobytes(), []).append(i)
    with threadpool_limits(1):  # small solves: threads only contend
        for rows in groups.values():
            v = visible[rows[0]]
            if not v.any():
                out[rows] = mean
                continue
            coef = np.linalg.lstsq(basis[:, v].T, (frames[rows][:, v] - mean[v]).T, rcond=None)[0]  # (K, r)
            out[rows] = mean + (basis.T @ coef).T
    return out


def fit_pca(frames: np.ndarray, k: int, mask, seed: int = 0, subjects=()) -> PixelPCA:
    """frames (F, P) float -> PixelPCA of min(k, F - 1, P) components: the top right singular
    vectors of the centred frames (scikit-learn's ``randomized_svd``, 4 power iterations,
    seeded; exact for data of rank <= k)."""
    from sklearn.utils.extmath import randomized_svd
    from threadpoolctl import threadpool_limits

    frames = np.asarray(frames, np.float32)
    F, P = frames.shape
    mask = np.asarray(mask, bool)
    if int(mask.sum()) != P:
        raise InputError(f"PCA frames have {P} pixels, the mask {int(mask.sum())}")
    if F < 2:
        raise InputError(f"a PCA needs at least 2 training frames, got {F}")
    k = int(min(k, F - 1, P))
    mean = frames.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = frames - mean
    with threadpool_limits(1):  # on a shared CPU one thread beats two (measured: 1.7 s vs 3.8 s)
        _, s, vt = randomized_svd(centred, k, n_oversamples=10, n_iter=4, random_state=seed)
    total = float(np.einsum("fp,fp->", centred, centred, dtype=np.float64))
    explained = (s.astype(np.float64) ** 2 / total if total > 0 else np.zeros(k)).astype(np.float32)
    return PixelPCA(mean, vt.astype(np.float32), mask, tuple(sorted(set(subjects))), F, explained)


def training_frames(cfg, model_cfg, max_frames: int, seed: int = 0):
    """Every frame the training clips are cut from, as the clips read them: -> (frames (F, P)
    float32 on the model's (pooled) grid, mask (H, W) bool, subjects of the runs used).

    Shards (``cfg.data.train_urls``): per-frame z-score over the brain pixels, clip +-3
    (``clips.clip_frames``), pool by ``data.downsample``; beyond ``max_frames`` frames a seeded
    uniform subsample (without replacement) is kept. ``data.synthetic``: frames of the
    in-memory training clips (site 0), pooled as ``train`` pools them; no subjects.
    """
    from fmri_bench.clips import clip_frames
    from fmri_bench.grid import downsample, grid_of

    ds = cfg.data.downsample
    T, (H, W) = model_cfg.num_frames, model_cfg.img_size
    if cfg.data.synthetic:
        from fmri_bench.streams import SyntheticClips

        src = SyntheticClips((H * ds, W * ds), T, cfg.seed, site=0)
        batch = src.batch(range(max(1, -(-max_frames // T))))
        bold, mask = downsample(batch["bold"], batch["mask"], ds)
        m = mask[0].numpy()
        frames = bold[:, 0].reshape(-1, H * W)[:, torch.from_numpy(m.ravel())].numpy()
        return frames[:max_frames], m, ()
    if not cfg.data.train_urls:
        raise InputError("the PCA yardstick needs training data: data.train_urls (shards) or data.synthetic")
    from fmri_bench.harness.datasets import scan_runs
    from fmri_bench.shards import iter_samples

    runs = scan_runs(cfg.data.train_urls)
    subject_of = {r.key: r.subject for r in runs}
    total = sum(r.n_frames for r in runs)
    chosen = None
    if total > max_frames:
        picks = np.sort(np.random.default_rng((seed, 11)).choice(total, max_frames, replace=False))
        chosen, offset = {}, 0
        for r in runs:
            chosen[r.key] = picks[(picks >= offset) & (picks < offset + r.n_frames)] - offset
            offset += r.n_frames
    out, subjects, mask = [], set(), None
    for sample in iter_samples(cfg.data.train_urls):
        rows = np.arange(len(sample["bold"])) if chosen is None else chosen.get(sample["key"], [])
        if len(rows) == 0:
            continue
        grid = grid_of(sample["mask"])
        coarse = grid.coarse(ds)
        if mask is None:
            mask = coarse.mask.numpy()
        elif not np.array_equal(mask, coarse.mask.numpy()):
            raise InputError("training runs lie on different flat-map grids: one PCA needs one grid",
                             sample.get("url"))
        x = clip_frames(np.asarray(sample["bold"])[rows], 0, len(rows))  # per-frame: rows are independent
        out.append(grid.pool(x, ds).numpy())
        subjects.add(subject_of[sample["key"]])
    if not out:
        raise InputError(f"no training frames in {cfg.data.train_urls}")
    return np.concatenate(out), mask, tuple(sorted(subjects))


# --- the oracle ------------------------------------------------------------------------------
class CohortOracle:
    """What the generator of a simulated cohort knows about each run, in the clips' units (see the
    module): ``clean`` = network sources + task responses (``run_data``'s noise-free signal),
    ``structured`` = clean + the structured noise (physiological, drift, spikes on their smooth
    maps): everything but the vertex-wise thermal noise.

    ``clip(key, start, clip_len, downsample, part, data)`` -> (1, clip_len, H / f, W / f); ``data``,
    the clip as the loader gave it, must match the regenerated data.
    """

    PARTS = ("clean", "structured")

    def __init__(self, cohort_dir):
        from fmri_bench.convert import sample_key
        from fmri_bench.flatmap import FlatMapper
        from fmri_bench.synth import get_profile, load_ground_truth
        from fmri_bench.synth.generate import GENERATOR_VERSION, Synthesizer

        self.cohort = Path(cohort_dir)
        gt, _ = load_ground_truth(self.cohort)
        if gt.get("generator_version") != GENERATOR_VERSION:
            raise InputError(f"cohort of generator {gt.get('generator_version')!r}, this code regenerates "
                             f"{GENERATOR_VERSION!r}: simulate it again for an oracle", self.cohort)
        stored = gt.get("profile_config") or {}
        profile = get_profile(stored.get("name", gt["profile"]), stored.get("n_subjects"))
        if json.loads(json.dumps(dataclasses.asdict(profile), default=str)) != stored:
            raise InputError(f"the cohort's profile differs from today's {profile.name!r} profile: "
                             "its runs cannot be regenerated for an oracle", self.cohort)
        self.synth = Synthesizer(profile, seed=int(gt["seed"]))
        specs = {(s.subject, s.name): s for s in self.synth.runs}
        self.specs = {}
        for rec in gt["runs"]:
            key = rec.get("shard_key") or sample_key(self.cohort / rec["path"])
            self.specs[key] = specs[(rec["subject"], rec["run"])]
        self.mapper = FlatMapper("fs_LR_32k")
        self._runs: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        # pooled clips, kept: a scaling sweep asks for the same validation clips at every point
        self._clips: dict[tuple, dict[str, torch.Tensor]] = {}

    def run(self, key: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(data (T', P) float16 as stored in the shards, {part: (T', P) float32}) of one run."""
        if key not in self._runs:
            from fmri_bench.io import Run
            from fmri_bench.preprocess import preprocess_run, resample_tr

            from fmri_bench.convert import readable_key

            spec = self.specs.get(key) or self.specs.get(readable_key(key))
            if spec is None:
                raise InputError(f"run {key!r} is not a run of this cohort", self.cohort)
            sy = self.synth
            data, signal = sy.run_data(spec, return_signal=True)
            if not sy.profile.stream:
                data = np.rint(data)  # the CIFTI holds int16 scanner units (synth.writer)
            # the parts again, from the generator the run was drawn with (run_data's first draws)
            parts = sy.run_components(spec, np.random.default_rng(np.random.SeedSequence((sy.seed,) + spec.seed_key)))
            clean = sum(x @ m for name, (x, m) in parts.items() if name != "noise")
            if not np.allclose(clean, signal, atol=1e-5):
                raise InputError(f"run {key!r}: the generator's parts no longer add up to its signal", self.cohort)
            bold, tr_out = preprocess_run(Run(data=data, space="fs_LR_32k", tr=spec.tr, source=key),
                                          self.mapper, tr=1.0)
            sd = data.std(axis=0, dtype=np.float64)
            # data = baseline x (1 + pct / 100): a part's share of the vertex-z-scored data is
            # (baseline / 100) x (part - its run mean) / SD(data)
            scale = np.divide(sy.baseline / 100.0, sd, out=np.zeros_like(sd), where=sd > 0)
            out = {}
            for name, x in (("clean", clean), ("structured", clean + parts["noise"][0] @ parts["noise"][1])):
                share = ((x - x.mean(axis=0, dtype=np.float64)) * scale).astype(np.float32)
                out[name] = self.mapper.to_pixels(resample_tr(share, spec.tr, tr_out)).astype(np.float32)
            if len(self._runs) >= 4:  # keep a few runs: clips come in run order
                self._runs.pop(next(iter(self._runs)))
            self._runs[key] = (bold, out)
        return self._runs[key]

    def clip(self, key: str, start: int, clip_len: int, downsample: int, part: str = "clean",
             data: torch.Tensor | None = None, clip: float = 3.0) -> torch.Tensor:
        from fmri_bench.clips import clip_frames, clip_image
        from fmri_bench.grid import grid_of

        if part not in self.PARTS:
            raise InputError(f"oracle part must be one of {self.PARTS}, got {part!r}")
        where = (key, int(start), int(clip_len), int(downsample), float(clip))
        if where not in self._clips:
            bold, parts = self.run(key)
            grid = grid_of(self.mapper.mask)
            x = np.asarray(bold[start:start + clip_len], np.float32)
            sd = np.sqrt(((x - x.mean(1, keepdims=True)) ** 2).mean(1, keepdims=True)).clip(1e-6)
            self._clips[where] = {"data": clip_image(clip_frames(bold, start, clip_len, clip), grid, downsample)[0]}
            for name in self.PARTS:
                s = parts[name][start:start + clip_len]
                o = np.clip((s - s.mean(1, keepdims=True)) / sd, -clip, clip).astype(np.float32)
                self._clips[where][name] = clip_image(torch.from_numpy(o), grid, downsample)[0]
        got = self._clips[where]
        if data is not None:
            if got["data"].shape != data.shape or float((got["data"] - data.float()).abs().max()) > 1e-3:
                raise InputError(f"clip {key}@{start}: the regenerated data differ from the shards' "
                                 "(changed generator or preprocessing?): no oracle for them", self.cohort)
        return got[part].clone()


# --- the report ------------------------------------------------------------------------------
@dataclass
class YardstickReport:
    """Per split, per predictor: the loss of every clip (same clips and masks for all)."""

    losses: dict[str, dict[str, np.ndarray]]  # split -> predictor -> (N,) per-clip losses
    clips: dict[str, list[str]]  # split -> "key@start" of each clip
    config: YardstickConfig
    source: str = "synthetic"  # or "real"
    fit: dict = field(default_factory=dict)  # the PCA fit: subjects, frames, k used
    notes: list[str] = field(default_factory=list)

    def predictors(self, split: str) -> list[str]:
        return list(self.losses.get(split, {}))

    def loss(self, split: str, name: str) -> tuple[float, float, float] | None:
        """(mean, CI low, CI high) over clips, or None when the predictor is absent (the oracle on
        real data)."""
        v = self.losses.get(split, {}).get(name)
        if v is None:
            return None
        c = self.config
        return bootstrap_ci(v, n_boot=c.n_boot, seed=c.seed, level=c.level)

    def captured(self, split: str, reference: str, model_loss: float | None = None):
        """(zero - model) / (zero - reference) -> (estimate, CI low, CI high), CI over clips (paired).

        model_loss: the model's mean loss when its per-clip losses are not in the report (a
        scaling point's best validation loss): the estimate only, CI NaN.
        """
        d = self.losses.get(split, {})
        if reference not in d or ZERO not in d:
            return None
        if model_loss is not None:
            zero, ref = float(d[ZERO].mean()), float(d[reference].mean())
            return (zero - model_loss) / (zero - ref), math.nan, math.nan
        if MODEL not in d:
            return None
        rows = np.stack([d[ZERO], d[MODEL], d[reference]], axis=1)
        c = self.config

        def frac(r):
            z, m, ref = r.mean(axis=0)
            return (z - m) / (z - ref)

        return bootstrap_ci(rows, frac, n_boot=c.n_boot, seed=c.seed, level=c.level)

    def rows(self) -> list[dict]:
        """One table row per split and predictor; MAE captures: (zero - MAE) / (zero - this row)."""
        out = []
        for split, preds in self.losses.items():
            for name in preds:
                m, lo, hi = self.loss(split, name)
                row = {"split": SPLITS.get(split, split), "predictor": name, "source": self.source,
                       "loss": round(m, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                       "clips": len(preds[name])}
                cap = self.captured(split, name) if name not in (ZERO, MODEL) else None
                row.update({"MAE captured": None if cap is None else round(cap[0], 3),
                            "captured_low": None if cap is None else round(cap[1], 3),
                            "captured_high": None if cap is None else round(cap[2], 3)})
                out.append(row)
        return out

    def summary(self) -> dict:
        """split -> predictor -> mean loss (plain numbers for a results JSON)."""
        return {s: {n: round(float(v.mean()), 4) for n, v in d.items()} for s, d in self.losses.items()}

    def to_dict(self) -> dict:
        return {"source": self.source, "config": self.config.to_dict(), "fit": self.fit, "notes": self.notes,
                "clips": self.clips, "losses": {s: {n: [float(x) for x in v] for n, v in d.items()}
                                                for s, d in self.losses.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "YardstickReport":
        return cls({s: {n: np.asarray(v, float) for n, v in p.items()} for s, p in d["losses"].items()},
                   d["clips"], YardstickConfig.from_dict(d["config"]), d["source"], d["fit"], d["notes"])


# --- computing them --------------------------------------------------------------------------
def yardsticks(cfg, model=None, cohort=None, config: YardstickConfig | None = None,
               pca: PixelPCA | None = None, oracle: CohortOracle | None = None,
               source: str | None = None, batches: dict | None = None) -> YardstickReport:
    """Every yardstick on the validation clips of pretraining config ``cfg`` (a ``TrainConfig``).

    model: a trained ``MaskedAutoencoderViT`` (adds its per-clip loss as ``MAE``); None: only
    its config (``cfg.model`` + ``model_overrides``) is used, for the masks. cohort: a simulated
    cohort directory, or an existing ``oracle``: adds the oracle; None: no oracle. pca: a fitted
    ``PixelPCA`` to reuse (else fitted on ``cfg``'s training data). source: "synthetic" or
    "real" (default: synthetic when a cohort or ``data.synthetic`` is given, else real).
    batches: a dict to keep the validation batches in, shared by calls whose configs read the
    same validation clips (a scaling sweep's points); None: read them here.
    """
    from fmri_bench.grid import downsample
    from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config
    from fmri_bench.streams import val_batches

    config = config or YardstickConfig()
    was_training = model is not None and model.training
    if model is None:
        model = MaskedAutoencoderViT(preset_config(cfg.model, **cfg.model_overrides))  # for its masks
        trained = None
    else:
        trained = model.eval()
        device = next(trained.parameters()).device
    mcfg = model.config
    if oracle is None and cohort is not None:
        oracle = CohortOracle(cohort)
    if source is None:
        source = "synthetic" if (oracle is not None or cfg.data.synthetic) else "real"
    if source not in ("synthetic", "real"):
        raise InputError(f"source must be 'synthetic' or 'real', got {source!r}")
    notes = []
    if pca is None:
        frames, grid_mask, subjects = training_frames(cfg, mcfg, config.max_fit_frames, config.seed)
        pca = fit_pca(frames, max(config.pca_k), grid_mask, config.seed, subjects)
    if pca.k_max < max(config.pca_k):
        notes.append(f"PCA: {pca.n_frames} training frames allow {pca.k_max} components; "
                     f"PCA-k above that uses {pca.k_max}")
    fit = {"subjects": list(pca.subjects), "frames": pca.n_frames, "k_max": pca.k_max,
           "k_used": {pca_name(k): min(k, pca.k_max) for k in config.pca_k},
           "explained_variance": {pca_name(k): round(float(pca.explained[:k].sum()), 4) for k in config.pca_k}}
    batch_ds = cfg.data.downsample if cfg.data.synthetic else 1  # shard clips come pooled (as train)
    P_mask = torch.from_numpy(pca.mask)
    flat = torch.from_numpy(np.flatnonzero(pca.mask.ravel()))

    losses, clip_ids = {}, {}
    for split in ("val", "val_ood"):
        if batches is None:
            split_batches = val_batches(cfg, split, mcfg)
        else:
            urls = cfg.data.val_urls if split == "val" else cfg.data.val_ood_urls
            where = json.dumps([split, urls, cfg.data.synthetic, cfg.data.val_batches, cfg.data.downsample,
                                cfg.batch_size, cfg.seed, mcfg.num_frames, list(mcfg.img_size)])
            if where not in batches:
                batches[where] = val_batches(cfg, split, mcfg)
            split_batches = batches[where]
        if not split_batches:
            continue
        held_out = _subjects_of(cfg, split)
        overlap = sorted(set(held_out.values()) & set(pca.subjects))
        if overlap:
            raise InputError(f"{split} subjects {overlap} are also PCA training subjects: a held-out "
                             "yardstick must not see them")
        gen = torch.Generator().manual_seed(cfg.seed + VAL_MASK_SEED_OFFSET)
        per: dict[str, list] = {}
        ids = []
        for batch in split_batches:
            bold, mask = downsample(batch["bold"], batch["mask"], batch_ds)
            noise = model.draw_noise(bold.shape[0], gen)  # the draw train.evaluate makes
            imgs, mask = model.check_inputs(bold, mask)
            if not torch.equal(mask, P_mask.expand_as(mask)):
                raise InputError(f"{split} clips and the PCA's training frames lie on different grids")
            visible = visible_mask(model, imgs, mask, noise)
            target = predicted_frames(model, imgs)  # (N, C, T', H, W)
            shown = visible_pixels(model, visible, mask)
            N, C, Tp, H, W = target.shape
            score = Scorer(model, imgs, visible, mask)
            per.setdefault(ZERO, []).append(score(torch.zeros_like(target)))
            x = target.reshape(N * C * Tp, H * W)[:, flat].numpy()
            v = shown.reshape(N * C * Tp, H * W)[:, flat].numpy()
            for k in config.pca_k:
                pred = torch.zeros(N * C * Tp, H * W)
                pred[:, flat] = torch.from_numpy(pca.predict(x, v, k))
                per.setdefault(pca_name(k), []).append(score(pred.view_as(target)))
            if oracle is not None:
                if "start" not in batch:
                    raise InputError("the oracle needs shard clips (key and start of each clip)")
                for j, (part, name) in enumerate(ORACLES.items()):  # the data are checked once per clip
                    clean = torch.stack([oracle.clip(key, int(start), mcfg.num_frames, cfg.data.downsample, part,
                                                     None if j else b)
                                         for key, start, b in zip(batch["key"], batch["start"], bold)])
                    clean, _ = model.check_inputs(clean, mask)
                    per.setdefault(name, []).append(score(predicted_frames(model, clean)))
            if trained is not None:
                with torch.no_grad():
                    per.setdefault(MODEL, []).append(torch.tensor(
                        [float(trained(bold[i:i + 1].to(device), mask[i:i + 1].to(device),
                                       noise=noise[i:i + 1].to(device))[0]) for i in range(N)],
                        dtype=torch.float64))
            starts = batch.get("start", [None] * N)
            ids += [f"{k}@{int(s)}" if s is not None else str(k) for k, s in zip(batch["key"], starts)]
        losses[split] = {name: torch.cat(v).numpy() for name, v in per.items()}
        clip_ids[split] = ids
    if was_training:
        trained.train()
    if oracle is None:
        notes.append("no oracle: " + ("real data have no ground truth" if source == "real"
                                      else "no cohort given"))
    return YardstickReport(losses, clip_ids, config, source, fit, notes)


def _subjects_of(cfg, split: str) -> dict[str, str]:
    """Run key -> subject of a validation split's shards ({} for in-memory synthetic clips)."""
    if cfg.data.synthetic:
        return {}
    from fmri_bench.harness.datasets import scan_runs

    urls = cfg.data.val_urls if split == "val" else cfg.data.val_ood_urls
    return {r.key: r.subject for r in scan_runs(urls)}


def _ci(lo: float, hi: float, fmt: str = "{:.3f}") -> str:
    return "CI n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def verdict(report: YardstickReport, split: str, reference: str) -> str | None:
    """What the MAE's captured share of ``reference``'s gain says, read from its 95 % CI."""
    cap = report.captured(split, reference)
    if cap is None:
        return None
    est, lo, hi = cap
    pct = f"{100 * est:.0f} % {_ci(100 * lo, 100 * hi, '{:.0f}')}"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"captures {pct} of {reference}'s gain over predicting zero (too few clips for an interval)"
    if hi < 0:
        return f"is worse than predicting zero ({pct} of {reference}'s gain)"
    if lo > 1:
        return f"beats {reference} ({pct} of its gain over predicting zero)"
    if lo <= 0:
        return f"is not distinguishable from predicting zero ({pct} of {reference}'s gain)"
    if hi >= 1:
        return f"is not distinguishable from {reference} ({pct} of its gain over predicting zero)"
    return f"captures {pct} of {reference}'s gain over predicting zero"


def describe(report: YardstickReport, split: str = "val") -> str:
    """The split's losses with their CIs, then a verdict per reference (0 % = predicting zero,
    100 % = the reference), e.g. for a chapter's text cell."""
    d = report.losses.get(split)
    if not d:
        return f"{split}: no clips"
    what = "synthetic cohort" if report.source == "synthetic" else "real data"
    parts = []
    for name in d:
        m, lo, hi = report.loss(split, name)
        parts.append(f"{name} {m:.3f} {_ci(lo, hi)}")
    text = f"{SPLITS.get(split, split)} ({what}, {len(d[ZERO])} clips, 95 % CI over clips): " + "; ".join(parts) + "."
    if MODEL in d:
        c = report.config
        g, lo, hi = bootstrap_ci(np.stack([d[ZERO], d[MODEL]], axis=1), lambda r: r[:, 0].mean() - r[:, 1].mean(),
                                 n_boot=c.n_boot, seed=c.seed, level=c.level)
        gain = f"zero - MAE = {g:.3f} {_ci(lo, hi)}"
        if math.isfinite(hi) and hi < 0:
            text += f" The MAE is worse than predicting zero ({gain})."
        elif math.isfinite(lo) and lo <= 0:
            text += f" The MAE is not distinguishable from predicting zero ({gain})."
        else:
            said = [v for name in d if name not in (ZERO, MODEL) and (v := verdict(report, split, name))]
            text += " The MAE " + "; it ".join(said) + "."
    if not any(name.startswith("oracle") for name in d):
        text += " No oracle: " + ("real data have no ground truth." if report.source == "real" else "no cohort given.")
    return text


# --- figures ---------------------------------------------------------------------------------
_STYLES = {ZERO: dict(color="0.45", ls="--"), ORACLES["clean"]: dict(color="k", ls="-."),
           ORACLES["structured"]: dict(color="k", ls=":")}
_COLOURS = ("tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:gray")


def line_style(name: str, index: int = 0) -> dict:
    """Colour and line style of a yardstick in every figure (PCA-k: the index-th colour)."""
    return dict(_STYLES.get(name) or dict(color=_COLOURS[index % len(_COLOURS)], ls=(0, (4, 1, 1, 1))))


def draw_yardsticks(ax, report: YardstickReport, split: str = "val", model: bool = False):
    """Horizontal lines at each yardstick's mean loss on ``split`` (a band for its 95 % CI)."""
    tag = " (synthetic)" if report.source == "synthetic" else ""
    for i, name in enumerate(report.predictors(split)):
        if name == MODEL and not model:
            continue
        m, lo, hi = report.loss(split, name)
        style = line_style(name, i)
        ax.axhline(m, lw=1.2, label=f"{name}{tag}: {m:.3f}", **style)
        if hi > lo:
            ax.axhspan(lo, hi, color=style["color"], alpha=0.12, lw=0)
    ax.legend(fontsize=7)
    return ax
