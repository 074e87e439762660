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
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from fmri_bench.errors import InputError
from fmri_bench.models.mae import (
    CHECKPOINT_FORMAT,
    MaskedAutoencoderViT,
    build_model,
    check_keys,
    load_checkpoint,
    save_checkpoint,
)
from fmri_bench.paths import atomic_save

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
    progress: bool = True
    figures: bool = True  # reconstruction figure at every evaluation

    def __post_init__(self):
        if isinstance(self.data, dict):
            check_keys(self.data, DataConfig, what="data config")
            self.data = DataConfig(**self.data)
        self.betas = tuple(float(b) for b in self.betas)
        if self.batch_size < 1 or self.steps < 1:
            raise InputError(f"batch_size ({self.batch_size}) and steps ({self.steps}) must be >= 1")
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
        return cls(**d)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or defaults) + ``key=value`` overrides (dotted keys, YAML values) -> TrainConfig.

    ``model_overrides.depth=2``, ``data.train_urls=[a.tar,b.tar]``, ``batch_size=64``.
    """
    d: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise InputError("config file not found", path)
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise InputError("config file must hold a YAML mapping", path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not key=value")
        *parents, leaf = key.split(".")
        node = d
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {parent!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    cfg = TrainConfig.from_dict(d, None if path is None else os.fspath(path))
    build_model(cfg.model, **cfg.model_overrides)  # fail now on a bad model key, not mid-run
    return cfg


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine to 0."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: MaskedAutoencoderViT, weight_decay: float) -> list[dict]:
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if n not in skip]
    no_decay = [p for n, p in model.named_parameters() if n in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- data ------------------------------------------------------------------------------------
class SyntheticClips:
    """Deterministic in-memory flat-map clips for tests and benchmarks: clip ``i`` of a site is a
    function of (seed, site, i) only, so any split over ranks sees the same global batches.

    Two ellipses stand in for the hemispheres; each clip mixes ``n_networks`` fixed smooth spatial
    maps (shared by all sites) with random smooth time courses, plus noise; a site changes the
    noise level and the time scale. Frames are z-scored over the mask and clipped at +-3, like
    real clips. ``clip(i)`` -> bold (1, T, H, W) float32, mask (H, W) bool.
    """

    def __init__(self, img_size: tuple[int, int], num_frames: int, seed: int = 0, site: int = 0,
                 n_networks: int = 8):
        H, W = img_size
        self.num_frames, self.seed, self.site = num_frames, seed, site
        yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
        def ellipse(cx):
            return ((xx - cx) / 0.45) ** 2 + (yy / 0.85) ** 2 < 1

        self.mask = ellipse(-0.5) | ellipse(0.5)
        rng = np.random.default_rng((seed, 7))
        maps = []
        for _ in range(n_networks):
            m = np.zeros((H, W))
            for cx, cy, s in zip(rng.uniform(-0.9, 0.9, 3), rng.uniform(-0.8, 0.8, 3), rng.uniform(0.1, 0.3, 3)):
                m += rng.choice([-1, 1]) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s ** 2))
            maps.append(m * self.mask)
        self.maps = torch.from_numpy(np.stack(maps).reshape(n_networks, -1).astype(np.float32))  # (K, H*W)
        self.mask = torch.from_numpy(self.mask)
        self.mask_flat = self.mask.reshape(-1)
        self.noise = (0.3, 0.6)[site % 2]
        self.timescale = (4.0, 2.0)[site % 2]

    def clip(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(np.random.SeedSequence((self.seed, self.site, int(i))).generate_state(1, np.uint64)[0] >> 1)
        g = torch.Generator().manual_seed(seed)
        K, T = self.maps.shape[0], self.num_frames
        drive = torch.randn(K, 1, T + 7, generator=g)
        kernel = torch.exp(-torch.arange(8.0) / self.timescale).flip(0).view(1, 1, 8)
        courses = torch.nn.functional.conv1d(drive, kernel)[:, 0].T  # (T, K) smooth time courses
        x = courses @ self.maps + self.noise * torch.randn(T, self.maps.shape[1], generator=g)
        inside = x[:, self.mask_flat]
        x = (x - inside.mean(1, keepdim=True)) / inside.std(1, keepdim=True)
        x = x.clamp(-3, 3) * self.mask_flat
        return x.reshape(1, T, *self.mask.shape), self.mask

    def batch(self, indices) -> dict:
        clips = [self.clip(i) for i in indices]
        return {"bold": torch.stack([c[0] for c in clips]), "mask": torch.stack([c[1] for c in clips]),
                "key": [f"synthetic-site{self.site}-{i}" for i in indices]}


class SyntheticStream:
    """This rank's slice of each global batch of ``SyntheticClips``; position = batches taken."""

    def __init__(self, source: SyntheticClips, batch_size: int, rank: int = 0, world_size: int = 1,
                 offset: int = 0):
        self.source, self.B, self.rank, self.world, self.offset = source, batch_size, rank, world_size, offset
        self.epoch, self.position = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.B // self.world
        start = self.offset + self.position * self.B + self.rank * b
        self.position += 1
        return self.source.batch(range(start, start + b))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ShardStream:
    """Endless batches of random clips from this rank's shards, epoch after epoch.

    Epoch ``e`` is ``ClipDataset(..., seed, shuffle=True).set_epoch(e)``: deterministic, so the
    position (epoch, batches consumed) is enough to resume exactly (consumed batches replayed).
    """

    def __init__(self, urls: list[str], clip_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int = 0, oversample: float = 4.0, shuffle_buffer: int = 256, downsample: int = 1):
        from fmri_bench.shards import ClipDataset

        try:
            self.dataset = ClipDataset(urls, clip_len=clip_len, mode="random", oversample=oversample, seed=seed,
                                       shuffle=True, buffer_size=shuffle_buffer, rank=rank, world_size=world_size,
                                       downsample=downsample)
        except ValueError as err:
            raise InputError(f"training shards: {err}") from None
        self.batch_size, self.num_workers, self.rank = batch_size, num_workers, rank
        self.epoch, self.position = 0, 0
        self._it = None

    def __iter__(self):
        return self

    def _open(self):
        from torch.utils.data import DataLoader

        from fmri_bench.shards import collate

        self.dataset.set_epoch(self.epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate, drop_last=True)
        it = iter(loader)
        for i in range(self.position):  # replay what the checkpointed run consumed
            if next(it, None) is None:
                raise InputError(f"cannot resume: epoch {self.epoch} of rank {self.rank} now has {i} batches, "
                                 f"the checkpoint consumed {self.position} (did the shards change?)")
        return it

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._it = self._open()
            try:
                batch = next(self._it, None)
            except ValueError as err:  # a bad sample or grid, found while reading
                raise InputError(f"training shards: {err}") from None
            if batch is not None:
                self.position += 1
                return batch
            if self.position == 0:
                raise InputError(f"rank {self.rank} got no full batch of {self.batch_size} clips from its shards "
                                 f"({len(self.dataset.shards)} shards in all): add shards or lower batch_size")
            self.epoch, self.position, self._it = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


def val_batches(cfg: TrainConfig, which: str, model_cfg) -> list[dict] | None:
    """The fixed validation batches ``which`` = "val" (same site) or "val_ood" (second site)."""
    n, b = cfg.data.val_batches, cfg.batch_size
    T, (H, W), ds = model_cfg.num_frames, model_cfg.img_size, cfg.data.downsample
    if cfg.data.synthetic:
        site = 0 if which == "val" else 1
        stream = SyntheticStream(SyntheticClips((H * ds, W * ds), T, cfg.seed, site), b, offset=10 ** 9)
        return [next(stream) for _ in range(n)]
    urls = cfg.data.val_urls if which == "val" else cfg.data.val_ood_urls
    if not urls:
        return None
    from torch.utils.data import DataLoader

    from fmri_bench.shards import ClipDataset, collate

    try:
        ds_ = ClipDataset(urls, clip_len=T, mode="sequential", seed=cfg.seed, rank=0, world_size=1, downsample=ds)
    except ValueError as err:
        raise InputError(f"{which} shards: {err}") from None
    out = []
    for batch in DataLoader(ds_, batch_size=b, collate_fn=collate):
        out.append(batch)
        if len(out) == n:
            break
    return out


def downsample(bold: torch.Tensor, mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bold (N, C, T, H, W), mask (N, H, W) -> pooled by ``factor`` in space: the mean of the brain
    pixels of each block; a block is brain if any of its pixels is."""
    if factor == 1:
        return bold, mask
    N, C, T, H, W = bold.shape
    if H % factor or W % factor:
        raise InputError(f"flat map {H} x {W} is not divisible by data.downsample={factor}")
    m = mask.to(bold.dtype)[:, None, None]
    pool = torch.nn.functional.avg_pool3d
    num = pool((bold * m).reshape(N, C * T, 1, H, W), (1, factor, factor)).reshape(N, C, T, H // factor, W // factor)
    den = pool(m.reshape(N, 1, 1, H, W), (1, factor, factor)).reshape(N, 1, 1, H // factor, W // factor)
    return num / den.clamp_min(1e-6), den[:, 0, 0] > 0


# --- distributed -----------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(cfg: TrainConfig) -> _Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL with one GPU per rank, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world == 1:
        return _Dist(device=torch.device("cuda" if want_cuda else cfg.device if cfg.device != "auto" else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), device, owns)


# --- run directory ---------------------------------------------------------------------------
def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in OPERATIONAL_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> Path | None:
    """Create / check the run directory; returns the checkpoint to resume from, if any."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    new = cfg.to_dict()
    if cfg_path.exists():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        diff = _config_diff(old, new)
        if diff:
            raise InputError("run directory holds a run with a different config (" + "; ".join(diff[:5])
                             + "): use a new --run-dir, or the same config to resume", run_dir)
    if ckpt.exists() and not resume:
        raise InputError("run directory already holds a checkpoint: pass --resume to continue it, "
                         "or use a new --run-dir", run_dir)
    atomic_save(lambda tmp: tmp.write_text(yaml.safe_dump(new, sort_keys=False)), cfg_path)
    return ckpt if (resume and ckpt.exists()) else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl``: train records have ``loss``, eval records ``val_loss``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rng_state(mask_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
        "mask": mask_gen.get_state(),
    }


def _set_rng_state(state: dict, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    mask_gen.set_state(state["mask"])


# --- the loop --------------------------------------------------------------------------------
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def train(cfg: TrainConfig, run_dir: str | os.PathLike | None = None, resume: bool = False,
          stop_at: int | None = None) -> dict:
    """Pretrain ``cfg.model`` for ``cfg.steps`` updates -> metrics dict.

    run_dir: where config, metrics, checkpoints and figures go (None: nothing is written).
    resume: continue from ``run_dir/checkpoint.pt`` (exactly; fresh start when there is none).
    stop_at: stop after this step as if killed (tests, time-boxed runs); the run resumes later.
    Returns {"step", "train_loss" (mean of the last log window), "val_loss", "val_ood_loss",
    "clips_per_s", "history" (the train and eval records)}.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dd = _setup_distributed(cfg)
    if cfg.batch_size % dd.world:
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by the {dd.world} ranks")
    device, b_local = dd.device, cfg.batch_size // dd.world
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(
        cfg.precision, torch.bfloat16 if device.type == "cuda" else None)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.model, **cfg.model_overrides).to(device)
    mcfg = model.config
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=True)  # one pass over the parameters (CPU and CUDA)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same draws on every rank: one global batch

    ds = cfg.data.downsample
    # shard clips come pooled from ClipDataset(downsample=ds); synthetic batches are pooled here
    batch_ds = ds if cfg.data.synthetic else 1
    if cfg.data.synthetic:
        src = SyntheticClips((mcfg.img_size[0] * ds, mcfg.img_size[1] * ds), mcfg.num_frames, cfg.seed, site=0)
        stream = SyntheticStream(src, cfg.batch_size, dd.rank, dd.world)
    else:
        if not cfg.data.train_urls:
            raise InputError("no training data: set data.train_urls (shards) or data.synthetic=true")
        stream = ShardStream(cfg.data.train_urls, mcfg.num_frames, b_local, cfg.seed, dd.rank, dd.world,
                             cfg.num_workers, cfg.data.oversample, cfg.data.shuffle_buffer, ds)

    step, history = 0, []
    run_path = Path(run_dir) if run_dir is not None else None
    metrics_path = run_path / "metrics.jsonl" if run_path else None
    ckpt_path = None
    if run_path is not None:
        if dd.main:
            ckpt_path = _prepare_run_dir(run_path, cfg, resume)
        if dd.world > 1:
            box = [None if ckpt_path is None else str(ckpt_path)]
            dist.broadcast_object_list(box, src=0)
            ckpt_path = None if box[0] is None else Path(box[0])
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if not isinstance(ckpt, dict) or not {"train", "state_dict"} <= set(ckpt):
            raise InputError("not a training checkpoint written by pretrain (no training state)", ckpt_path)
        state = ckpt["train"]
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], mask_gen)
        if len(state["data"]) != dd.world:
            raise InputError(f"checkpoint was written by {len(state['data'])} ranks, this run has {dd.world}: "
                             "resume with the same number of processes", ckpt_path)
        stream.load_state_dict(state["data"][dd.rank])
        step = int(state["step"])
        if dd.main:  # drop what a killed run logged after its last checkpoint
            history = [r for r in read_metrics(run_path) if r["step"] <= step]
    if dd.main and metrics_path is not None:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    val = {k: val_batches(cfg, k, mcfg) for k in ("val", "val_ood")} if dd.main else {}
    net = model
    if dd.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)

    def log(record: dict) -> None:
        history.append(record)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        data_states = [stream.state_dict()]
        if dd.world > 1:
            data_states = [None] * dd.world
            dist.all_gather_object(data_states, stream.state_dict())
        if dd.main and run_path is not None:
            save_checkpoint(run_path / "checkpoint.pt", {
                "format": CHECKPOINT_FORMAT, "config": mcfg.to_dict(), "state_dict": model.state_dict(),
                "train": {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                          "rng": _rng_state(mask_gen), "data": data_states, "train_config": cfg.to_dict()}})

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and dd.main), desc="pretrain",
               dynamic_ncols=True)
    window_loss, window_n, t0, clips_s = torch.zeros((), device=device), 0, time.perf_counter(), float("nan")
    model.train()
    while step < cfg.steps:
        batch = next(stream)
        bold, mask = downsample(batch["bold"], batch["mask"], batch_ds)
        try:
            model.check_inputs(bold[:1], mask[:1])
        except InputError as err:
            raise InputError(f"clip {batch['key'][0]!r} (after data.downsample={ds}): {err.problem}; "
                             "set model_overrides.img_size / num_frames or data.downsample to match the data"
                             ) from None
        noise = model.draw_noise(cfg.batch_size, mask_gen)[dd.rank * b_local:(dd.rank + 1) * b_local]
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
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

        if step % cfg.log_every == 0 or step == cfg.steps:
            if dd.world > 1:
                dist.all_reduce(window_loss)
                window_loss /= dd.world
            train_loss = float(window_loss) / window_n
            clips_s = window_n * cfg.batch_size / (time.perf_counter() - t0)
            if dd.main:
                log({"step": step, "loss": train_loss, "lr": lr, "clips_s": clips_s})
                bar.set_postfix(loss=f"{train_loss:.4f}", clips_s=f"{clips_s:.1f}")
            window_loss.zero_()
            window_n, t0 = 0, time.perf_counter()
        bar.update(1)

        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            if dd.main:
                rec = {"step": step}
                for name, batches in val.items():
                    if batches:
                        rec[f"{name}_loss"] = evaluate(model, batches, cfg.seed + 2, batch_ds, device, amp_dtype)
                log(rec)
                fig_batch = val["val"][0] if val.get("val") else batch
                if run_path is not None and cfg.figures:
                    _recon_figure(model, fig_batch, batch_ds, cfg.seed + 3, device,
                                  run_path / "figures" / f"recon_{step:06d}.png", step)
            if dd.world > 1:
                dist.barrier()
            t0 = time.perf_counter()
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            checkpoint()
        if stop_at is not None and step >= stop_at:
            break
    bar.close()
    if dd.main and run_path is not None and step == cfg.steps:
        model.save_pretrained(run_path / "model.pt")
    if dd.owns_group:
        dist.destroy_process_group()

    train_recs = [r for r in history if "loss" in r]
    evals = [r for r in history if "val_loss" in r or "val_ood_loss" in r]
    return {"step": step, "train_loss": train_recs[-1]["loss"] if train_recs else None,
            "val_loss": evals[-1].get("val_loss") if evals else None,
            "val_ood_loss": evals[-1].get("val_ood_loss") if evals else None,
            "clips_per_s": clips_s, "history": history}


# --- data for the chapter --------------------------------------------------------------------
def pretraining_shards(cohort_dir: str | os.PathLike, out: str | os.PathLike | None = None, val_frac: float = 0.25,
                       seed: int = 0, progress: bool = False) -> dict[str, str]:
    """Flat-map shards of a simulated cohort (``fmri_bench.synth``) split for pretraining.

    In-distribution = the site with the most subjects: its subjects are split (by subject, seeded)
    into ``train`` and ``val``; every other site is ``val_ood``. Each split is flattened
    (``fmri_bench.convert.flatten``) into ``out/<split>`` once and reused afterwards (default
    ``out``: ``paths.data_dir() / "pretrain_shards" / <cohort directory name>``).
    -> {"train": dir, "val": dir, "val_ood": dir}, ready for ``data.train_urls`` etc.
    """
    from fmri_bench.convert import flatten
    from fmri_bench.paths import data_dir
    from fmri_bench.synth import load_ground_truth

    cohort_dir = Path(cohort_dir)
    out = Path(out) if out is not None else data_dir() / "pretrain_shards" / cohort_dir.name
    gt, _ = load_ground_truth(cohort_dir)
    runs = [r for r in gt["runs"] if r.get("path")]
    if not runs:
        raise InputError("the cohort has no CIFTI runs (a streamed profile? its shards are already flat maps)",
                         cohort_dir)
    site_of = {r["subject"]: r["site"] for r in runs}
    sites = sorted(set(site_of.values()), key=lambda s: (-list(site_of.values()).count(s), s))
    home = sorted(s for s, site in site_of.items() if site == sites[0])
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_frac * len(home))))
    val_subjects = set(rng.permutation(home)[:n_val].tolist())
    split_of = {s: ("val_ood" if site_of[s] != sites[0] else "val" if s in val_subjects else "train")
                for s in site_of}
    dirs = {}
    for split in ("train", "val", "val_ood"):
        inputs = [str(cohort_dir / r["path"]) for r in runs if split_of[r["subject"]] == split]
        dirs[split] = str(out / split)
        done = out / split / "inputs.json"
        if done.exists() and json.loads(done.read_text()) == inputs:
            continue
        if not inputs:
            raise InputError(f"no subjects for the {split} split (the cohort has sites {sites})", cohort_dir)
        summary = flatten(inputs, out / split, progress=progress, shard_size=8, overwrite=True)
        if summary.failed:
            raise InputError(f"{len(summary.failed)} runs failed to flatten for {split}", out / split)
        done.write_text(json.dumps(inputs))
    return dirs
