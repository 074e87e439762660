"""Pretraining of the flat-map MAE: ``train(cfg) -> metrics``, the loop behind ``fmri-bench pretrain``.

In: a ``TrainConfig`` (YAML + ``key=value`` overrides; an unknown key is an error) naming a model
preset and flat-map shards (``fmri_bench.shards.ClipDataset``) for training, in-distribution
validation (held-out subjects, same site) and out-of-distribution validation (a second site),
or ``data.synthetic=true`` for in-memory clips (tests, benchmarks).
Out, in the run directory: ``config.yaml``, ``metrics.jsonl`` (train loss, lr, clips/s; val
losses), ``checkpoint.pt`` (written atomically every ``ckpt_every`` steps), ``model.pt`` (the
final model, ``from_pretrained`` reads it) and ``figures/recon_<step>.png``.

Optimisation follows the paper (arXiv 2510.13768) and MAE: AdamW (0.9, 0.95), weight decay 0.05
except biases / norms / tokens / position embeddings, lr = base_lr x batch / 256, linear warm-up
then cosine to 0, gradient clipping at 1.0, bf16 autocast on CUDA. ``batch_size`` is global:
under ``torchrun`` each of the W ranks (DDP: NCCL on GPUs, gloo on CPU) takes batch_size / W.
Resuming is exact: the checkpoint holds the model, optimiser, scaler, every RNG state and each
rank's data position (epoch, batches consumed); the clip streams are deterministic given
(seed, epoch), so the consumed batches are replayed and skipped.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fmri_bench import distributed
from fmri_bench.config import read_config, warmup_cosine
from fmri_bench.errors import InputError
from fmri_bench.grid import downsample
from fmri_bench.models.mae import (
    CHECKPOINT_FORMAT, MaskedAutoencoderViT, check_format, check_keys, check_values, load_checkpoint, preset_config,
)
from fmri_bench.paths import atomic_save
from fmri_bench.rundir import RunDir, read_metrics, rng_state, set_rng_state
from fmri_bench.streams import ShardStream, SyntheticClips, SyntheticStream, val_batches

# keys that change how a run is observed, not what it computes: they may differ on --resume
OPERATIONAL_KEYS = ("log_every", "eval_every", "ckpt_every", "progress", "figures", "compile", "num_threads")


# --- config ----------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where clips come from. URLs: shard paths, directories, globs or brace patterns."""

    train_urls: list[str] = field(default_factory=list)
    val_urls: list[str] = field(default_factory=list)  # held-out subjects, same site
    val_ood_urls: list[str] = field(default_factory=list)  # second site (out of distribution)
    synthetic: bool = False  # SyntheticClips instead of shards (site 0 train / val, site 1 OOD)
    downsample: int = 1  # average-pool the flat map by this factor (tiny reads 224 x 560 at 2)
    oversample: float = 4.0  # random clips per run = oversample x frames / clip length (paper: 4)
    shuffle_buffer: int = 256
    val_batches: int = 4  # batches of each validation set per evaluation


@dataclass
class TrainConfig:
    """Pretraining settings; defaults run the tiny model on a CPU."""

    model: str = "mae_vit_tiny"
    model_overrides: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 16  # global, over all ranks
    steps: int = 500
    base_lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16 / fp16
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    num_threads: int = 0  # torch CPU threads (0: leave torch's default)
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 100
    # early stopping: stop once this many evaluations in a row bring no val_loss below the best so
    # far by more than early_stop_min_delta (0: train all the steps); the best loss is kept
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    progress: bool = True
    figures: bool = True  # reconstruction figure at every evaluation

    def __post_init__(self):
        if isinstance(self.data, dict):
            check_keys(self.data, DataConfig, what="data config")
            self.data = DataConfig(**self.data)
        if not isinstance(self.data, DataConfig):
            raise InputError(f"data must be a section (a mapping of data settings), got {self.data!r}")
        if not isinstance(self.model_overrides, dict):
            raise InputError(f"model_overrides must be a mapping, got {self.model_overrides!r}")
        check_values(self.data, {"downsample": 1, "oversample": 0, "shuffle_buffer": 1, "val_batches": 1},
                     "data config", exclusive=("oversample",))
        check_values(self, {"batch_size": 1, "steps": 1, "base_lr": 0, "warmup_steps": 0, "weight_decay": 0,
                            "grad_clip": 0, "num_workers": 0, "num_threads": 0, "log_every": 1, "eval_every": 0,
                            "ckpt_every": 0, "early_stop_patience": 0, "early_stop_min_delta": 0},
                     "train config", exclusive=("base_lr", "grad_clip"))
        if self.early_stop_patience and not self.eval_every:
            raise InputError("bad train config: early_stop_patience needs eval_every > 0 (it counts evaluations)")
        try:
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            betas = ()
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise InputError(f"bad train config: betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")

    @property
    def lr(self) -> float:
        """Peak learning rate: base_lr x global batch / 256 (MAE's linear scaling rule)."""
        return self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "TrainConfig":
        check_keys(d, cls, source, what="train config")
        if isinstance(d.get("data"), dict):
            check_keys(d["data"], DataConfig, source, what="data config")
        try:
            return cls(**d)
        except InputError as err:
            raise InputError(err.problem, err.path or source) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or defaults) + ``key=value`` overrides (dotted keys, YAML values) -> TrainConfig.

    ``model_overrides.depth=2``, ``data.train_urls=[a.tar,b.tar]``, ``batch_size=64``.
    """
    d = read_config(path, overrides)
    cfg = TrainConfig.from_dict(d, None if path is None else os.fspath(path))
    preset_config(cfg.model, **cfg.model_overrides)  # fail now on a bad model key, not mid-run
    return cfg


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine to 0."""
    return warmup_cosine(cfg.lr, step, cfg.warmup_steps, cfg.steps)


def param_groups(model: MaskedAutoencoderViT, weight_decay: float) -> list[dict]:
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if n not in skip]
    no_decay = [p for n, p in model.named_parameters() if n in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: MaskedAutoencoderViT, batches: list[dict], seed: int, ds: int, device, amp_dtype) -> float:
    """Mean masked-patch MSE over fixed batches, with a fixed masking draw (comparable over steps)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for batch in batches:
        bold, mask = downsample(batch["bold"], batch["mask"], ds)
        noise = model.draw_noise(bold.shape[0], gen)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _, _ = model(bold.to(device), mask.to(device), noise=noise.to(device))
        total += float(loss) * bold.shape[0]
        n += bold.shape[0]
    model.train()
    return total / max(n, 1)


def _recon_figure(model, batch, ds, seed, device, path: Path, step: int) -> None:
    from fmri_bench.models.viz import plot_reconstruction

    bold, mask = downsample(batch["bold"][:1], batch["mask"][:1], ds)
    model.eval()
    rec = model.reconstruct(bold.to(device), mask.to(device), torch.Generator(device=device).manual_seed(seed))
    model.train()
    fig = plot_reconstruction(rec, mask[0], title=f"step {step}  masked-patch MSE {float(rec['loss']):.3f}")
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=80), path)


def _pooled(batch: dict, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return downsample(batch["bold"], batch["mask"], factor)
    except ValueError as err:
        raise InputError(f"{err} (data.downsample)") from None


def train_stream(cfg: TrainConfig, mcfg, dd: distributed.Distributed):
    """This rank's endless stream of training batches (shards, or in-memory synthetic clips)."""
    ds = cfg.data.downsample
    if cfg.data.synthetic:
        src = SyntheticClips((mcfg.img_size[0] * ds, mcfg.img_size[1] * ds), mcfg.num_frames, cfg.seed, site=0)
        return SyntheticStream(src, cfg.batch_size, dd.rank, dd.world)
    if not cfg.data.train_urls:
        raise InputError("no training data: set data.train_urls (shards) or data.synthetic=true")
    return ShardStream(cfg.data.train_urls, mcfg.num_frames, cfg.batch_size // dd.world, cfg.seed, dd.rank,
                       dd.world, cfg.num_workers, cfg.data.oversample, cfg.data.shuffle_buffer, ds)


def early_stopped(history: list[dict], patience: int, min_delta: float = 0.0) -> bool:
    """True once the last ``patience`` evaluations of ``history`` brought no val_loss below the
    best before them by more than ``min_delta`` (patience 0: never)."""
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    if not patience or len(vals) <= patience:
        return False
    best_before = min(vals[:-patience])
    return min(vals[-patience:]) > best_before - min_delta


def train(cfg: TrainConfig, run_dir: str | os.PathLike | None = None, resume: bool = False,
          stop_at: int | None = None) -> dict:
    """Pretrain ``cfg.model`` for ``cfg.steps`` updates -> metrics dict.

    run_dir: where config, metrics, checkpoints and figures go (None: nothing is written).
    resume: continue from ``run_dir/checkpoint.pt`` (exactly; fresh start when there is none).
    stop_at: stop after this step as if killed (tests, time-boxed runs); the run resumes later.
    With ``cfg.early_stop_patience`` the run ends early (``early_stopped``): the stop is logged
    (``{"step", "early_stop": True}``), the checkpoint and model.pt are written at that step, and
    a resumed stopped run trains no further.
    Returns {"step", "train_loss" (mean of the last log window), "val_loss", "val_ood_loss",
    "clips_per_s", "history" (the train and eval records), "stopped_early"}.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dd = distributed.setup(cfg.device)
    if cfg.batch_size % dd.world:
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by the {dd.world} ranks")
    device, b_local = dd.device, cfg.batch_size // dd.world
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(
        cfg.precision, torch.bfloat16 if device.type == "cuda" else None)
    autocast = dict(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    # model, optimiser, data
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = MaskedAutoencoderViT(preset_config(cfg.model, **cfg.model_overrides)).to(device)
    mcfg = model.config
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=True)  # one pass over the parameters (CPU and CUDA)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same draws on every rank: one global batch
    stream = train_stream(cfg, mcfg, dd)
    # shard clips come pooled from ClipDataset(downsample=...); synthetic batches are pooled here
    batch_ds = cfg.data.downsample if cfg.data.synthetic else 1

    # run directory and resume
    run = RunDir(run_dir, cfg.to_dict(), resume, OPERATIONAL_KEYS) if run_dir is not None and dd.main else None
    resume_from = dd.broadcast(None if run is None or run.resume_from is None else str(run.resume_from))
    step, history = 0, []
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        if not isinstance(ckpt, dict) or not {"train", "state_dict"} <= set(ckpt):
            raise InputError("not a training checkpoint written by pretrain (no training state)", resume_from)
        check_format(ckpt, resume_from)
        state = ckpt["train"]
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], mask_gen)
        if len(state["data"]) != dd.world:
            raise InputError(f"checkpoint was written by {len(state['data'])} ranks, this run has {dd.world}: "
                             "resume with the same number of processes", resume_from)
        stream.load_state_dict(state["data"][dd.rank])
        step = int(state["step"])
        if run is not None:
            history = [r for r in read_metrics(run.path) if r["step"] <= step]
    if run is not None:
        run.restart_metrics(history)

    def log(record: dict) -> None:
        history.append(record)
        if run is not None:
            run.log(record)

    val = {k: val_batches(cfg, k, mcfg) for k in ("val", "val_ood")} if dd.main else {}
    net = model
    if dd.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and dd.main), desc="pretrain",
               dynamic_ncols=True)
    window_loss, window_n, t0, clips_s = torch.zeros((), device=device), 0, time.perf_counter(), float("nan")
    stopped = bool(dd.broadcast(any(r.get("early_stop") for r in history)))  # history lives on rank 0
    model.train()
    while step < cfg.steps and not stopped:
        # one update
        batch = next(stream)
        bold, mask = _pooled(batch, batch_ds)
        try:
            model.check_inputs(bold[:1], mask[:1])
        except InputError as err:
            raise InputError(f"clip {batch['key'][0]!r} (after data.downsample={cfg.data.downsample}): "
                             f"{err.problem}; set model_overrides.img_size / num_frames or data.downsample "
                             "to match the data") from None
        noise = model.draw_noise(cfg.batch_size, mask_gen)[dd.rank * b_local:(dd.rank + 1) * b_local]
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(**autocast):
            loss, _, _ = net(bold.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                             noise=noise.to(device))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += loss.detach().float()
        window_n += 1
        bar.update(1)

        # log, evaluate, checkpoint
        if step % cfg.log_every == 0 or step == cfg.steps:
            train_loss = float(dd.mean(window_loss)) / window_n
            clips_s = window_n * cfg.batch_size / (time.perf_counter() - t0)
            if dd.main:
                log({"step": step, "loss": train_loss, "lr": lr, "clips_s": clips_s})
                bar.set_postfix(loss=f"{train_loss:.4f}", clips_s=f"{clips_s:.1f}")
            window_loss.zero_()
            window_n, t0 = 0, time.perf_counter()
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            if dd.main:
                log({"step": step, **{f"{name}_loss": evaluate(model, batches, cfg.seed + 2, batch_ds, device, amp_dtype)
                                      for name, batches in val.items() if batches}})
                if run is not None and cfg.figures:
                    _recon_figure(model, val["val"][0] if val.get("val") else batch, batch_ds, cfg.seed + 3, device,
                                  run.path / "figures" / f"recon_{step:06d}.png", step)
                if early_stopped(history, cfg.early_stop_patience, cfg.early_stop_min_delta):
                    log({"step": step, "early_stop": True})
            stopped = bool(dd.broadcast(any(r.get("early_stop") for r in history) if dd.main else None))
            dd.barrier()
            t0 = time.perf_counter()
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or stopped:
            data_states = dd.gather(stream.state_dict())
            if run is not None:
                run.save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "config": mcfg.to_dict(), "state_dict": model.state_dict(),
                    "train": {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                              "rng": rng_state(mask_gen), "data": data_states, "train_config": cfg.to_dict()}})
        if stop_at is not None and step >= stop_at:
            break
    bar.close()
    if run is not None and (step == cfg.steps or stopped):
        model.save_pretrained(run.path / "model.pt")
    dd.close()

    train_recs = [r for r in history if "loss" in r]
    evals = [r for r in history if "val_loss" in r or "val_ood_loss" in r]
    return {"step": step, "train_loss": train_recs[-1]["loss"] if train_recs else None,
            "val_loss": evals[-1].get("val_loss") if evals else None,
            "val_ood_loss": evals[-1].get("val_ood_loss") if evals else None,
            "clips_per_s": clips_s, "history": history, "stopped_early": stopped}


def tiny_config(shards: dict, steps: int, batch_size: int = 8, base_lr: float = 1e-2, seed: int = 0,
                val_batches: int = 2, **operational) -> TrainConfig:
    """The tiny MAE on a cohort's ``{"train", "val", "val_ood"}`` shards (``harness.cohort_shards``),
    pooled 2 x 2 to 112 x 280, warm-up over the first 10 % of the steps. On the learning rate see
    ``pretrained_model``. ``operational``: any of
    ``OPERATIONAL_KEYS`` (how the run is observed; defaults: log 20, evaluate and checkpoint 5
    times, no progress bar)."""
    bad = sorted(set(operational) - set(OPERATIONAL_KEYS))
    if bad:
        raise InputError(f"tiny_config: {bad} are not operational settings ({', '.join(OPERATIONAL_KEYS)})")
    return TrainConfig.from_dict(dict(
        model="mae_vit_tiny", seed=seed, batch_size=batch_size, steps=steps, base_lr=base_lr,
        warmup_steps=max(1, steps // 10),
        **{"eval_every": max(1, steps // 5), "ckpt_every": max(1, steps // 5), "log_every": max(1, steps // 20),
           "progress": False, **operational},
        data=dict(train_urls=[shards["train"]], val_urls=[shards["val"]],
                  val_ood_urls=[shards["val_ood"]], downsample=2, val_batches=val_batches)))


# published figures behind the paper-run budget (arXiv 2510.13768 and MedARC-AI/fmri-fm): ~77.8k
# brain pixels on upstream's 1.2 mm grid, 625k steps at batch 32 on one H100
UPSTREAM_MASK_PIXELS = 77_800
H100_BF16_FLOPS = 989e12  # dense bf16 peak


def paper_budget(model: str = "mae_vit_base", steps: int = 625_000, batch_size: int = 32,
                 mask_pixels: int = UPSTREAM_MASK_PIXELS, peak_flops: float = H100_BF16_FLOPS,
                 utilisation: float = 0.4) -> list[dict]:
    """What the paper's pretraining run costs: FLOPs (training ~ 3x the analytic forward), GPU
    hours at ``utilisation`` of ``peak_flops``, the loader rate it needs and the bytes it reads
    (float16 brain pixels). -> rows {what, value}."""
    from fmri_bench.models.mae import forward_flops

    cfg = preset_config(model)
    train_flop = 3 * forward_flops(cfg)  # per clip
    clips = batch_size * steps
    rate = peak_flops * utilisation
    return [dict(what="ViT-B train GFLOP per clip", value=round(train_flop / 1e9, 1)),
            dict(what="paper run: clips seen (M)", value=clips / 1e6),
            dict(what="paper run: EFLOP", value=round(train_flop * clips / 1e18, 2)),
            dict(what=f"H100 hours of compute at {utilisation:.0%} of bf16 peak",
                 value=round(train_flop * clips / rate / 3600, 1)),
            dict(what="clips/s the loader must feed at that rate", value=round(rate / train_flop)),
            dict(what="data read as float16 (TB)", value=round(clips * cfg.num_frames * mask_pixels * 2 / 1e12, 1))]


def pretrained_model(cohort, steps: int = 300, batch_size: int = 8, seed: int = 0,
                     out=None, base_lr: float = 1e-2, **operational) -> Path:
    """The tiny MAE pretrained on a cohort's training subjects (``harness.cohort_shards``),
    trained once per (cohort and its fingerprint, steps, batch, base_lr, seed) and cached under
    ``paths.data_dir() / "models"``; resumes an interrupted run. -> path of ``model.pt``; its run
    directory (``config.yaml``, ``metrics.jsonl``, figures) is the file's folder.

    ``operational``: ``OPERATIONAL_KEYS`` settings (figures, eval_every, ...) for the run when it is
    trained here; they do not change the weights, so they are not part of the cache key (a cached
    model is returned whatever they are). Every run evaluates on 4 validation batches.

    The book trains it at batch 16, base_lr 1.6e-2 (lr = base_lr x batch / 256 = 1e-3), 2000
    steps. Upstream's ViT-B runs base_lr 1e-3 at batch 32 (lr 1.25e-4, MedARC-AI/fmri-fm
    flat_mae defaults) for 625k steps. The default base_lr 1e-2 here is for short test runs. The
    sweep behind lr 1e-3 (the tiny model leaves the predict-zero plateau only after ~500-750
    steps, 3e-3 later): configs/pretrain_tiny_cpu.yaml and benchmarks/sweep_mae.py.
    """
    from fmri_bench.harness.datasets import cohort_fingerprint, cohort_shards
    from fmri_bench.paths import data_dir

    cohort = Path(cohort)
    stamp = cohort_fingerprint(cohort)[:10]  # a regenerated cohort gets a new model
    fmt = CHECKPOINT_FORMAT.rsplit("/", 1)[-1]  # and so does a new checkpoint format
    run = Path(out) if out else (data_dir() / "models"
                                 / f"{cohort.name}-{stamp}-tiny{fmt}-s{steps}-b{batch_size}-lr{base_lr:g}-seed{seed}")
    if (run / "model.pt").is_file():
        return run / "model.pt"
    cfg = tiny_config(cohort_shards(cohort, seed=seed), steps=steps, batch_size=batch_size, base_lr=base_lr,
                      seed=seed, val_batches=4, **{"figures": False, **operational})
    train(cfg, run, resume=True)
    return run / "model.pt"
