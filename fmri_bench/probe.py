"""Frozen-feature probes: state decoding with a grid of heads, trait decoding with logistic CV.

In: features in memory (``Features``: named arrays, one row per clip, with labels and subject
ids; ``fmri_bench.harness.features`` extracts them) and the train / val / test rows of a split
(``fmri_bench.splits``). Out: ``ProbeResult`` (state decoding) or ``TraitResult`` (traits).

State decoding follows the flat-map MAE paper (arXiv 2510.13768, "Probes and benchmarks"):
representations ``cls`` and ``avg_patch`` (N, D) get linear heads, ``patch`` tokens (N, L, D) get
an attentive-pooling head (one learned query, multi-head cross-attention, then linear). A grid
of heads over lr scale x weight decay is trained together, in one pass over the features per
epoch (AdamW, warm-up then cosine); the head with the best validation accuracy is reported on
test. Test labels never influence the choice.

Trait decoding follows Brainmarks: embed once, then ``LogisticRegressionCV`` (family-grouped
folds, 10 C values, balanced accuracy) over many subject-disjoint re-splits; continuous traits
are binned into quantile classes whose edges come from the training subjects only.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from itertools import product
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fmri_bench.errors import InputError
from fmri_bench.results import mean_ci

REPRESENTATIONS = ("cls", "avg_patch", "patch")
HEADS = ("linear", "attentive", "mlp")

# the upstream 7 x 7 grid (fmri-fm config/default_probe.yaml)
UPSTREAM_LR_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
UPSTREAM_WEIGHT_DECAYS = (3e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


# ---------------------------------------------------------------------------------------------
# features
@dataclass
class Features:
    """Frozen features of N clips. arrays: name -> (N, D) or (N, L, D); labels: (N,) int64
    (-1 where a clip has none); subjects, keys: (N,) str."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    subjects: np.ndarray
    keys: np.ndarray

    def __post_init__(self):
        n = len(self.labels)
        for name, a in {**self.arrays, "subjects": self.subjects, "keys": self.keys}.items():
            if len(a) != n:
                raise InputError(f"features {name!r} has {len(a)} rows, labels have {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise InputError(f"no {name!r} features; have {sorted(self.arrays)}")
        return self.arrays[name]

    def subset(self, idx) -> "Features":
        return Features({k: v[idx] for k, v in self.arrays.items()}, self.labels[idx],
                        self.subjects[idx], self.keys[idx])

    def save(self, path) -> None:
        from fmri_bench.paths import atomic_save

        atomic_save(lambda tmp: np.savez(tmp, labels=self.labels, subjects=self.subjects, keys=self.keys,
                                         **{f"x_{k}": v for k, v in self.arrays.items()}), path)

    @classmethod
    def load(cls, path) -> "Features":
        z = np.load(path, allow_pickle=False)
        arrays = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
        return cls(arrays, z["labels"], z["subjects"], z["keys"])


# ---------------------------------------------------------------------------------------------
# heads
class LinearHead(nn.Module):
    """x: (B, D) -> logits (B, C)."""

    def __init__(self, in_dim: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(x)


class MLPHead(nn.Module):
    """x: (B, D) -> logits (B, C) through one hidden GELU layer (parcel-series MLP baseline)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)
        for lin in (self.fc1, self.fc2):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class AttentivePoolHead(nn.Module):
    """x: (B, L, D) patch tokens -> logits (B, C).

    One learned query attends over the tokens (multi-head, head width ``head_dim``) through
    learned key / value projections; the pooled vector goes through a linear classifier.
    """

    def __init__(self, in_dim: int, n_classes: int, embed_dim: int | None = None, head_dim: int = 64):
        super().__init__()
        embed_dim = embed_dim or in_dim
        head_dim = min(head_dim, embed_dim)
        if embed_dim % head_dim:
            raise InputError(f"attentive head width {embed_dim} is not a multiple of head_dim {head_dim}")
        self.embed_dim, self.n_heads = embed_dim, embed_dim // head_dim
        self.query = nn.Parameter(torch.zeros(embed_dim))
        self.kv = nn.Linear(in_dim, 2 * embed_dim)
        self.linear = nn.Linear(embed_dim, n_classes)
        for p in (self.query, self.kv.weight, self.linear.weight):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.linear.bias)

    def pool(self, x, token_mask=None):
        """x: (B, L, D), token_mask: (B, L) bool, False = ignore (non-brain token)
        -> pooled (B, E), attention (B, n_heads, L)."""
        B, L, _ = x.shape
        h, hd = self.n_heads, self.embed_dim // self.n_heads
        k, v = self.kv(x).view(B, L, 2, h, hd).unbind(2)  # (B, L, h, hd) each
        q = self.query.view(h, hd)
        # written out rather than F.scaled_dot_product_attention: that has no vmap rule on CPU
        logits = torch.einsum("blhd,hd->bhl", k, q) * hd ** -0.5  # (B, h, L)
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask[:, None, :], -1e4)
        attn = logits.softmax(-1)
        pooled = torch.einsum("bhl,blhd->bhd", attn, v).reshape(B, self.embed_dim)
        return pooled, attn

    def forward(self, x, token_mask=None):
        return self.linear(self.pool(x, token_mask)[0])


class HeadGrid(nn.Module):
    """G independent heads of one kind, evaluated together: x (B, ...) -> logits (G, B, C).

    Each head keeps its own parameters (so AdamW can give each its own lr and weight decay
    through param groups); the forward stacks them and runs one vmapped call.
    Inputs are standardised with the training statistics stored as buffers. Token inputs
    (B, L, D): all-zero tokens (the MAE zeroes non-brain tokens) are left out of the attention.
    """

    def __init__(self, heads: list[nn.Module], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self._names = [n for n, _ in heads[0].named_parameters()]

    def _inputs(self, x) -> tuple:
        args = (x.ne(0).any(-1),) if x.ndim == 3 else ()  # token mask before standardising
        return ((x - self.mean) / self.std, *args)

    def forward(self, x):
        inputs = self._inputs(x)
        params = {n: torch.stack([dict(h.named_parameters())[n] for h in self.heads]) for n in self._names}
        return vmap(lambda p: functional_call(self.heads[0], p, inputs))(params)

    def forward_head(self, x, g: int):
        """Logits (B, C) of head ``g`` alone."""
        return self.heads[g](*self._inputs(x))


def make_head(kind: str, in_shape: tuple[int, ...], n_classes: int, cfg: "ProbeConfig") -> nn.Module:
    if kind == "linear":
        return LinearHead(in_shape[-1], n_classes)
    if kind == "mlp":
        return MLPHead(in_shape[-1], n_classes, cfg.mlp_hidden)
    if kind == "attentive":
        return AttentivePoolHead(in_shape[-1], n_classes, cfg.attn_dim, cfg.attn_head_dim)
    raise InputError(f"unknown head {kind!r}; expected one of {HEADS}")


# ---------------------------------------------------------------------------------------------
# the grid probe
@dataclass
class ProbeConfig:
    """Probe training settings. Defaults run in seconds on a CPU; ``upstream()`` is the paper's."""

    # upper part of the upstream grid: small cohorts give few steps per epoch
    lr_scales: tuple[float, ...] = (1.0, 10.0, 100.0)
    weight_decays: tuple[float, ...] = (1e-3, 3e-2, 1.0)
    epochs: int = 20
    batch_size: int = 128
    base_lr: float = 1e-3  # absolute lr = base_lr * batch_size / 256 * lr_scale (upstream rule)
    warmup_epochs: int = 2
    betas: tuple[float, float] = (0.9, 0.95)
    standardize: bool = True  # z-score features with training-set statistics
    attn_dim: int | None = None  # attentive head width (default: feature width)
    attn_head_dim: int = 64
    mlp_hidden: int = 256
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def upstream(cls, **kw) -> "ProbeConfig":
        """The 7 x 7 lr-scale x weight-decay grid, 20 epochs (fmri-fm default_probe.yaml)."""
        return cls(lr_scales=UPSTREAM_LR_SCALES, weight_decays=UPSTREAM_WEIGHT_DECAYS, **kw)

    @property
    def grid(self) -> list[tuple[float, float]]:
        """Head g = (lr_scales[g // n_wd], weight_decays[g % n_wd])."""
        return list(product(self.lr_scales, self.weight_decays))


@dataclass
class ProbeResult:
    """Outcome of one grid probe. Accuracies are fractions; ``val_grid``: (n_lr, n_wd)."""

    representation: str
    head: str
    lr_scales: list[float]
    weight_decays: list[float]
    val_grid: np.ndarray
    best_lr_scale: float
    best_weight_decay: float
    best_lr: float
    val_acc: float
    test_acc: float
    test_balanced_acc: float
    n_classes: int
    chance: float  # test accuracy of always predicting the training majority class
    test_pred: np.ndarray
    test_true: np.ndarray
    confusion: np.ndarray  # (C, C), rows true class, columns predicted
    n_train: int
    n_val: int
    n_test: int
    seconds: float
    heads: HeadGrid | None = field(default=None, repr=False)  # trained grid; not serialised
    best_index: int = 0

    @property
    def per_class_acc(self) -> np.ndarray:
        """(C,) test recall per class; NaN for classes absent from test."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / self.confusion.sum(1)

    @torch.no_grad()
    def predict(self, x) -> np.ndarray:
        """Class predictions of the selected head. x: (N, D) or (N, L, D) -> (N,)."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.heads.mean.device)
        return _predict_head(self.heads, x, self.best_index, 1024)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "heads"}
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _cosine_warmup(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


@torch.no_grad()
def _predict_grid(grid: HeadGrid, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """x: (N, ...) -> predictions (G, N)."""
    out = [grid(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(out, 1).cpu().numpy()


@torch.no_grad()
def _predict_head(grid: HeadGrid, x: torch.Tensor, g: int, batch_size: int) -> np.ndarray:
    """x: (N, ...) -> predictions (N,) of head g alone."""
    out = [grid.forward_head(x[i:i + batch_size], g).argmax(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).cpu().numpy()


def _check_labels(y, n_classes, part) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        raise InputError(f"the {part} set is empty")
    if y.min() < 0 or y.max() >= n_classes:
        raise InputError(f"{part} labels must be in [0, {n_classes}), found [{y.min()}, {y.max()}]"
                         " (-1 marks clips without a label)")
    return y


def train_probe(x_train, y_train, x_val, y_val, x_test=None, y_test=None, head: str | None = None,
                n_classes: int | None = None, cfg: ProbeConfig | None = None,
                representation: str = "features") -> ProbeResult:
    """Train the lr x wd grid of heads together; choose on val; report the chosen head on test.

    x_*: (N, D) for linear / mlp heads, (N, L, D) for the attentive head (the default head
    follows the rank). y_*: (N,) int class ids. Without a test set the test fields are NaN.
    """
    cfg = cfg or ProbeConfig()
    t0 = time.perf_counter()
    x_train = np.asarray(x_train)
    head = head or ("attentive" if x_train.ndim == 3 else "linear")
    if x_train.ndim != (3 if head == "attentive" else 2):
        raise InputError(f"{head} head needs {'(N, L, D)' if head == 'attentive' else '(N, D)'} "
                         f"features, got shape {x_train.shape}")
    if n_classes is None:
        n_classes = int(max(np.max(y) for y in (y_train, y_val, y_test) if y is not None)) + 1
    y_train = _check_labels(y_train, n_classes, "train")
    y_val = _check_labels(y_val, n_classes, "val")
    dev = torch.device(cfg.device)

    def as_t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)

    xt = as_t(x_train)
    if cfg.standardize:
        # statistics over real tokens only: the MAE returns zeros at non-brain tokens
        rows = xt[xt.ne(0).any(-1)] if xt.ndim == 3 else xt
        mean, std = rows.mean(0), rows.std(0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(xt.shape[-1], device=dev), torch.ones(xt.shape[-1], device=dev)

    grid_hp = cfg.grid
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = [make_head(head, tuple(xt.shape[1:]), n_classes, cfg) for _ in grid_hp]
    grid = HeadGrid(heads, mean, std).to(dev)

    lr = cfg.base_lr * cfg.batch_size / 256
    groups = []
    for h, (lr_scale, wd) in zip(grid.heads, grid_hp):
        decay = [p for n, p in h.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in h.named_parameters() if n.endswith("bias")]
        groups += [{"params": decay, "lr": lr * lr_scale, "weight_decay": wd},
                   {"params": no_decay, "lr": lr * lr_scale, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, betas=cfg.betas)
    steps_per_epoch = math.ceil(len(xt) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _cosine_warmup(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch))

    yt = torch.as_tensor(y_train, device=dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    grid.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            idx = idx.to(dev)
            logits = grid(xt[idx])  # (G, B, C)
            # summed over heads: each head's gradient is its own mean loss, independent of G
            loss = F.cross_entropy(logits.flatten(0, 1), yt[idx].repeat(len(grid_hp)),
                                   reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    grid.eval()

    val_acc = (_predict_grid(grid, as_t(x_val), cfg.batch_size) == y_val).mean(1)  # (G,)
    best = int(np.argmax(val_acc))  # ties go to the first head in grid order
    best_lr_scale, best_wd = grid_hp[best]

    if x_test is not None and y_test is not None:
        y_test = _check_labels(y_test, n_classes, "test")
        # only the chosen head sees the test set
        pred = _predict_head(grid, as_t(x_test), best, cfg.batch_size)
        conf = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(conf, (y_test, pred), 1)
        test_acc = float((pred == y_test).mean())
        present = conf.sum(1) > 0
        test_bacc = float(np.mean(np.diag(conf)[present] / conf.sum(1)[present]))
        majority = np.bincount(y_train, minlength=n_classes).argmax()
        chance = float((y_test == majority).mean())
    else:
        y_test, pred = np.zeros(0, np.int64), np.zeros(0, np.int64)
        conf = np.zeros((n_classes, n_classes), dtype=np.int64)
        test_acc = test_bacc = chance = math.nan

    return ProbeResult(
        representation=representation, head=head, lr_scales=list(cfg.lr_scales),
        weight_decays=list(cfg.weight_decays),
        val_grid=val_acc.reshape(len(cfg.lr_scales), len(cfg.weight_decays)),
        best_lr_scale=best_lr_scale, best_weight_decay=best_wd, best_lr=lr * best_lr_scale,
        val_acc=float(val_acc[best]), test_acc=test_acc, test_balanced_acc=test_bacc,
        n_classes=n_classes, chance=chance, test_pred=pred, test_true=y_test, confusion=conf,
        n_train=len(y_train), n_val=len(y_val), n_test=len(y_test),
        seconds=time.perf_counter() - t0, heads=grid, best_index=best,
    )


# ---------------------------------------------------------------------------------------------
# traits
def quantile_bins(y, q: int) -> np.ndarray:
    """Inner edges (q - 1,) splitting ``y`` into q equally populated classes.

    Fit on training subjects only and apply with ``apply_bins`` to every part.
    """
    y = np.asarray(y, dtype=float)
    y = y[np.isfinite(y)]
    if q < 2 or len(y) < q:
        raise InputError(f"cannot cut {len(y)} values into {q} quantile classes")
    return np.quantile(y, np.arange(1, q) / q)


def apply_bins(y, edges) -> np.ndarray:
    """Class id in [0, len(edges)] per value; a value equal to an edge goes to the upper class."""
    return np.searchsorted(np.asarray(edges), np.asarray(y, dtype=float), side="right")


@dataclass
class TraitResult:
    """Balanced accuracy of a trait over re-splits, with mean and 95 % CI."""

    trait: str
    scores: np.ndarray  # (n_splits,) balanced accuracy on the held-out subjects
    mean: float
    ci_low: float
    ci_high: float
    n_classes: int
    chance: float  # balanced-accuracy chance = 1 / n_classes
    best_C: np.ndarray  # (n_splits,)
    n_train: float  # mean over splits (samples)
    n_test: float

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


def trait_logistic(features, y, subjects, families=None, q: int | None = None, n_splits: int = 20,
                   test_frac: float = 0.2, n_folds: int = 5, n_Cs: int = 10, train_mask=None,
                   test_mask=None, seed: int = 0, max_iter: int = 1000,
                   trait: str = "trait", exclude=None, n_jobs: int | None = -1) -> TraitResult:
    """Logistic-regression trait decoding over subject-disjoint, family-grouped re-splits.

    features: (N, D) embedded once; y: (N,) trait per clip (class labels, or continuous values
    with ``q`` quantile classes); subjects / families: (N,) ids. ``train_mask`` / ``test_mask``
    (N,) bool restrict train and test clips, e.g. train on rest and test on task clips of
    held-out subjects. Each split: C chosen by ``n_folds``-fold family-grouped CV on train
    (balanced accuracy), then balanced accuracy on the held-out subjects. ``exclude``: subjects
    (the encoder's pretraining subjects) whose families are only ever trained on, never tested.
    ``max_iter`` 1000 as Brainmarks' logistic evaluation (``default_logistic.yaml``: 5 folds,
    10 C values, max_iter 1000); ``n_jobs``: the CV folds x C values run in parallel (-1: every
    core; the result does not depend on it).
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fmri_bench.splits import _groups, _unseen

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(y)
    subjects, families = _groups(subjects, families)
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(subjects):
        raise InputError(f"features (N, D), y (N,), subjects (N,) expected; got {X.shape}, "
                         f"{y.shape}, {subjects.shape}")
    n_fam = len(np.unique(families))
    n_test_fam = max(1, int(round(test_frac * n_fam)))
    pool = np.flatnonzero(_unseen(families, subjects, exclude))
    n_unseen = len(np.unique(families[pool]))
    if n_unseen == 0:
        raise InputError(f"no family left for testing {trait} that pretraining never saw "
                         f"({n_fam} families, each with a pretraining subject)")
    n_test_fam = min(n_test_fam, n_unseen)
    if n_fam - n_test_fam < n_folds:
        raise InputError(
            f"too few families for trait decoding with {n_folds}-fold grouped CV: need at least "
            f"{n_folds + n_test_fam} families, found {n_fam} from {len(np.unique(subjects))} subjects")
    train_mask = np.ones(len(y), bool) if train_mask is None else np.asarray(train_mask, bool)
    test_mask = np.ones(len(y), bool) if test_mask is None else np.asarray(test_mask, bool)

    # plain L2 logistic regression; scikit-learn >= 1.9 wants that said explicitly
    lr_kw = ({"l1_ratios": (0.0,), "use_legacy_attributes": False}
             if "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters else {})
    scores, best_C, n_tr, n_te = [], [], [], []
    n_classes = q
    seeds = np.random.SeedSequence(seed).generate_state(n_splits)
    for s in seeds:
        if len(pool) == len(y):
            tr, te = next(GroupShuffleSplit(1, test_size=n_test_fam, random_state=int(s))
                          .split(X, groups=families))
        elif n_test_fam == n_unseen:
            tr, te = np.setdiff1d(np.arange(len(y)), pool), pool
        else:
            rest, te = next(GroupShuffleSplit(1, test_size=n_test_fam, random_state=int(s))
                            .split(pool, groups=families[pool]))
            te = pool[te]
            tr = np.setdiff1d(np.arange(len(y)), te)
        tr, te = tr[train_mask[tr]], te[test_mask[te]]
        if len(tr) == 0 or len(te) == 0:
            raise InputError(f"no {'training' if len(tr) == 0 else 'test'} clips left after "
                             "train_mask / test_mask: does the data hold both brain states?")
        if q:
            # one value per training subject, so subjects with many clips do not weigh more
            _, first = np.unique(subjects[tr], return_index=True)
            target = apply_bins(y, quantile_bins(y[tr][first], q))
        else:
            target = y
            n_classes = len(np.unique(y[tr]))
        folds = list(GroupKFold(n_folds).split(X[tr], groups=families[tr]))
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(
            Cs=n_Cs, cv=folds, scoring="balanced_accuracy", max_iter=max_iter, n_jobs=n_jobs, **lr_kw))
        with warnings.catch_warnings():
            # folds missing a rare class warn in balanced_accuracy; the CV mean still ranks C
            warnings.simplefilter("ignore", UserWarning)
            clf.fit(X[tr], target[tr])
            scores.append(balanced_accuracy_score(target[te], clf.predict(X[te])))
        best_C.append(float(np.ravel(clf[-1].C_)[0]))
        n_tr.append(len(tr))
        n_te.append(len(te))
    m, lo, hi = mean_ci(scores)
    return TraitResult(trait, np.asarray(scores), m, lo, hi, int(n_classes), 1.0 / n_classes,
                       np.asarray(best_C), float(np.mean(n_tr)), float(np.mean(n_te)))
