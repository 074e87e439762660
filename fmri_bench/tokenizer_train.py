"""Training the neural tokenizer (fMRI-LM stage 1): YAML config + overrides, resumable.

In:  parcel windows (B, T, R) from a ``.npy`` file (``data.windows``; see
     ``fmri_bench.parcels.model_windows``) with one JSONL record per window (``data.corpus``:
     ``text`` = the scan's descriptor text, ``subject`` for the subject-level split), or the
     synthetic stand-in (``data.synthetic: true``).
Out: ``run_dir/config.yaml``, ``metrics.jsonl`` (train records: ``loss`` and its parts; eval
     records: ``val_*``), ``checkpoint.pt`` (atomic; ``--resume`` continues exactly) and
     ``tokenizer.pt`` at the end.

The frozen LLM is run once per corpus: the last-token states of the descriptor texts and the
input word embeddings of their tokens are cached under ``cache_dir()/text_states`` (keyed by
the model and the texts), so training steps never run the LLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from fmri_bench.config import read_config, warmup_cosine
from fmri_bench.errors import InputError
from fmri_bench.models.tokenizer import NeuralTokenizer, codebook_usage, grl_strength, tokenizer_config
from fmri_bench.models.mae import check_keys, check_values
from fmri_bench.paths import atomic_save, cache_dir

CHECKPOINT_FORMAT = "fmri_bench.tokenizer/1"
OPERATIONAL_KEYS = ("log_every", "eval_every", "ckpt_every", "progress", "num_threads")


@dataclass
class TokDataConfig:
    synthetic: bool = True
    windows: str | None = None  # .npy (n, T, R)
    corpus: str | None = None  # JSONL, one record per window: text, subject
    n_subjects: int = 24  # synthetic only
    windows_per_subject: int = 4
    val_fraction: float = 0.25  # of subjects


@dataclass
class TokenizerTrainConfig:
    """Tokenizer training settings; defaults are CPU-sized (the ``tiny`` preset)."""

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    data: TokDataConfig = field(default_factory=TokDataConfig)
    llm: str | None = None  # None: SmolLM2-135M-Instruct; a local path; "none": no alignment losses
    batch_size: int = 8
    steps: int = 200
    lr: float = 1e-4  # the public code's AdamW lr
    warmup_steps: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 0
    log_every: int = 10
    eval_every: int = 50
    ckpt_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.data, dict):
            check_keys(self.data, TokDataConfig, what="tokenizer data config")
            self.data = TokDataConfig(**self.data)
        check_values(self.data, {"n_subjects": 2, "windows_per_subject": 1, "val_fraction": 0},
                     "tokenizer data config", exclusive=("val_fraction",))
        check_values(self, {"batch_size": 2, "steps": 1, "lr": 0, "warmup_steps": 0, "weight_decay": 0,
                            "grad_clip": 0, "num_threads": 0, "log_every": 1, "eval_every": 0, "ckpt_every": 0},
                     "tokenizer train config", exclusive=("lr", "grad_clip"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path=None, overrides=()) -> TokenizerTrainConfig:
    """YAML file (or defaults) + ``key=value`` overrides (dotted keys, YAML values)."""
    d = read_config(path, overrides)
    src = None if path is None else os.fspath(path)
    check_keys(d, TokenizerTrainConfig, src, what="tokenizer train config")
    cfg = TokenizerTrainConfig(**d)
    tokenizer_config(cfg.preset, **cfg.model_overrides)  # fail now on a bad model key
    return cfg


def lr_at(cfg: TokenizerTrainConfig, step: int) -> float:
    return warmup_cosine(cfg.lr, step, cfg.warmup_steps, cfg.steps)


# --- data ------------------------------------------------------------------------------------
@dataclass
class WindowData:
    """windows (n, T, R) float32; texts (n,) descriptor text per window; subjects (n,) str;
    truth (n,) float (the synthetic latent per window; NaN for real data); lengths (n,) int real
    frames of each window (None: no padding); scans (n,) the scan each window comes from."""

    windows: np.ndarray
    texts: list
    subjects: list
    truth: np.ndarray
    lengths: np.ndarray | None = None
    scans: list | None = None


def corpus_windows(series_list, records, tr: float = 2.0, length: int = 160, short: str = "pad") -> WindowData:
    """Parcel series + their descriptor records -> the tokenizer's training data.

    series_list: ParcelSeries with ``.key`` (``parcels``); records: ``descriptors.describe``
    output, matched by ``scan`` == key. Each run becomes ``parcels.model_windows`` (TR ``tr``,
    robust z per parcel, ``length``-frame windows; a run shorter than one window is zero-padded
    at the end or skipped, ``short``); every window carries its scan's descriptor text. Runs
    that give no window are left out."""
    by_scan = {str(r["scan"]): r for r in records}
    wins, lens, texts, subs, scans = [], [], [], [], []
    for s in series_list:
        rec = by_scan.get(str(s.key))
        if rec is None:
            raise InputError(f"no descriptor record for scan {s.key!r}", s.source)
        w, n = parcels_model_windows(s, tr, length, short)
        wins.append(w)
        lens += n.tolist()
        texts += [rec["text"]] * len(w)
        subs += [str(s.subject)] * len(w)
        scans += [str(s.key)] * len(w)
    if not lens:
        raise InputError(f"no run gives a {length}-frame window at TR {tr} s (short={short!r})")
    return WindowData(np.concatenate(wins), texts, subs, np.full(len(lens), np.nan), np.asarray(lens, np.int64), scans)


def parcels_model_windows(series, tr, length, short):
    from fmri_bench.parcels import model_windows

    return model_windows(series, tr, length, short, return_lengths=True)


def synthetic_windows(n_subjects=24, windows_per_subject=4, n_frames=160, n_parcels=360, seed=0) -> WindowData:
    """SYNTHETIC stand-in for parcel windows + descriptor texts (until a real corpus is given).

    Each subject carries a latent z ~ N(0, 1) that scales the coupling of two of six latent
    networks; windows are smooth network time courses mixed into parcels plus noise; the
    placeholder text states the binned coupling z (so text and series share a signal)."""
    rng = np.random.default_rng(seed)
    k = 6
    load = np.zeros((k, n_parcels))
    net = rng.integers(0, k, n_parcels)
    load[net, np.arange(n_parcels)] = 1.0
    wins, texts, subs, truth = [], [], [], []
    for s in range(n_subjects):
        z = float(rng.standard_normal())
        for _ in range(windows_per_subject):
            src = rng.standard_normal((n_frames + 8, k))
            ker = np.hanning(9)
            src = np.stack([np.convolve(src[:, j], ker / ker.sum(), "valid") for j in range(k)], 1)[:n_frames]
            src[:, 1] = src[:, 1] + np.tanh(z) * 1.5 * src[:, 0]
            x = src @ load + 0.5 * rng.standard_normal((n_frames, n_parcels))
            x = (x - np.median(x, 0)) / (np.subtract(*np.percentile(x, [75, 25], 0)) + 1e-6)
            wins.append(x.astype(np.float32))
            word = "elevated" if z > 1 else "reduced" if z < -1 else "typical"
            texts.append(f"Synthetic placeholder descriptor: coupling between network A and network B "
                         f"is {word} (z = {z:+.1f}).")
            subs.append(f"sub-{s:03d}")
            truth.append(z)
    return WindowData(np.stack(wins), texts, subs, np.asarray(truth))


def load_windows(cfg: TokenizerTrainConfig, n_frames: int, n_parcels: int) -> WindowData:
    d = cfg.data
    if d.synthetic:
        return synthetic_windows(d.n_subjects, d.windows_per_subject, n_frames, n_parcels, cfg.seed)
    if not d.windows or not d.corpus:
        raise InputError("no training data: set data.windows (.npy) and data.corpus (JSONL), or data.synthetic=true")
    for p in (d.windows, d.corpus):
        if not os.path.isfile(p):
            raise InputError("file not found", p)
    try:
        w = np.load(d.windows, allow_pickle=False)
    except Exception as err:
        raise InputError(f"cannot read parcel windows ({type(err).__name__})", d.windows) from None
    if w.ndim != 3:
        raise InputError(f"parcel windows must be (n, frames, parcels), got shape {w.shape}", d.windows)
    recs = []
    for i, line in enumerate(Path(d.corpus).read_text().splitlines()):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"line {i + 1} is not JSON", d.corpus) from None
            if "text" not in r:
                raise InputError(f"line {i + 1} has no 'text'", d.corpus)
            recs.append(r)
    if len(recs) != len(w):
        raise InputError(f"{len(recs)} corpus records for {len(w)} windows (need one per window)", d.corpus)
    # records written by `fmri-bench lm windows` carry each window's real frames (the rest is padding)
    lengths = np.array([int(r["frames"]) for r in recs], np.int64) if all("frames" in r for r in recs) else None
    return WindowData(w.astype(np.float32), [r["text"] for r in recs],
                      [str(r.get("subject", r.get("scan_id", i))) for i, r in enumerate(recs)],
                      np.full(len(w), np.nan), lengths,
                      [str(r["scan"]) for r in recs] if all("scan" in r for r in recs) else None)


def split_subjects(subjects, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Window indices (train, val), split by subject."""
    uniq = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_val = max(1, int(round(val_fraction * len(uniq)))) if len(uniq) > 1 else 0
    val_subs = {uniq[i] for i in order[:n_val]}
    val = np.array([i for i, s in enumerate(subjects) if s in val_subs], dtype=int)
    train = np.array([i for i, s in enumerate(subjects) if s not in val_subs], dtype=int)
    return train, val


def domain_separability(fake: torch.Tensor, words: torch.Tensor, steps: int = 400, lr: float = 1e-3,
                        seed: int = 0, subspace_dim: int | None = None, adv_hidden: int = 256) -> float:
    """How well a fresh domain classifier of the tokenizer's shape (Linear-GELU-2) tells ``fake``
    (n, W) from ``words`` (M, W): Adam on the classifier alone for ``steps``, balanced samples as
    in training -> its accuracy, mean of the last 50 steps (chance 0.5). subspace_dim: both kinds
    inside the words' top principal directions first (``LanguageAlignment.word_subspace``)."""
    from fmri_bench.models.tokenizer import LanguageAlignment, tokenizer_config

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = int(words.shape[1])
    cfg = tokenizer_config("tiny", llm_dim=w, adv_hidden=adv_hidden, adv_word_subspace=subspace_dim is not None)
    al = LanguageAlignment(cfg, subspace_dim or w)
    al.to_llm = torch.nn.Identity()  # the tokens come in at the LLM width already
    opt = torch.optim.Adam(al.domain.parameters(), lr=lr)
    accs = []
    for _ in range(steps):
        loss, acc = al.adversarial(fake[None], words, 0.0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append(float(acc))
    return float(np.mean(accs[-50:]))


def text_features(texts: list[str], llm: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text states (n, H), word embeddings (M, H)) of the frozen LLM, cached per corpus."""
    from fmri_bench import lm

    key = hashlib.sha256(json.dumps([str(llm), texts]).encode()).hexdigest()[:20]
    path = cache_dir() / "text_states" / f"{key}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return d["states"], d["words"]
    model = lm.load_llm(llm)
    uniq = sorted(set(texts))
    st = lm.text_states(model, uniq)
    pos = {t: i for i, t in enumerate(uniq)}
    states = st[torch.tensor([pos[t] for t in texts])]
    words = lm.word_embeddings(model, uniq)
    atomic_save(lambda tmp: torch.save({"states": states, "words": words}, tmp), path)
    return states, words


# --- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: NeuralTokenizer, windows: torch.Tensor, states: torch.Tensor | None = None,
             words: torch.Tensor | None = None, batch_size: int = 16, seed: int = 0,
             lengths: torch.Tensor | None = None) -> dict:
    """Held-out diagnostics: recon MSE (real frames only when ``lengths`` are given; and per
    window, ``recon_mse_windows``, for intervals), codebook
    usage (tokens holding real frames), domain-classifier accuracy, and fMRI -> text retrieval
    top-1 / top-5 (by window, against its own descriptor's state)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    err, n_val, idx, acc, fe, te, per = 0.0, 0.0, [], [], [], [], []
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        ln = None if lengths is None else lengths[i:i + batch_size]
        out = model(x, None if states is None else states[i:i + batch_size], words, grl=0.0, gen=gen, lengths=ln)
        m = model.frame_mask(ln, len(x))
        sq = (((out.recon - x) ** 2) * m).flatten(1).sum(1)
        err += float(sq.sum())
        n_val += float(m.sum()) * x.shape[2]
        per.append((sq / (m.flatten(1).sum(1) * x.shape[2]).clamp_min(1.0)).numpy())
        w = model.token_weight(ln, len(x))[..., 0] > 0
        idx.append(out.indices[w])
        if "domain_acc" in out.losses:
            acc.append(float(out.losses["domain_acc"]))
        if states is not None:
            fe.append(model.align.embed_fmri(out.features, None if ln is None else w[..., None].float()))
            te.append(model.align.embed_text(states[i:i + batch_size]))
    res = {"recon_mse": err / max(n_val, 1.0), "recon_mse_windows": np.concatenate(per),
           **codebook_usage(torch.cat(idx), model.quantiser.n_codes)}
    if acc:
        res["domain_acc"] = float(np.mean(acc))
    if fe:
        res.update(retrieval(torch.cat(fe), torch.cat(te)))
    model.train()
    return res


def retrieval(f: torch.Tensor, t: torch.Tensor) -> dict:
    """fMRI -> text retrieval over the set: the right text is the row's own (ties in identical
    texts count as correct) -> top1, top5 and their chance levels."""
    sim = f @ t.T
    n = len(f)
    same = torch.isclose(t @ t.T, torch.ones(()), atol=1e-6)  # identical texts are interchangeable
    rank = torch.argsort(sim, dim=1, descending=True)
    hit = same.gather(1, rank)
    top1 = float(hit[:, :1].any(1).float().mean())
    top5 = float(hit[:, :5].any(1).float().mean())
    ks = same.sum(1).tolist()
    chance1 = float(np.mean([k / n for k in ks]))
    chance5 = float(np.mean([1 - math.comb(n - k, min(5, n)) / math.comb(n, min(5, n)) for k in ks]))
    return {"top1": top1, "top5": top5, "chance_top1": chance1, "chance_top5": chance5}


# --- run directory ---------------------------------------------------------------------------
def _prepare_run_dir(run_dir: Path, cfg: TokenizerTrainConfig, resume: bool) -> Path | None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    new = cfg.to_dict()
    if cfg_path.exists():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        diff = [k for k in sorted(set(old) | set(new)) if k not in OPERATIONAL_KEYS and old.get(k) != new.get(k)]
        if diff:
            raise InputError(f"run directory holds a run with a different config ({', '.join(diff[:5])}): "
                             "use a new --run-dir, or the same config to resume", run_dir)
    if ckpt.exists() and not resume:
        raise InputError("run directory already holds a checkpoint: pass --resume to continue it, "
                         "or use a new --run-dir", run_dir)
    atomic_save(lambda tmp: tmp.write_text(yaml.safe_dump(new, sort_keys=False)), cfg_path)
    return ckpt if (resume and ckpt.exists()) else None


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _rng_state(gen):
    return {"torch": torch.get_rng_state(), "gen": gen.get_state()}


# --- the loop --------------------------------------------------------------------------------
def train(cfg: TokenizerTrainConfig, run_dir=None, resume: bool = False, stop_at: int | None = None,
          data: WindowData | None = None, text_feats: tuple | None = None, val_subjects=None) -> dict:
    """Train the tokenizer for ``cfg.steps`` updates -> {"step", "model", "history", "val",
    "clips_per_s", "split": (train idx, val idx)}.

    data: windows + texts (default: from ``cfg.data``); text_feats: (states (n, H), words (M, H))
    to use instead of running the LLM (``cfg.llm="none"`` and no text_feats: reconstruction only).
    stop_at: stop after this step as if killed (the run resumes later). val_subjects: the
    held-out subjects (default: ``split_subjects`` with ``data.val_fraction``), e.g. the subjects
    a descriptor corpus was not z-scored on.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    probe = tokenizer_config(cfg.preset, **cfg.model_overrides)
    data = data or load_windows(cfg, probe.n_frames, probe.n_parcels)
    states = words = None
    if text_feats is not None:
        states, words = text_feats
    elif cfg.llm != "none":
        states, words = text_features(data.texts, cfg.llm)
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("n_frames", data.windows.shape[1])
    overrides.setdefault("n_parcels", data.windows.shape[2])
    if states is not None:
        overrides.setdefault("llm_dim", int(states.shape[1]))
    mcfg = tokenizer_config(cfg.preset, **overrides)
    model = NeuralTokenizer(mcfg)
    x_all = torch.from_numpy(data.windows)
    model.check_inputs(x_all[:1])
    if val_subjects is None:
        tr, va = split_subjects(data.subjects, cfg.data.val_fraction, cfg.seed)
    else:
        held = set(map(str, val_subjects))
        va = np.array([i for i, s in enumerate(data.subjects) if str(s) in held], dtype=int)
        tr = np.array([i for i, s in enumerate(data.subjects) if str(s) not in held], dtype=int)
    if len(tr) < 2:
        raise InputError(f"only {len(tr)} training windows: need at least 2")
    if states is not None:
        model.align.set_text_centre(states[torch.from_numpy(tr)])
    no_decay = {n for n, p in model.named_parameters() if p.ndim < 2 or n.endswith("_pos")}
    groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    step, history = 0, []
    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_path = _prepare_run_dir(run_path, cfg, resume) if run_path else None
    if ckpt_path is not None:
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(f"cannot read checkpoint ({type(err).__name__})", ckpt_path) from None
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise InputError("not a tokenizer training checkpoint", ckpt_path)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        gen.set_state(ck["rng"]["gen"])
        step = int(ck["step"])
        history = [r for r in read_metrics(run_path) if r["step"] <= step]
    metrics_path = run_path / "metrics.jsonl" if run_path else None
    if metrics_path is not None:
        atomic_save(lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in history)), metrics_path)

    def log(rec):
        history.append(rec)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint():
        if run_path is not None:
            obj = {"format": CHECKPOINT_FORMAT, "config": mcfg.to_dict(), "state_dict": model.state_dict(),
                   "optimizer": opt.state_dict(), "rng": _rng_state(gen), "step": step, "train_config": cfg.to_dict()}
            atomic_save(lambda tmp: torch.save(obj, tmp), run_path / "checkpoint.pt")

    len_all = None if data.lengths is None else torch.as_tensor(data.lengths)
    xv = x_all[torch.from_numpy(va)] if len(va) else None
    sv = states[torch.from_numpy(va)] if (states is not None and len(va)) else None
    lv = None if (len_all is None or not len(va)) else len_all[torch.from_numpy(va)]

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="tokenizer", dynamic_ncols=True)
    window, n_win, t0, clips_s = {}, 0, time.perf_counter(), float("nan")
    model.train()
    b = min(cfg.batch_size, len(tr))
    val = {}
    while step < cfg.steps:
        pick = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)[:b]]
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(x_all[pick], None if states is None else states[pick], words,
                    grl=grl_strength(step / cfg.steps), gen=gen, lengths=None if len_all is None else len_all[pick])
        out.losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        for k, v in out.losses.items():
            window[k] = window.get(k, 0.0) + float(v.detach())
        n_win += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            clips_s = n_win * b / (time.perf_counter() - t0)
            rec = {"step": step, "loss": window["total"] / n_win, "lr": lr, "clips_s": clips_s}
            rec.update({k: v / n_win for k, v in window.items() if k != "total"})
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            window, n_win, t0 = {}, 0, time.perf_counter()
        bar.update(1)
        if xv is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            val = evaluate(model, xv, sv, words, seed=cfg.seed + 2, lengths=lv)
            val.pop("recon_mse_windows", None)  # per-window values are for intervals, not the log
            log({"step": step, **{f"val_{k}": v for k, v in val.items()}})
            t0 = time.perf_counter()
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            checkpoint()
        if stop_at is not None and step >= stop_at:
            break
    bar.close()
    if run_path is not None and step == cfg.steps:
        save_tokenizer(model, run_path / "tokenizer.pt")
    return {"step": step, "model": model, "history": history, "val": val, "clips_per_s": clips_s,
            "split": (tr, va), "states": states, "words": words, "data": data}


def save_tokenizer(model: NeuralTokenizer, path) -> None:
    obj = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict()}
    atomic_save(lambda tmp: torch.save(obj, tmp), path)


def load_tokenizer(path) -> NeuralTokenizer:
    """A tokenizer from ``tokenizer.pt`` or ``checkpoint.pt``."""
    from fmri_bench.models.tokenizer import TokenizerConfig

    if not os.path.isfile(path):
        raise InputError("no such tokenizer file", path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"cannot read tokenizer ({type(err).__name__})", path) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError("not a tokenizer file", path)
    m = NeuralTokenizer(TokenizerConfig(**ck["config"]))
    m.load_state_dict(ck["state_dict"])
    return m


def recon_yardsticks(train_windows: np.ndarray, val_windows: np.ndarray, ks=(8, 32),
                     train_lengths=None, val_lengths=None, per_window: bool = False) -> dict:
    """Reconstruction MSE of held-out windows (n, T, R) by predict-zero and by PCA-k over
    parcels fitted on the training windows only -> {"zero": mse, "pca8": mse, ...}. With
    lengths (n,), only the real (unpadded) frames are fitted and scored, as in ``evaluate``.
    ``per_window``: also ``"<name>_windows"``, each held-out window's MSE (for intervals)."""
    from sklearn.decomposition import PCA

    def frames(w, lengths):
        w = np.asarray(w)
        if lengths is None:
            return w.reshape(-1, w.shape[2])
        return np.concatenate([x[:int(n)] for x, n in zip(w, lengths)])

    r = train_windows.shape[2]
    tr = frames(train_windows, train_lengths)
    va = frames(val_windows, val_lengths)
    n_val = [int(n) for n in (val_lengths if val_lengths is not None else [val_windows.shape[1]] * len(val_windows))]
    cuts = np.cumsum(n_val)[:-1]

    def score(name, sq):
        out[name] = float(sq.mean())
        if per_window:
            out[f"{name}_windows"] = np.array([b.mean() for b in np.split(sq, cuts)])

    out: dict = {}
    score("zero", va ** 2)
    for k in ks:
        k = min(k, r, len(tr))
        pca = PCA(k, random_state=0).fit(tr)
        score(f"pca{k}", (pca.inverse_transform(pca.transform(va)) - va) ** 2)
    return out


def paired_difference(a, b, groups, rng: np.random.Generator | None = None, n_boot: int = 1000) -> dict:
    """Mean of ``a - b`` over paired items (e.g. per-window MSEs of two methods on the same
    windows) with a 95 % bootstrap interval that resamples ``groups`` (subjects), since windows
    of one subject are not independent."""
    rng = rng or np.random.default_rng(0)
    d = np.asarray(a, float) - np.asarray(b, float)
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    boot = [d[np.concatenate([members[i] for i in rng.integers(len(uniq), size=len(uniq))])].mean()
            for _ in range(n_boot)]
    return {"mean": float(d.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "n_items": int(len(d)), "n_groups": int(len(uniq))}


def recon_verdict(name: str, diffs: dict[str, dict]) -> str:
    """One sentence: is ``name``'s held-out MSE below / above / not told from each yardstick?
    ``diffs``: yardstick -> ``paired_difference(method, yardstick)``; reads the intervals."""
    parts = []
    for y, d in diffs.items():
        lo, hi = d["ci95"]
        word = "below" if hi < 0 else "above" if lo > 0 else "not told from"
        parts.append(f"{word} {y} (difference {d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}])")
    return f"{name}: held-out MSE " + "; ".join(parts) + " (95 % intervals over subjects)."


# --- the flat-map MAE as tokenizer -----------------------------------------------------------
@dataclass
class ClipFeatures:
    """Frozen MAE patch features of flat-map clips: patch (n, L, D) float32, brain (n, L) bool,
    scans (n,) the scan key (``{subject}_{run}``, as ``parcels.cohort_series``), subjects (n,)."""

    patch: np.ndarray
    brain: np.ndarray
    scans: list
    subjects: list


def scan_of_shard_key(key: str) -> str:
    """A flat-map shard key (``sub-{subject}_{run}_Atlas_MSMAll[_pathid]``) -> ``{subject}_{run}``."""
    import re

    from fmri_bench.convert import readable_key

    k = readable_key(key)
    m = re.fullmatch(r"sub-([^_]+)_(.+?)(?:_Atlas_MSMAll)?", k)
    return f"{m.group(1)}_{m.group(2)}" if m else k


def mae_clip_features(data, checkpoint, clips_per_run: int = 2, batch_size: int = 8) -> ClipFeatures:
    """The first ``clips_per_run`` consecutive 16-frame clips of every rest and task run of a
    ``harness`` Dataset through the frozen MAE of ``checkpoint`` (``forward_features``: every
    brain patch visible) -> ClipFeatures. The MAE is frozen, so this runs once."""
    from fmri_bench.harness.features import EncoderExtractor, extract, load_encoder
    from fmri_bench.harness.tasks import task_clips

    clips = task_clips("sex", data)  # consecutive clips of every rest and task run
    keep, seen = np.zeros(len(clips), bool), {}
    for i, k in enumerate(clips.run_keys):
        seen[k] = seen.get(k, 0) + 1
        keep[i] = seen[k] <= clips_per_run
    clips = clips.subset(keep)
    ex = EncoderExtractor(load_encoder(checkpoint), ("patch", "brain"))
    f = extract(clips, data, {"mae": ex}, batch_size=batch_size)["mae"]
    return ClipFeatures(np.asarray(f.arrays["patch"], np.float32), np.asarray(f.arrays["brain"]) > 0.5,
                        [scan_of_shard_key(k) for k in clips.run_keys], [str(s) for s in clips.subjects])


def train_mae_tokenizer(tok, feats: ClipFeatures, train_idx, states=None, words=None, steps: int = 200,
                        batch_size: int = 8, lr: float = 1e-3, warmup_steps: int = 20, weight_decay: float = 0.05,
                        grad_clip: float = 1.0, seed: int = 0) -> list[dict]:
    """Train an ``MAETokenizer``'s quantiser, feature decoder and alignment heads on precomputed
    features (the MAE stays frozen), as ``train`` trains the parcel tokenizer: AdamW, warm-up
    cosine, gradient-reversal ramp, clip 1.0. states: (n, H) text state per clip (or None).
    -> history of {step, loss parts}."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    train_idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.long)
    if states is not None:
        tok.align.set_text_centre(states[train_idx])
    params = [p for n, p in tok.named_parameters() if not n.startswith("features.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    x, brain = torch.from_numpy(feats.patch), torch.from_numpy(feats.brain)
    hist = []
    tok.train()
    for step in range(steps):
        pick = train_idx[torch.randperm(len(train_idx), generator=gen)[:batch_size]]
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(lr, step, warmup_steps, steps)
        out = tok.tokenize(x[pick], brain[pick], None if states is None else states[pick], words,
                           grl=grl_strength(step / steps), gen=gen)
        out.losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append({"step": step + 1, **{k: float(v.detach()) for k, v in out.losses.items()}})
    return hist


@torch.no_grad()
def evaluate_mae_tokenizer(tok, feats: ClipFeatures, idx, states=None, words=None, batch_size: int = 16,
                           seed: int = 0) -> dict:
    """Held-out diagnostics of an ``MAETokenizer`` on clips ``idx``: feature reconstruction MSE
    (brain patches), code usage (brain patches), domain-classifier accuracy, and fMRI -> text
    retrieval by scan (each scan's clips' embeddings averaged, against its descriptor state)."""
    tok.eval()
    gen = torch.Generator().manual_seed(seed)
    idx = np.asarray(idx)
    x, brain = torch.from_numpy(feats.patch[idx]), torch.from_numpy(feats.brain[idx])
    err, n, codes, acc, fe = 0.0, 0.0, [], [], []
    for i in range(0, len(idx), batch_size):
        xb, bb = x[i:i + batch_size], brain[i:i + batch_size]
        sb = None if states is None else states[torch.as_tensor(idx[i:i + batch_size])]
        out = tok.tokenize(xb, bb, sb, words, grl=0.0, gen=gen)
        w = bb.unsqueeze(-1).float()
        err += float((((out.recon - xb) ** 2) * w).sum())
        n += float(w.sum()) * xb.shape[-1]
        codes.append(out.indices[bb])
        if "domain_acc" in out.losses:
            acc.append(float(out.losses["domain_acc"]))
        fe.append(tok.align.embed_fmri(out.features, w))
    res = {"recon_mse": err / max(n, 1.0), **codebook_usage(torch.cat(codes), tok.quantiser.n_codes)}
    if acc:
        res["domain_acc"] = float(np.mean(acc))
    if states is not None:
        scans = np.asarray(feats.scans)[idx]
        uniq = sorted(set(scans))
        f = torch.cat(fe)
        fs = torch.nn.functional.normalize(torch.stack([f[torch.from_numpy(scans == s)].mean(0) for s in uniq]), dim=-1)
        first = [int(np.flatnonzero(scans == s)[0]) for s in uniq]
        ts = tok.align.embed_text(states[torch.as_tensor(idx[first])])
        res.update(retrieval(fs, ts))
    tok.train()
    return res


def feature_yardsticks(feats: ClipFeatures, train_idx, val_idx, ks=(8, 32)) -> dict:
    """Feature reconstruction MSE (brain patches of held-out clips) by the training mean
    feature and by PCA-k fitted on the training clips' brain patches -> {"mean": mse, "pca8": ...}."""
    from sklearn.decomposition import PCA

    tr = feats.patch[np.asarray(train_idx)][feats.brain[np.asarray(train_idx)]]
    va = feats.patch[np.asarray(val_idx)][feats.brain[np.asarray(val_idx)]]
    out = {"mean": float(((va - tr.mean(0)) ** 2).mean())}
    for k in ks:
        pca = PCA(min(k, tr.shape[1]), random_state=0).fit(tr)
        out[f"pca{k}"] = float(((pca.inverse_transform(pca.transform(va)) - va) ** 2).mean())
    return out
