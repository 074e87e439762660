"""fMRI-LM stage 3: instruction tuning, and zero- / few-shot answers about a scan.

fMRI-LM (Wei et al., arXiv 2511.21760, sections 3.3-4) tunes the LLM that reads fMRI on
question / answer pairs built from each cohort's labels, with the prompt
``{dataset info}{descriptors}### Question: {q}\\n### Answer:`` (``lm_answer.build_prompt``) and
several paraphrases per question, the loss on the answer tokens only; answers are the allowed
option with the highest log-likelihood (``lm_answer.answer``). Zero-shot: a question type held
out of instruction tuning; few-shot: the adapter fine-tuned on k labelled subjects per class.
(The public code takes at most one example per class for few-shot and samples among the
allowed answers instead of scoring them; here k shots per class and scoring, as the paper.)

- ``QUESTIONS``: the question types, each with paraphrases, options and the label it reads:
  sex, fluid-intelligence tertile, rest / task state, the task paradigm of the run (HCP's seven
  tasks or rest), age as a bin (the HCP young-adult release's bins 22-25 / 26-30 / 31-35 / 36+)
  and age as a number of years (22-37, the HCP young-adult range; a numeric question also
  reports the mean absolute error). ``age_bin``, ``age_years`` and ``paradigm_label`` make the
  labels. The 21 event-level states of the flat-map benchmark change within a run every few
  seconds, so a 160-frame window has no single one of them; same-subject identification needs
  two scans in one prompt, which this model (one fMRI block per sequence) does not read: both
  are left out.
- ``examples``: (window, prompt, answer) triples for the chosen windows and question types;
  ``descriptors=False`` leaves the descriptor text out (the paper's ablation).
- ``instruct_train``: AdamW on the adapter + heads for those examples (loss on the answer
  tokens); with ``run_dir`` atomic checkpoints every ``ckpt_every`` steps and exact resume.
- ``few_shot_subjects``: k subjects per class, class-balanced, disjoint from the test subjects
  and their families.
- ``evaluate``: constrained answers -> balanced accuracy with a bootstrap 95 % CI over subjects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from fmri_bench.errors import InputError
from fmri_bench.lm_answer import answer, build_prompt, check_options
from fmri_bench.paths import atomic_save
from fmri_bench.rundir import rng_state, set_rng_state

CHECKPOINT_FORMAT = "fmri_bench.fmri_lm_instruct/1"
DATASET_INFO = "Dataset: an fMRI cohort, {regions} cortical regions, TR 2 s.\n"


@dataclass(frozen=True)
class Question:
    """One question type: ``label`` names the per-window label it asks about."""

    name: str
    label: str
    options: tuple[str, ...]
    paraphrases: tuple[str, ...]
    numeric: bool = False  # options are numbers: evaluate also reports the mean absolute error


# HCP task names as they appear in run names (tfMRI_WM_LR, ...) -> the words the options use
PARADIGMS = {"REST": "rest", "WM": "working memory", "EMOTION": "emotion", "LANGUAGE": "language",
             "MOTOR": "motor", "RELATIONAL": "relational", "SOCIAL": "social", "GAMBLING": "gambling"}
AGE_BINS = ("22-25", "26-30", "31-35", "36+")  # the HCP young-adult release's age bins
AGE_YEARS = tuple(str(a) for a in range(22, 38))


QUESTIONS = {
    "sex": Question("sex", "sex", ("Male", "Female"), (
        "What is the sex of the participant?",
        "Is this scan from a male or a female participant?",
        "Report the participant's sex.")),
    "fluid": Question("fluid", "fluid_tertile", ("lower", "mean", "higher"), (
        "Is the participant's fluid intelligence lower than, about the mean of, or higher than the cohort's?",
        "Fluid intelligence of this participant relative to the cohort: lower, mean or higher?")),
    "state": Question("state", "state", ("rest", "task"), (
        "Was this scan recorded at rest or during a task?",
        "Is the participant resting or doing a task in this scan?",
        "Brain state during this scan: rest or task?")),
    "paradigm": Question("paradigm", "paradigm", tuple(PARADIGMS.values()), (
        "Which task was the participant doing in this scan (or were they at rest)?",
        "Name the paradigm of this scan.",
        "What was the participant doing during this scan?")),
    "age_bin": Question("age_bin", "age_bin", AGE_BINS, (
        "In which age range is the participant?",
        "How old is the participant: 22-25, 26-30, 31-35 or 36 and over?")),
    "age": Question("age", "age_years", AGE_YEARS, (
        "How old is the participant, in years?",
        "What is the participant's age in years?"), numeric=True),
}


def age_bin(age) -> np.ndarray:
    """Ages in years -> the HCP young-adult bins ('22-25', '26-30', '31-35', '36+'), by whole years."""
    a = np.floor(np.asarray(age, float))
    if np.any(a < 22) or np.any(~np.isfinite(a)):
        raise InputError(f"age bins start at 22 (the HCP young-adult range); got {np.nanmin(a):g}")
    return np.array(AGE_BINS)[np.searchsorted([26, 31, 36], a, side="right")]


def age_years(age) -> np.ndarray:
    """Ages -> whole years as strings ('22' ... '37'); outside 22-37 is an InputError."""
    a = np.floor(np.asarray(age, float))
    if np.any(a < 22) or np.any(a > 37) or np.any(~np.isfinite(a)):
        raise InputError("the age question answers 22-37 years (the HCP young-adult range); "
                         f"got ages {np.nanmin(a):g}-{np.nanmax(a):g}")
    return a.astype(int).astype(str)


def paradigm_label(run: str) -> str:
    """An HCP run name (rfMRI_REST1_LR, tfMRI_WM_RL, ...) -> the paradigm option ('rest', 'working memory', ...)."""
    parts = str(run).upper().replace("-", "_").split("_")
    for p in parts:
        key = "REST" if p.startswith("REST") else p
        if key in PARADIGMS:
            return PARADIGMS[key]
    raise InputError(f"run {run!r} names none of the paradigms {', '.join(PARADIGMS)}")


def check_question(name: str) -> Question:
    if name not in QUESTIONS:
        raise InputError(f"unknown question type {name!r} (known: {', '.join(QUESTIONS)})")
    q = QUESTIONS[name]
    check_options(q.options)
    return q


def tertile_labels(values, train_mask) -> np.ndarray:
    """'lower' / 'mean' / 'higher' by the tertile edges of the training subjects' values."""
    v = np.asarray(values, float)
    lo, hi = np.quantile(v[np.asarray(train_mask, bool)], [1 / 3, 2 / 3])
    return np.where(v < lo, "lower", np.where(v > hi, "higher", "mean"))


def fit_descriptors(text: str, question: str, info: str, tokenizer, max_tokens: int) -> str:
    """The descriptor text cut at a sentence end so that the whole prompt fits ``max_tokens``
    tokens of ``tokenizer``: whole sentences are dropped from the end (the FC sentences come
    first in ``descriptors.render_text``). Empty if not even one sentence fits."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
    while sentences:
        desc = ". ".join(sentences).rstrip(".") + ".\n"
        if len(tokenizer(build_prompt(question, desc, info), add_special_tokens=False)["input_ids"]) <= max_tokens:
            return desc
        sentences.pop()
    return ""


def examples(labels: dict[str, np.ndarray], texts, idx, kinds, n_regions: int, seed: int = 0,
             descriptors: bool = True, paraphrase: int | None = None, fit=None) -> list[tuple[int, str, str, str]]:
    """(window index, prompt, answer, question type) for every window in ``idx`` and question type
    in ``kinds``; the paraphrase is drawn per example from ``seed`` (or fixed: ``paraphrase``).
    ``labels``: per-window arrays keyed by ``Question.label``. ``fit=(tokenizer, max_tokens)``:
    descriptor texts are cut at sentence ends to fit (``fit_descriptors``), never mid-sentence."""
    rng = np.random.default_rng(seed)
    info = DATASET_INFO.format(regions=n_regions)
    out = []
    for k in kinds:
        q = check_question(k)
        if q.label not in labels:
            raise InputError(f"question {k!r} needs per-window labels {q.label!r}, which this data does not have")
        for i in np.asarray(idx, int):
            ans = str(labels[q.label][i])
            if ans not in q.options:
                raise InputError(f"label {ans!r} of window {i} is not one of the options {q.options}")
            j = int(rng.integers(len(q.paraphrases))) if paraphrase is None else paraphrase % len(q.paraphrases)
            desc = (texts[i].strip() + "\n") if descriptors else ""
            if desc and fit is not None:
                desc = fit_descriptors(desc, q.paraphrases[j], info, *fit)
            out.append((int(i), build_prompt(q.paraphrases[j], desc, info), ans, k))
    return out


def few_shot_subjects(subjects, classes, k: int, test_subjects, families=None, seed: int = 0) -> list[str]:
    """k subjects per class drawn from those not in ``test_subjects`` (nor in their families):
    class-balanced and test-disjoint; fewer than k in a class is an error. ``classes``: each
    subject's class (one per subject, aligned with ``subjects``)."""
    subjects, classes = np.asarray(subjects).astype(str), np.asarray(classes).astype(str)
    test = set(map(str, test_subjects))
    fam = None if families is None else np.asarray(families).astype(str)
    banned_fam = set() if fam is None else {f for s, f in zip(subjects, fam) if s in test}
    ok = np.array([s not in test and (fam is None or f not in banned_fam)
                   for s, f in zip(subjects, fam if fam is not None else subjects)])
    rng = np.random.default_rng(seed)
    out = []
    for c in sorted(set(classes)):
        pool = np.unique(subjects[ok & (classes == c)])
        if len(pool) < k:
            raise InputError(f"few-shot k={k}: class {c!r} has only {len(pool)} subjects outside the test set")
        out += sorted(rng.choice(pool, size=k, replace=False).tolist())
    return out


def balanced_accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def subject_bootstrap(y_true, y_pred, subjects, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95 % interval of the balanced accuracy over subjects drawn with replacement."""
    y_true, y_pred, subjects = map(np.asarray, (y_true, y_pred, subjects))
    uniq = np.unique(subjects)
    members = [np.flatnonzero(subjects == s) for s in uniq]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = np.concatenate([members[j] for j in rng.integers(len(uniq), size=len(uniq))])
        if len(np.unique(y_true[i])) > 1:
            boot.append(balanced_accuracy(y_true[i], y_pred[i]))
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else [float("nan")] * 2


# --- training --------------------------------------------------------------------------------
def instruct_train(model, features: torch.Tensor, exs, steps: int, batch_size: int = 4, lr: float = 2e-4,
                   seed: int = 0, run_dir=None, resume: bool = False, ckpt_every: int = 0,
                   stop_at: int | None = None, progress: bool = False, tokenizer_fp: str | None = None,
                   settings: dict | None = None, dd=None) -> list[dict]:
    """Tune ``model`` (an ``FmriLM``: its trainable adapter + heads) on ``exs`` (``examples``):
    cross-entropy on the answer tokens only (the prompt is context; the F2F / T2T terms are off).
    Batches are drawn with a seeded generator; with ``run_dir`` a checkpoint (trainable state,
    optimizer, random states, step) is written atomically every ``ckpt_every`` steps and at the
    end, and ``resume=True`` continues from it exactly. -> history [{"step", "loss"}].

    The checkpoint records the LLM's and the tokenizer's fingerprints (``tokenizer_fp``) and the
    run's settings (steps, batch size, lr, seed, a digest of the examples, and ``settings``, e.g.
    a digest of the windows); resuming with another LLM, tokenizer or settings is refused.

    dd: a ``distributed.Distributed`` (``fmri-bench lm instruct`` under torchrun): every rank
    draws the same seeded batch and takes rows r, r + N, ... of it (the batch size must divide
    by N); each backpropagates its share of the batch's answer-token loss (its token-loss sum /
    the batch's answer-token count, ``lm_train._rank_loss``) and the gradients are summed, the
    one-process gradient of the batch; the logged loss is the batch's; only rank 0 writes the
    checkpoint, and every rank resumes from it. None: one process."""
    import hashlib
    import json

    from tqdm.auto import tqdm

    from fmri_bench.distributed import Distributed
    from fmri_bench.lm_train import _rank_loss, _sum_grads, check_divisible

    dd = dd if dd is not None else Distributed()
    if not exs:
        raise InputError("no instruction examples")
    check_divisible(dd.world, batch_size=min(batch_size, len(exs)), why=f" ({len(exs)} instruction examples)")
    digest = hashlib.sha256(json.dumps([list(e) for e in exs]).encode()).hexdigest()[:16]
    settings = {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "examples": digest, **(settings or {})}
    ckpt = None if run_dir is None else os.path.join(run_dir, "instruct_checkpoint.pt")
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(ckpt) and not resume:
            raise InputError("run directory already holds an instruct checkpoint (resume, or use another)", run_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step, hist = 0, []
    if ckpt is not None and resume and os.path.exists(ckpt):
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise InputError("not an fMRI-LM instruct checkpoint", ckpt)
        if ck.get("llm") != model.llm_fingerprint:
            raise InputError("instruct checkpoint was trained with another LLM (its fingerprint differs)", ckpt)
        if ck.get("tokenizer") != tokenizer_fp:
            raise InputError("instruct checkpoint was trained with another tokenizer (its fingerprint differs)", ckpt)
        old = ck.get("settings") or {}
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in (settings or {}).items() if old.get(k) != v]
        if diff:
            raise InputError("instruct checkpoint was made with other settings (" + "; ".join(diff[:4])
                             + "): resume with the same ones, or use a new run directory", ckpt)
        model.load_trainable_state_dict(ck["trainable"], ckpt)
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"], gen)
        step, hist = int(ck["step"]), list(ck["history"])

    def save():
        obj = {"format": CHECKPOINT_FORMAT, "trainable": model.trainable_state_dict(), "optimizer": opt.state_dict(),
               "rng": rng_state(gen), "step": step, "history": hist, "llm": model.llm_fingerprint,
               "tokenizer": tokenizer_fp, "settings": dict(settings or {})}
        atomic_save(lambda tmp: torch.save(obj, tmp), ckpt)

    saved = {k: getattr(model.config, k) for k in ("f2f_weight", "t2t_weight", "f2t_weight")}
    model.config.f2f_weight, model.config.t2t_weight, model.config.f2t_weight = 0.0, 0.0, 1.0
    model.train()
    bar = tqdm(total=steps, initial=step, disable=not (progress and dd.main), desc="instruct", dynamic_ncols=True)
    try:
        while step < steps:
            pick = torch.randperm(len(exs), generator=gen)[:batch_size].tolist()
            b = [exs[i] for i in pick[dd.rank::dd.world]]  # this rank's share of the batch
            idx = torch.tensor([e[0] for e in b])
            codes = torch.zeros(len(b), features.shape[1], dtype=torch.long)  # F2F is off
            answers, prompts = [" " + e[2] for e in b], [e[1] for e in b]
            out = model.losses(features[idx], codes, answers, prompts=prompts)
            loss = out["total"] if dd.world == 1 else _rank_loss(model, out, answers, [], dd, prompts=prompts)[0]
            loss.backward()
            if dd.world > 1:
                _sum_grads(params, dd)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logged = loss.detach().double().reshape(1)
            hist.append({"step": step, "loss": float(dd.sum(logged) if dd.world > 1 else logged)})
            bar.update(1)
            if ckpt is not None and dd.main and ((ckpt_every and step % ckpt_every == 0) or step == steps):
                save()
            if stop_at is not None and step >= stop_at:
                break
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)
        bar.close()
    dd.barrier()  # rank 0's checkpoint is on disk before any rank goes on (and may resume from it)
    model.eval()
    return hist


def evaluate(model, features: torch.Tensor, exs, subjects, batch_size: int = 8, n_boot: int = 1000,
             seed: int = 0) -> dict:
    """Constrained answers for ``exs`` (one question type) -> balanced accuracy, its subject
    bootstrap 95 % CI, the predictions and the mean probability of the right answer; for a
    numeric question also the mean absolute error of the chosen number (``mae``, with a subject
    bootstrap 95 % CI ``mae_ci95``)."""
    kinds = {e[3] for e in exs}
    if len(kinds) != 1:
        raise InputError(f"evaluate one question type at a time, got {sorted(kinds)}")
    q = QUESTIONS[kinds.pop()]
    preds, p_right = [], []
    for i in range(0, len(exs), batch_size):
        b = exs[i:i + batch_size]
        res = answer(model, features[torch.tensor([e[0] for e in b])], [e[1] for e in b], q.options)
        preds += [r["answer"] for r in res]
        p_right += [r["probabilities"][e[2]] for r, e in zip(res, b)]
    return answer_summary(q, [e[2] for e in exs], preds, p_right, [subjects[e[0]] for e in exs], n_boot, seed)


def answer_summary(q: Question, y, preds, p_right, subjects, n_boot: int = 1000, seed: int = 0) -> dict:
    """Answers to one question type -> balanced accuracy, its subject-bootstrap 95 % CI, chance
    (1 / options), the mean probability of the right answer (None if not given) and, for a
    numeric question, the mean absolute error with its CI (``evaluate``'s result)."""
    out = {"balanced_accuracy": balanced_accuracy(y, preds), "ci95": subject_bootstrap(y, preds, subjects, n_boot, seed),
           "predictions": list(preds), "p_right": None if p_right is None else float(np.mean(p_right)),
           "n": len(y), "n_subjects": len(set(subjects)), "chance": 1.0 / len(q.options)}
    if q.numeric:
        out["mae"], out["mae_ci95"] = mae_with_ci(y, preds, subjects, n_boot, seed)
    return out


def mae_with_ci(y_true, y_pred, subjects, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Mean absolute error of numeric answers, and its 95 % interval over subjects drawn with replacement."""
    err = np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))
    subjects = np.asarray(subjects)
    members = [np.flatnonzero(subjects == s) for s in np.unique(subjects)]
    rng = np.random.default_rng(seed)
    boot = [err[np.concatenate([members[j] for j in rng.integers(len(members), size=len(members))])].mean()
            for _ in range(n_boot)]
    return float(err.mean()), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


# --- the yardsticks on the same shots --------------------------------------------------------
def probe_predict(X, y, train_idx, test_idx, C: float = 1.0, seed: int = 0) -> np.ndarray:
    """A linear probe on exactly the given training items (standardised features, logistic
    regression at a fixed C: a few shots leave nothing to cross-validate on) -> test predictions.
    One class in the training items: that class is predicted (the majority rule)."""
    X = np.asarray(X, float)
    return probe_fit(X[train_idx], np.asarray(y)[train_idx], C, seed)(X[test_idx])


def probe_fit(X, y, C: float = 1.0, seed: int = 0):
    """``probe_predict``'s linear probe fitted on (X, y) -> a function of test features giving
    predictions (so that large test sets can be predicted in chunks); one class: that class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(str)
    if len(np.unique(y)) < 2:
        return lambda Xt: np.full(len(Xt), y[0])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))
    clf.fit(np.asarray(X, float), y)
    return lambda Xt: clf.predict(np.asarray(Xt, float))


def pooled(features: torch.Tensor) -> np.ndarray:
    """(n, N, D) token features -> (n, D) mean over tokens (the linear probe's input)."""
    return features.float().mean(1).numpy()


def window_fc(windows: np.ndarray, lengths) -> np.ndarray:
    """Upper-triangle Fisher-z FC of each window's real frames (n, R(R-1)/2): the FC baseline."""
    out = []
    iu = None
    for w, n in zip(windows, lengths):
        x = w[: max(int(n), 3)]
        c = np.corrcoef(x.T)
        c = np.nan_to_num(c)
        iu = iu if iu is not None else np.triu_indices(len(c), 1)
        out.append(np.arctanh(np.clip(c[iu], -0.999, 0.999)))
    return np.array(out)


# --- the command -----------------------------------------------------------------------------
def read_labels(path, n: int) -> list[dict]:
    """JSONL, one record per window (in the windows file's order): ``subject``, ``text`` (the
    scan's descriptors; may be empty) and the labels the questions read (``sex``: Male/Female,
    ``state``: rest/task, ``fluid_tertile``: lower/mean/higher, ``paradigm``: rest / working
    memory / ..., ``age_bin``: 22-25 / 26-30 / 31-35 / 36+, ``age_years``: 22-37)."""
    import json

    if not os.path.isfile(path):
        raise InputError("labels file not found", path)
    recs = []
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"line {ln} is not JSON ({err.msg})", path) from None
    if len(recs) != n:
        raise InputError(f"{len(recs)} label records for {n} windows", path)
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or "subject" not in r:
            raise InputError(f"record {i + 1} has no 'subject'", path)
    return recs


@dataclass
class InstructConfig:
    """``fmri-bench lm instruct --config``: the run's inputs and settings (YAML + overrides)."""

    checkpoint: str | None = None      # fmri_lm.pt written by lm align
    windows: str | None = None         # .npy parcel windows (n, frames, parcels)
    labels: str | None = None          # JSONL, one record per window
    questions: tuple = ("sex",)
    steps: int = 50
    batch_size: int = 4
    lr: float = 2e-4
    seed: int = 0
    descriptors: bool = True
    fit_descriptors: bool = False
    llm: str | None = None
    device: str = "auto"               # auto: CUDA when present; under torchrun one rank per GPU (or CPU, gloo)


def load_instruct_config(path=None, overrides=(), **given) -> InstructConfig:
    """YAML file (or defaults) + ``key=value`` overrides + ``given`` (the command line's flags,
    None = not given) -> a checked ``InstructConfig``; one-line ``InputError`` otherwise."""
    from fmri_bench.config import read_config
    from fmri_bench.models.mae import check_keys

    d = read_config(path, overrides)
    src = str(path) if path is not None else None
    check_keys(d, InstructConfig, src, what="instruct config")
    d.update({k: v for k, v in given.items() if v is not None})
    cfg = InstructConfig(**d)
    if isinstance(cfg.questions, str):
        cfg.questions = (cfg.questions,)
    if not isinstance(cfg.questions, (list, tuple)) or not cfg.questions:
        raise InputError(f"questions must be a non-empty list of question types ({', '.join(QUESTIONS)})", src)
    cfg.questions = tuple(check_question(str(q)).name for q in cfg.questions)
    for k in ("steps", "batch_size", "seed"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "seed" else 1):
            raise InputError(f"{k} must be an integer >= {0 if k == 'seed' else 1}, got {v!r}", src)
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0:
        raise InputError(f"lr must be a number > 0, got {cfg.lr!r}", src)
    cfg.lr = float(cfg.lr)
    for k in ("descriptors", "fit_descriptors"):
        if not isinstance(getattr(cfg, k), bool):
            raise InputError(f"{k} must be true or false, got {getattr(cfg, k)!r}", src)
    for k in ("checkpoint", "windows", "labels"):
        if not getattr(cfg, k):
            raise InputError(f"no {k}: give --{k} or {k}: in the config", src)
    return cfg


def instruct(checkpoint, windows_path, labels_path, questions, run_dir, steps: int = 50, batch_size: int = 4,
             lr: float = 2e-4, seed: int = 0, descriptors: bool = True, fit_descriptors: bool = False,
             resume: bool = False, llm: str | None = None, progress: bool = True, device: str = "auto") -> dict:
    """``fmri-bench lm instruct``: tune a stage-2 model (``lm align``'s ``fmri_lm.pt``) on the
    question types ``questions`` about the windows of ``windows_path`` with ``labels_path``'s
    labels -> writes ``run_dir/instruct_checkpoint.pt`` (resumable) and ``run_dir/fmri_lm.pt``
    (readable by ``fmri-bench ask``). Every prompt is checked before any training: one longer
    than the model's text budget is refused (or, with ``fit_descriptors``, its descriptor text is
    cut at sentence ends). Under ``torchrun --nproc_per_node N`` it runs data-parallel
    (``instruct_train``'s ``dd``; rank 0 writes the files)."""
    from fmri_bench import distributed
    from fmri_bench.fmri_lm import tokenizer_inputs
    from fmri_bench.lm_answer import _check_prompt
    from fmri_bench.lm_train import load_trained, save_model

    kinds = [check_question(q).name for q in questions]
    if not kinds:
        raise InputError("no question types given")
    model, tokenizer, cfg, w, tok_fp = load_trained(checkpoint, windows_path, llm)
    recs = read_labels(labels_path, len(w))
    labels = {}
    for k in kinds:
        lab = QUESTIONS[k].label
        missing = [i + 1 for i, r in enumerate(recs) if lab not in r]
        if missing:
            raise InputError(f"question {k!r} needs {lab!r} in every record; record {missing[0]} has none", labels_path)
        labels[lab] = np.array([str(r[lab]) for r in recs])
    texts = [str(r.get("text", "")) for r in recs]
    fit = (model.tokenizer, model.config.max_text_tokens) if fit_descriptors else None
    exs = examples(labels, texts, range(len(w)), kinds, n_regions=tokenizer.config.n_parcels, seed=seed,
                   descriptors=descriptors, fit=fit)
    _check_prompt(model, [e[1] for e in exs])  # before any training
    feats, _ = tokenizer_inputs(tokenizer, torch.from_numpy(w), causal=cfg.causal_features)
    import hashlib

    windows_digest = hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()[:16]
    dd = distributed.setup(device)
    model.to(dd.device)
    hist = instruct_train(model, feats, exs, steps, batch_size, lr, seed, run_dir=run_dir, resume=resume,
                          ckpt_every=max(1, steps // 5), progress=progress, tokenizer_fp=tok_fp,
                          settings={"windows": windows_digest}, dd=dd)
    from fmri_bench.lm_train import load_checkpoint

    before = load_checkpoint(checkpoint).get("instruct") or {}  # a model tuned again keeps what it saw first
    seen = list(dict.fromkeys([*before.get("questions", []), *kinds]))
    if dd.main:
        save_model(model, os.path.join(run_dir, "fmri_lm.pt"), tok_fp, cfg,
                   instruct={"questions": seen, "steps": int(before.get("steps", 0)) + int(steps),
                             "descriptors": bool(descriptors)})
    dd.barrier()
    dd.close()
    return {"step": hist[-1]["step"] if hist else 0, "loss": hist[-1]["loss"] if hist else float("nan"),
            "examples": len(exs), "run_dir": str(run_dir)}
