"""Training the joint fMRI-text model (fMRI-LM stage 2): YAML config + overrides, resumable.

In:  parcel windows and their descriptor texts (as for the tokenizer: ``data.windows`` .npy +
     ``data.corpus`` JSONL, or the synthetic stand-in), a frozen neural tokenizer
     (``tokenizer``: a ``tokenizer.pt``; None builds an untrained one from the tiny preset, a
     pipeline check only), a frozen LLM (``llm``), and plain text for T2T (``data.t2t_text``:
     a UTF-8 file, paragraphs split at blank lines; default: the docstrings of a fixed list of
     Python standard-library modules, which ship with every Python).
Out: ``run_dir/config.yaml``, ``metrics.jsonl`` (train records: ``loss`` and its parts; eval
     records ``val_*``: F2F loss / accuracy beside its yardsticks, F2T loss, T2T perplexity of
     held-out text; step 0 is the LLM before training), ``checkpoint.pt`` (atomic; adapter +
     heads + optimizer + random states, never the frozen LLM; ``--resume`` continues exactly)
     and ``fmri_lm.pt`` (adapter + heads) at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
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
from fmri_bench.fmri_lm import FmriLM, fmri_lm_config, time_major, tokenizer_inputs
from fmri_bench.models.mae import check_keys
from fmri_bench.paths import atomic_save
from fmri_bench.rundir import RunDir, read_metrics, rng_state, set_rng_state

CHECKPOINT_FORMAT = "fmri_bench.fmri_lm/1"
OPERATIONAL_KEYS = ("log_every", "eval_every", "ckpt_every", "progress", "num_threads", "device")
# T2T default text: module docstrings of the standard library (English prose that ships offline)
STDLIB_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "decimal", "difflib",
                  "email", "fractions", "functools", "heapq", "inspect", "json", "logging", "pathlib", "pickle",
                  "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
                  "timeit", "typing", "unittest", "urllib", "zipfile")


@dataclass
class LMDataConfig:
    synthetic: bool = True
    windows: str | None = None  # .npy (n, T, R)
    corpus: str | None = None  # JSONL, one record per window: text, subject
    n_subjects: int = 16  # synthetic only
    windows_per_subject: int = 2
    val_fraction: float = 0.25  # of subjects
    t2t_text: str | None = None  # plain-text file for T2T; None: standard-library docstrings
    t2t_val_paragraphs: int = 16  # held out for perplexity


@dataclass
class LMTrainConfig:
    """Stage-2 training settings; defaults are CPU-sized."""

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    llm: str | None = None  # None: SmolLM2-135M-Instruct; or a local model path
    tokenizer: str | None = None  # tokenizer.pt; None: an untrained tiny tokenizer (pipeline check only)
    tokenizer_overrides: dict = field(default_factory=dict)  # for the untrained one
    causal_features: bool = True  # time-causal tokenizer features (no F2F leak through the input)
    batch_size: int = 4
    t2t_batch_size: int = 4
    steps: int = 50
    lr: float = 2e-4  # not stated in the paper; a common LoRA rate
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 0
    device: str = "auto"  # as pretrain: a GPU when there is one (one per rank under torchrun, NCCL), else the CPU
    log_every: int = 5
    eval_every: int = 25
    ckpt_every: int = 25
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.data, dict):
            check_keys(self.data, LMDataConfig, what="data config")
            self.data = LMDataConfig(**self.data)
        if not isinstance(self.model_overrides, dict) or not isinstance(self.tokenizer_overrides, dict):
            raise InputError("model_overrides and tokenizer_overrides must be mappings")
        if self.batch_size < 1 or self.steps < 1 or self.t2t_batch_size < 0:
            raise InputError(f"batch_size ({self.batch_size}) and steps ({self.steps}) must be >= 1, "
                             f"t2t_batch_size ({self.t2t_batch_size}) >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path=None, overrides=()) -> LMTrainConfig:
    """YAML file (or defaults) + ``key=value`` overrides (dotted keys, YAML values)."""
    d = read_config(path, overrides)
    src = None if path is None else os.fspath(path)
    check_keys(d, LMTrainConfig, src, what="fMRI-LM train config")
    cfg = LMTrainConfig(**d)
    fmri_lm_config(cfg.preset, **cfg.model_overrides)  # fail now on a bad model key
    return cfg


# --- text for T2T ----------------------------------------------------------------------------
def plain_text(path: str | None = None, min_chars: int = 80) -> list[str]:
    """Paragraphs of plain text (split at blank lines, whitespace joined, >= min_chars) from
    ``path`` or from the standard-library module docstrings of ``STDLIB_MODULES``."""
    import importlib

    if path is not None:
        if not os.path.isfile(path):
            raise InputError("T2T text file not found", path)
        try:
            docs = [Path(path).read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise InputError("T2T text is not UTF-8", path) from None
    else:
        docs = [inspect.getdoc(importlib.import_module(m)) or "" for m in STDLIB_MODULES]
    paras = [" ".join(p.split()) for d in docs for p in d.split("\n\n")]
    paras = [p for p in paras if len(p) >= min_chars]
    if len(paras) < 4:
        raise InputError(f"only {len(paras)} paragraphs of >= {min_chars} characters for T2T (need 4)", path)
    return paras


# --- data ------------------------------------------------------------------------------------
def load_tokenizer_for(cfg: LMTrainConfig, n_frames: int, n_parcels: int):
    from fmri_bench.models.tokenizer import NeuralTokenizer, tokenizer_config
    from fmri_bench.tokenizer_train import load_tokenizer

    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    tcfg = tokenizer_config("tiny", **{"n_frames": n_frames, "n_parcels": n_parcels, "llm_dim": 8,
                                       **cfg.tokenizer_overrides})
    return NeuralTokenizer(tcfg).eval()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(json.dumps(tokenizer.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(tokenizer.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def f2f_yardsticks(train_codes: torch.Tensor, val_codes: torch.Tensor, n_parcels: int, n_time: int,
                   n_codes: int) -> dict:
    """Accuracy of trivial next-time-step code predictors on held-out scans: chance (1/K), the
    most frequent training code, and 'the next code equals this one' (copy)."""
    v = time_major(val_codes, n_parcels, n_time)
    major = int(torch.bincount(train_codes.reshape(-1), minlength=n_codes).argmax())
    return {"chance": 1.0 / n_codes, "majority": float((v[:, 1:] == major).float().mean()),
            "copy": float((v[:, 1:] == v[:, :-1]).float().mean())}


@torch.no_grad()
def evaluate(model: FmriLM, feats, codes, texts, plain, batch_size: int = 8) -> dict:
    """Held-out F2F loss / accuracy, F2T loss (nats/token), T2T NLL and perplexity."""
    was = model.training
    model.eval()
    sums, n = {}, 0
    for i in range(0, len(feats), batch_size):
        out = model.losses(feats[i:i + batch_size], codes[i:i + batch_size], texts[i:i + batch_size])
        k = len(feats[i:i + batch_size])
        for key in ("f2f", "f2f_acc", "f2t"):
            if key in out:
                sums[key] = sums.get(key, 0.0) + float(out[key]) * k
        n += k
    res = {k: v / max(n, 1) for k, v in sums.items()}
    nll = model.text_nll(plain)
    res.update(t2t=nll, t2t_ppl=math.exp(nll))
    model.train(was)
    return res


# --- the loop --------------------------------------------------------------------------------
def build_model(cfg: LMTrainConfig, llm, tokenizer) -> FmriLM:
    tc = tokenizer.config
    over = {"feat_dim": tc.embed_dim, "n_parcels": tc.n_parcels, "n_time_patches": tc.n_time_patches,
            "n_codes": tokenizer.quantiser.n_codes, **cfg.model_overrides}
    torch.manual_seed(cfg.seed)
    return FmriLM(llm, fmri_lm_config(cfg.preset, **over))


def train(cfg: LMTrainConfig, run_dir=None, resume: bool = False, stop_at: int | None = None, llm=None,
          data=None, tokenizer=None, val_subjects=None) -> dict:
    """Train for ``cfg.steps`` updates -> {"step", "model", "history", "val", "val_before",
    "yardsticks", "split", "seqs_per_s"}.

    llm: a ``LoadedLM`` to use instead of loading ``cfg.llm``; data: a ``WindowData`` instead of
    ``cfg.data``; tokenizer: a ``NeuralTokenizer`` instead of ``cfg.tokenizer``.
    stop_at: stop after this step as if killed (the run resumes later). val_subjects: the
    held-out subjects (their windows are never trained on); None: ``cfg.data.val_fraction`` of
    the subjects, drawn with ``cfg.seed``.

    Runs data-parallel under ``torchrun --nproc_per_node N`` like ``fmri-bench pretrain``: each
    rank takes 1/N of every global batch (all ranks draw the same seeded picks; rank r takes rows
    r, r + N, ...; batch sizes must divide by N), gradients are averaged across ranks, and only
    rank 0 writes metrics, checkpoints and the model (and evaluates; every rank loads the
    checkpoint on resume). Averaged means: each rank backpropagates its share of the global
    batch's loss (F2F: its mean / N; F2T, T2T: its sum of token losses / the global batch's token
    count) and the shares' gradients are summed, which is the one-process gradient of the global
    batch, clipped after the sum; the logged losses are the global batches' too. LoRA dropout
    masks are drawn per rank, so with ``lora_dropout`` > 0 the numbers are not one process's.
    On other ranks the return carries no evaluation.
    """
    from fmri_bench import lm as lm_mod
    from fmri_bench.models.tokenizer import tokenizer_config
    from fmri_bench.tokenizer_train import (TokDataConfig, TokenizerTrainConfig, load_windows, split_subjects,
                                            synthetic_windows)

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dd = distributed.setup(cfg.device)
    check_divisible(dd.world, batch_size=cfg.batch_size, t2t_batch_size=cfg.t2t_batch_size)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    run = RunDir(run_dir, cfg.to_dict(), resume, ignore=OPERATIONAL_KEYS) if run_dir is not None and dd.main else None
    if tokenizer is None and cfg.tokenizer is not None:
        tokenizer = load_tokenizer_for(cfg, 0, 0)
    if data is None:
        d = cfg.data
        if d.synthetic:  # SYNTHETIC windows shaped for the tokenizer (or for tokenizer_overrides)
            tc = tokenizer.config if tokenizer is not None else tokenizer_config("tiny", **cfg.tokenizer_overrides)
            data = synthetic_windows(d.n_subjects, d.windows_per_subject, tc.n_frames, tc.n_parcels, cfg.seed)
        else:
            data = load_windows(TokenizerTrainConfig(data=TokDataConfig(synthetic=False, windows=d.windows,
                                                                        corpus=d.corpus)), 0, 0)
    if tokenizer is None:
        tokenizer = load_tokenizer_for(cfg, data.windows.shape[1], data.windows.shape[2])
    x_all = torch.from_numpy(data.windows)
    tokenizer.check_inputs(x_all[:1])
    tok_fp = tokenizer_fingerprint(tokenizer)  # before any forward (an untrained VQ initialises on its first batch)
    feats, codes = tokenizer_inputs(tokenizer, x_all, causal=cfg.causal_features)
    llm = llm if llm is not None else lm_mod.load_llm(cfg.llm)
    model = build_model(cfg, llm, tokenizer).to(dd.device)
    paras = plain_text(cfg.data.t2t_text)
    n_val_p = min(cfg.data.t2t_val_paragraphs, len(paras) // 2)
    order = np.random.default_rng(cfg.seed).permutation(len(paras))
    plain_val = [paras[i] for i in order[:n_val_p]]
    plain_tr = [paras[i] for i in order[n_val_p:]]
    if val_subjects is None:
        tr, va = split_subjects(data.subjects, cfg.data.val_fraction, cfg.seed)
    else:
        held = set(map(str, val_subjects))
        unknown = sorted(held - set(map(str, data.subjects)))
        if unknown:
            raise InputError(f"val_subjects not in the data: {', '.join(unknown[:5])}")
        va = np.array([i for i, s in enumerate(data.subjects) if str(s) in held], dtype=int)
        tr = np.array([i for i, s in enumerate(data.subjects) if str(s) not in held], dtype=int)
    if len(tr) < 1:
        raise InputError("no training windows after the subject split")
    mc = model.config
    yard = f2f_yardsticks(codes[tr], codes[va], mc.n_parcels, mc.n_time_patches, mc.n_codes) if len(va) else {}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, history = 0, []
    resume_from = dd.broadcast(None if run is None or run.resume_from is None else str(run.resume_from))
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        check_compatible(ck, model, tok_fp, resume_from)
        model.load_trainable_state_dict(ck["trainable"], resume_from)
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"], gen)
        step = int(ck["step"])
        if run is not None:
            history = [r for r in read_metrics(run.path) if r["step"] <= step]
    if run is not None:
        run.restart_metrics(history)

    def log(rec):
        history.append(rec)
        if run is not None:
            run.log(rec)

    def checkpoint():
        if run is not None:
            obj = {"format": CHECKPOINT_FORMAT, "model_config": mc.to_dict(), "trainable": model.trainable_state_dict(),
                   "optimizer": opt.state_dict(), "rng": rng_state(gen), "step": step, "train_config": cfg.to_dict(),
                   "llm": model.llm_fingerprint, "tokenizer": tok_fp}
            atomic_save(lambda tmp: torch.save(obj, tmp), run.checkpoint_path)

    texts = list(data.texts)
    fv, cv = feats[torch.from_numpy(va)], codes[torch.from_numpy(va)]
    tv = [texts[i] for i in va]
    val_before = {}
    if step == 0 and len(va) and dd.main:
        val_before = evaluate(model, fv, cv, tv, plain_val)
        log({"step": 0, **{f"val_{k}": v for k, v in val_before.items()}, **{f"yard_{k}": v for k, v in yard.items()}})

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and dd.main), desc="fmri-lm",
               dynamic_ncols=True)
    window, n_win, t0, seqs_s, val = {}, 0, time.perf_counter(), float("nan"), {}
    model.train()
    b = min(cfg.batch_size, len(tr))
    check_divisible(dd.world, batch_size=b, t2t_batch_size=min(cfg.t2t_batch_size, len(plain_tr)),
                    why=f" ({len(tr)} training windows, {len(plain_tr)} T2T paragraphs)")
    while step < cfg.steps:
        pick = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)[:b]]
        ppick = torch.randperm(len(plain_tr), generator=gen)[:cfg.t2t_batch_size].tolist()
        lr = warmup_cosine(cfg.lr, step, cfg.warmup_steps, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        mine, pmine = pick[dd.rank::dd.world], ppick[dd.rank::dd.world]  # this rank's share of the global batch
        descs, plain = [texts[i] for i in mine.tolist()], [plain_tr[i] for i in pmine]
        out = model.losses(feats[mine], codes[mine], descs, plain)
        loss, shares = (out["total"], out) if dd.world == 1 else _rank_loss(model, out, descs, plain, dd)
        loss.backward()
        if dd.world > 1:
            _sum_grads(params, dd)  # sum of the ranks' shares: the one-process gradient of the global batch
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        for k, v in shares.items():
            window[k] = window.get(k, 0.0) + float(v.detach())
        n_win += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            if dd.world > 1:  # the ranks' shares summed: the global batches' losses, as one process logs them
                keys = sorted(window)
                tot = dd.sum(torch.tensor([window[k] for k in keys], dtype=torch.float64, device=dd.device))
                window = dict(zip(keys, tot.tolist()))
            seqs_s = n_win * (b + len(ppick)) / (time.perf_counter() - t0)
            rec = {"step": step, "loss": window["total"] / n_win, "lr": lr, "seqs_s": seqs_s}
            rec.update({k: v / n_win for k, v in window.items() if k != "total"})
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            window, n_win, t0 = {}, 0, time.perf_counter()
        bar.update(1)
        if len(va) and dd.main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            val = evaluate(model, fv, cv, tv, plain_val)
            log({"step": step, **{f"val_{k}": v for k, v in val.items()}})
            t0 = time.perf_counter()
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            checkpoint()
        if stop_at is not None and step >= stop_at:
            break
    bar.close()
    if run is not None and step == cfg.steps:
        save_model(model, run.path / "fmri_lm.pt", tok_fp, cfg)
    dd.barrier()
    dd.close()
    return {"step": step, "model": model, "history": history, "val": val, "val_before": val_before,
            "yardsticks": yard, "split": (tr, va), "seqs_per_s": seqs_s}


def check_divisible(world: int, why: str = "", **sizes) -> None:
    """InputError naming the first global batch size (setting=value) that ``world`` ranks cannot
    split evenly."""
    for name, n in sizes.items():
        if n % world:
            raise InputError(f"{name} {n} is not divisible by the {world} ranks{why}")


def _rank_loss(model: FmriLM, out: dict, descs: list[str], plain: list[str], dd,
               prompts: list[str] | None = None) -> tuple[torch.Tensor, dict]:
    """This rank's share of the global batch's loss -> (loss to backpropagate, shares of the
    logged values); summed over ranks, both are the one-process values of the global batch.

    Convention: the one-process loss is F2F (mean over the batch's targets) + F2T and T2T (each a
    mean over the batch's labelled text tokens). F2F has the same number of targets per window
    and every rank the same number of windows, so its share is the rank's mean / world. The text
    losses' shares are the rank's sum of token losses / the global token count (its mean x its
    tokens / all ranks' tokens, the counts all-reduced first), since the ranks' texts differ in
    length. Gradients are then SUM-all-reduced (``_sum_grads``). prompts: the context between
    the scan and each text (stage 3: the question; no loss on it)."""
    c = model.config
    w = dd.world
    shares = {k: out[k] / w for k in ("f2f", "f2f_acc") if k in out}
    loss = c.f2f_weight * shares["f2f"] if "f2f" in out else torch.zeros((), device=dd.device)
    n = torch.zeros(2, dtype=torch.float64, device=dd.device)
    if "f2t" in out:
        n[0] = int((model.layout(descs, with_fmri=True, prompts=prompts).labels[:, 1:] != -100).sum())
    if "t2t" in out:
        n[1] = int((model.layout(plain, with_fmri=False).labels[:, 1:] != -100).sum())
    total = dd.sum(n.clone())
    for j, (key, weight) in enumerate((("f2t", c.f2t_weight), ("t2t", c.t2t_weight))):
        if key in out:
            shares[key] = out[key] * float(n[j] / total[j].clamp_min(1))
            loss = loss + weight * shares[key]
    shares["total"] = loss
    return loss, shares


def _sum_grads(params: list, dd) -> None:
    """In place: each trainable parameter's gradient summed over ranks (one flat all-reduce per
    dtype). A parameter with no gradient on any rank keeps none, as in one process; one with a
    gradient on some rank only counts zero on the others."""
    has = dd.sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dd.device))
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in live}, key=str):
        group = [p for p in live if p.grad.dtype == dtype]
        flat = dd.sum(torch.cat([p.grad.reshape(-1) for p in group]))
        i = 0
        for p in group:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
            i += p.numel()


# --- files -----------------------------------------------------------------------------------
def load_checkpoint(path) -> dict:
    """A stage-2 checkpoint or final model file -> its dict (InputError if it is not one)."""
    if not os.path.isfile(path):
        raise InputError("no such fMRI-LM checkpoint", path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"cannot read checkpoint ({type(err).__name__})", path) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError("not an fMRI-LM checkpoint", path)
    return ck


def check_compatible(ck: dict, model: FmriLM, tokenizer_fp: str | None, path) -> None:
    """Refuse a checkpoint made with another LLM or another tokenizer."""
    if ck.get("llm") != model.llm_fingerprint:
        raise InputError("checkpoint was trained with another LLM (its fingerprint differs from the loaded one)", path)
    if tokenizer_fp is not None and ck.get("tokenizer") != tokenizer_fp:
        raise InputError("checkpoint was trained with another tokenizer (its fingerprint differs)", path)


def save_model(model: FmriLM, path, tokenizer_fp: str, cfg: LMTrainConfig | None = None,
               instruct: dict | None = None) -> None:
    """The adapter + heads, configs and fingerprints (not the frozen LLM), atomically. ``instruct``:
    what stage 3 tuned the model on (question types, steps, descriptors), which ``lm evaluate``
    reads to tell tuned questions from zero-shot ones."""
    obj = {"format": CHECKPOINT_FORMAT, "model_config": model.config.to_dict(), "trainable": model.trainable_state_dict(),
           "llm": model.llm_fingerprint, "tokenizer": tokenizer_fp, "train_config": cfg.to_dict() if cfg else None,
           "instruct": instruct}
    atomic_save(lambda tmp: torch.save(obj, tmp), path)


def load_model(path, llm, tokenizer_fp: str | None = None) -> FmriLM:
    """An FmriLM on ``llm`` (a LoadedLM) with the adapter + heads of ``path``."""
    from fmri_bench.fmri_lm import FmriLMConfig

    ck = load_checkpoint(path)
    model = FmriLM(llm, FmriLMConfig(**ck["model_config"]))
    check_compatible(ck, model, tokenizer_fp, path)
    model.load_trainable_state_dict(ck["trainable"], path)
    return model.eval()


def ask(checkpoint, windows_path, question: str, options, descriptors: str = "", dataset_info: str = "",
        llm: str | None = None, atlas: str | None = "mmp", networks: bool = False, tr: float | None = None) -> dict:
    """Ask a trained fMRI-LM about one scan -> {"answer", "probabilities", "windows"}.

    windows_path: a ``.npy`` of the scan's parcel windows, (n, T, R) or one window (T, R), as
    ``fmri_bench.parcels.model_windows`` gives them, or a run file (CIFTI / GIFTI / NIfTI),
    parcellated here (``scan_windows``: atlas, networks, tr). The tokenizer and the LLM are the
    ones the checkpoint was trained with (``llm`` overrides the LLM's location; a different LLM
    is refused). With several windows the option probabilities are averaged over them.
    """
    from fmri_bench.lm_answer import answer, build_prompt, check_options

    opts = check_options(options)
    model, tokenizer, cfg, w, _ = load_trained(checkpoint, windows_path, llm, atlas=atlas, networks=networks, tr=tr)
    feats, _ = tokenizer_inputs(tokenizer, torch.from_numpy(w), causal=cfg.causal_features)
    prompt = build_prompt(question, descriptors, dataset_info)
    res = answer(model, feats, [prompt] * len(feats), opts)
    probs = {o: float(np.mean([r["probabilities"][o] for r in res])) for o in opts}
    return {"answer": max(probs, key=probs.get), "probabilities": probs, "windows": len(feats)}


def load_trained(checkpoint, windows_path, llm: str | None = None, atlas: str | None = "mmp",
                 networks: bool = False, tr: float | None = None):
    """A model file written by ``lm align`` (or ``lm instruct``) and a scan's windows ->
    (FmriLM with its adapter, its tokenizer, its LMTrainConfig, the windows (n, T, R), the
    tokenizer's fingerprint). The windows are checked against the tokenizer before the LLM is
    loaded; ``llm`` overrides where the LLM is now; another LLM or tokenizer is refused."""
    from fmri_bench import lm as lm_mod

    ck = load_checkpoint(checkpoint)
    if not ck.get("train_config"):
        raise InputError("checkpoint holds no training config (not written by lm align)", checkpoint)
    cfg = LMTrainConfig(**ck["train_config"])
    tokenizer = load_tokenizer_for(cfg, *_trained_shape(ck))  # the file, or the same untrained one
    fp = tokenizer_fingerprint(tokenizer)  # before any forward (an untrained VQ initialises on its first batch)
    w = scan_windows(windows_path, tokenizer, atlas=atlas, networks=networks, tr=tr)
    model = load_model(checkpoint, lm_mod.load_llm(llm if llm is not None else cfg.llm), fp)
    return model, tokenizer, cfg, w, fp


def scan_windows(path, tokenizer, atlas: str | None = "mmp", networks: bool = False,
                 tr: float | None = None) -> np.ndarray:
    """A scan for the model -> float32 (n, T, R) windows checked against the tokenizer.

    ``.npy``: parcel windows as they are (``read_windows``). Any other file is a run (CIFTI /
    GIFTI / NIfTI, ``fmri_bench.parcels.parcel_series``) parcellated with ``atlas`` (None: the
    default of the file's space; tr overrides the header's), summarised to Yeo-7 network x
    hemisphere regions with ``networks`` (the 14 regions of chapters 07-08; subcortical
    structures are left out there), then the model input of ``parcels.model_windows``: TR 2 s,
    robust z per parcel, consecutive windows of the tokenizer's length (a shorter run: one
    zero-padded window when it has a quarter of it)."""
    from fmri_bench import parcels

    if str(path).endswith(".npy"):
        return read_windows(path, tokenizer)
    if not os.path.isfile(path):
        raise InputError("scan file not found", path)
    series = parcels.parcel_series(path, atlas, tr)
    if networks:
        keep = [j for j, n in enumerate(series.networks) if n != "Subcortical"]
        series = dataclasses.replace(series, data=series.data[:, keep], labels=[series.labels[j] for j in keep],
                                     networks=[series.networks[j] for j in keep])
        series = parcels.network_series(series)
    tc = tokenizer.config
    w = parcels.model_windows(series, length=tc.n_frames)
    if not len(w):
        raise InputError(f"run too short for one window: {len(series.data)} frames at TR {series.tr:g} s, the model "
                         f"reads {tc.n_frames} frames at TR 2 s (at least {max(1, tc.n_frames // 4)})", path)
    if w.shape[2] != tc.n_parcels:
        raise InputError(f"run gives {w.shape[2]} regions ({series.atlas}{', networks' if networks else ''}), the model "
                         f"reads {tc.n_parcels}: use the atlas (--atlas / --networks) it was trained with", path)
    return w


def read_windows(path, tokenizer) -> np.ndarray:
    """A ``.npy`` of parcel windows, (n, T, R) or one (T, R), checked against the tokenizer's
    frames x parcels -> float32 (n, T, R)."""
    if not os.path.isfile(path):
        raise InputError("scan file not found", path)
    try:
        w = np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"cannot read parcel windows ({type(err).__name__})", path) from None
    w = w[None] if w.ndim == 2 else w
    if w.ndim != 3 or not np.isfinite(w).all():
        raise InputError(f"parcel windows must be finite (n, frames, parcels) or (frames, parcels), got shape {w.shape}",
                         path)
    tc = tokenizer.config
    if (w.shape[1], w.shape[2]) != (tc.n_frames, tc.n_parcels):
        raise InputError(f"scan has windows of {w.shape[1]} frames x {w.shape[2]} parcels, the model reads "
                         f"{tc.n_frames} x {tc.n_parcels}", path)
    return w.astype(np.float32)


def _trained_shape(ck: dict) -> tuple[int, int]:
    """(frames, parcels) of an untrained tokenizer rebuilt from a checkpoint's training config."""
    from fmri_bench.models.tokenizer import tokenizer_config

    t = tokenizer_config("tiny", **ck["train_config"].get("tokenizer_overrides", {}))
    return t.n_frames, t.n_parcels
