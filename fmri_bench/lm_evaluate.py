"""``fmri-bench lm evaluate``: a trained fMRI-LM answers questions about the test subjects' scans.

In: a model file written by ``lm instruct`` (or ``lm align``), the folder ``lm windows`` wrote
(``test/``: the windows, labels and corpus of the test subjects; ``fit/``: those of the train and
val subjects, which fit the yardsticks) and the question types (default: every type whose label
the data carry). Out: one results table (``<out>.json`` + ``<out>.md``, written atomically after
everything is computed) with, per question, the constrained answers' balanced accuracy and a
95 % CI over test subjects drawn with replacement, beside its yardsticks on the same test windows:

- chance: 1 / the number of classes the test windows hold (any constant or random answer's
  balanced accuracy);
- the majority class of the fit windows, given to every test window (the trivial predictor);
- a linear probe on the tokenizer's pooled features, fitted on the fit windows
  (``lm_instruct.probe_fit``: standardised, logistic regression at C = 1);
- the FC baseline: the same probe on each window's Fisher-z region FC (fitted on at most
  ``fc_max_fit`` fit windows drawn with the seed, so that memory stays bounded at 360 parcels:
  64,620 edges a window);
- for a numeric question (age in years) also the mean absolute error, with the fit windows'
  mean age as its trivial predictor.

A question in the model's instruction tuning (``fmri_lm.pt`` records which) is marked "tuned";
any other is "zero-shot" (fMRI-LM, arXiv 2511.21760, section 4: a question type held out of
instruction tuning). Each question ends in a verdict sentence read from the intervals: the LLM
is above / below a yardstick only when their 95 % intervals do not overlap. The rows carry the
data's source (``split.json``'s ``source``: ``synthetic`` for the simulated cohort, else ``real``).
Few-shot adaptation (k labelled subjects per class) is chapter 08's code, not this command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fmri_bench.errors import InputError


def _part(data: Path, part: str, tokenizer, w: np.ndarray | None = None) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """``data/part/`` -> (windows (n, T, R), label records, real frames per window); ``w``: the
    part's windows when they are already read (checked against the tokenizer)."""
    from fmri_bench.lm_instruct import read_labels
    from fmri_bench.lm_train import read_windows

    folder = data / part
    for name in ("windows.npy", "labels.jsonl", "corpus.jsonl"):
        if not (folder / name).is_file():
            raise InputError(f"no {part}/{name}: give the folder `fmri-bench lm windows --out` wrote", data)
    w = read_windows(folder / "windows.npy", tokenizer) if w is None else w
    recs = read_labels(folder / "labels.jsonl", len(w))
    corpus = [json.loads(x) for x in (folder / "corpus.jsonl").read_text().splitlines() if x.strip()]
    if len(corpus) != len(w):
        raise InputError(f"{len(corpus)} corpus records for {len(w)} windows", folder / "corpus.jsonl")
    frames = np.array([int(c.get("frames", w.shape[1])) for c in corpus])
    return w, recs, frames


def _pooled_features(tokenizer, windows: np.ndarray, causal: bool, batch_size: int = 16):
    """Pooled tokenizer features (n, D), computed in batches (the token features are not kept)."""
    from fmri_bench.fmri_lm import tokenizer_inputs
    from fmri_bench.lm_instruct import pooled

    with torch.no_grad():
        return np.concatenate([pooled(tokenizer_inputs(tokenizer, torch.from_numpy(windows[i:i + batch_size]),
                                                       causal=causal)[0]) for i in range(0, len(windows), batch_size)])


def interval_verdict(a: list[float], b: list[float]) -> str:
    """'above' / 'below' / 'not told from': interval a = [lo, hi] against interval b."""
    if a[0] > b[1]:
        return "above"
    if a[1] < b[0]:
        return "below"
    return "not told from"


def lm_evaluate(checkpoint, data, out, questions=None, descriptors: bool = True, fit_descriptors: bool = False,
                llm: str | None = None, n_boot: int = 1000, seed: int = 0, batch_size: int = 8,
                fc_max_fit: int = 2000, progress: bool = True, device: str = "auto") -> dict:
    """``fmri-bench lm evaluate`` (see the module docstring) -> {"rows", "verdicts", "json", "md"}.
    device: where the LLM answers ("auto": CUDA when present; the tokenizer features stay on the CPU)."""
    from tqdm.auto import tqdm

    from fmri_bench import book
    from fmri_bench.lm_answer import _check_prompt, answer
    from fmri_bench.lm_instruct import (
        DATASET_INFO, QUESTIONS, answer_summary, check_question, examples, mae_with_ci, pooled, probe_fit, window_fc,
    )
    from fmri_bench.lm_train import load_checkpoint, load_trained

    data, out = Path(data), Path(out)
    if out.suffix != ".json":
        raise InputError("--out is the results table's .json path (its .md is written beside it)", out)
    if not (data / "test" / "windows.npy").is_file():
        raise InputError("no test/windows.npy: give the folder `fmri-bench lm windows --out` wrote", data)
    tuned = set((load_checkpoint(checkpoint).get("instruct") or {}).get("questions", []))
    model, tokenizer, cfg, w_test, _ = load_trained(checkpoint, data / "test" / "windows.npy", llm)
    model.to(torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device))
    _, test, frames_test = _part(data, "test", tokenizer, w_test)
    w_fit, fit, frames_fit = _part(data, "fit", tokenizer)
    if not test or not fit:
        raise InputError("the test or the fit part holds no windows", data)

    def has(recs, lab):
        return all(lab in r for r in recs)

    if questions is None:
        kinds = [k for k, q in QUESTIONS.items() if has(test, q.label) and has(fit, q.label)]
        if not kinds:
            raise InputError("the windows carry none of the labels a question reads", data / "test" / "labels.jsonl")
    else:
        kinds = [check_question(str(k)).name for k in questions]
        for k in kinds:
            for part, recs in (("test", test), ("fit", fit)):
                if not has(recs, QUESTIONS[k].label):
                    raise InputError(f"question {k!r} needs {QUESTIONS[k].label!r} in every {part} record",
                                     data / part / "labels.jsonl")
    try:
        source = json.loads((data / "split.json").read_text()).get("source", "unknown")
    except (OSError, json.JSONDecodeError):
        source = "unknown"
    subj = np.array([str(r["subject"]) for r in test])
    labels = {QUESTIONS[k].label: np.array([str(r[QUESTIONS[k].label]) for r in test]) for k in kinds}
    fit_labels = {QUESTIONS[k].label: np.array([str(r[QUESTIONS[k].label]) for r in fit]) for k in kinds}
    texts = [str(r.get("text", "")) for r in test]
    fit_arg = (model.tokenizer, model.config.max_text_tokens) if fit_descriptors else None
    exs = examples(labels, texts, range(len(test)), kinds, n_regions=tokenizer.config.n_parcels, seed=seed,
                   descriptors=descriptors, fit=fit_arg)
    _check_prompt(model, [e[1] for e in exs])  # every prompt fits before any answering

    # the LLM's constrained answers, window batch by window batch (token features are not kept)
    preds = {k: [None] * len(test) for k in kinds}
    p_right = {k: [None] * len(test) for k in kinds}
    by_window: dict[int, list] = {}
    for e in exs:
        by_window.setdefault(e[0], []).append(e)
    from fmri_bench.fmri_lm import tokenizer_inputs

    bar = tqdm(total=len(test), disable=not progress, desc="answering", dynamic_ncols=True)
    pooled_test = []
    with torch.no_grad():
        for i in range(0, len(test), batch_size):
            feats, _ = tokenizer_inputs(tokenizer, torch.from_numpy(w_test[i:i + batch_size]), causal=cfg.causal_features)
            pooled_test.append(pooled(feats))
            for k in kinds:
                b = [e for j in range(i, min(i + batch_size, len(test))) for e in by_window[j] if e[3] == k]
                res = answer(model, feats[torch.tensor([e[0] - i for e in b])], [e[1] for e in b], QUESTIONS[k].options)
                for e, r in zip(b, res):
                    preds[k][e[0]], p_right[k][e[0]] = r["answer"], r["probabilities"][e[2]]
            bar.update(min(batch_size, len(test) - i))
    bar.close()
    pooled_test = np.concatenate(pooled_test)
    pooled_fit = _pooled_features(tokenizer, w_fit, cfg.causal_features)
    rng = np.random.default_rng(seed)
    fc_pick = np.sort(rng.choice(len(fit), size=min(fc_max_fit, len(fit)), replace=False))
    fc_fit = window_fc(w_fit[fc_pick], frames_fit[fc_pick])

    def fc_predict(clf):
        return np.concatenate([clf(window_fc(w_test[i:i + 256], frames_test[i:i + 256]))
                               for i in range(0, len(test), 256)])

    llm_name = f"fmri-lm ({'SmolLM2-135M-Instruct' if cfg.llm is None else Path(str(cfg.llm)).name})"
    rows, verdicts = [], []
    for k in kinds:
        q, y, yf = QUESTIONS[k], labels[QUESTIONS[k].label], fit_labels[QUESTIONS[k].label]
        how = "tuned: in the model's instruction tuning" if k in tuned else "zero-shot: held out of instruction tuning"
        vals, counts = np.unique(yf, return_counts=True)
        major = str(vals[counts.argmax()])
        methods = [
            (llm_name, preds[k], how, p_right[k]),
            ("linear probe: tokenizer features", probe_fit(pooled_fit, yf, seed=seed)(pooled_test),
             f"fitted on {len(fit)} fit windows", None),
            ("FC baseline: region FC", fc_predict(probe_fit(fc_fit, yf[fc_pick], seed=seed)),
             f"fitted on {len(fc_pick)} fit windows", None),
            ("majority class of the fit windows", np.full(len(test), major), f"always {major!r}", None),
        ]
        q_rows = []
        for name, pred, note, pr in methods:
            s = answer_summary(q, y, pred, pr, subj, n_boot, seed)
            row = {"task": k, "method": name, "mean %": round(100 * s["balanced_accuracy"], 2),
                   "95% CI": [round(100 * c, 1) for c in s["ci95"]], "n test windows": s["n"],
                   "n test subjects": s["n_subjects"], "note": note, "source": source}
            if q.numeric:
                row["MAE years"], row["MAE 95% CI"] = round(s["mae"], 2), [round(c, 2) for c in s["mae_ci95"]]
            q_rows.append(row)
        if q.numeric:
            mean_age = float(np.mean(yf.astype(float)))
            mae, ci = mae_with_ci(y.astype(float), np.full(len(y), mean_age), subj, n_boot, seed)
            q_rows.append({"task": k, "method": "mean age of the fit windows", "mean %": None, "95% CI": None,
                           "n test windows": len(y), "n test subjects": len(set(subj)),
                           "note": f"always {mean_age:.1f} years", "source": source, "MAE years": round(mae, 2),
                           "MAE 95% CI": [round(c, 2) for c in ci]})
        c = 100 / len(np.unique(y))
        q_rows.append({"task": k, "method": "chance", "mean %": c, "95% CI": [c, c], "n test windows": len(y),
                       "n test subjects": len(set(subj)), "note": "balanced accuracy of any constant or random answer",
                       "source": source})
        rows += q_rows
        lm_row = q_rows[0]
        parts = [f"{interval_verdict(lm_row['95% CI'], o['95% CI'])} {o['method']} ({o['mean %']:.1f} %)"
                 for o in q_rows[1:] if o["95% CI"] is not None]
        verdicts.append(f"{k} ({how.split(':')[0]}, {source} data): the LLM {lm_row['mean %']:.1f} % "
                        f"[{lm_row['95% CI'][0]:.1f}, {lm_row['95% CI'][1]:.1f}] is " + "; ".join(parts) + ".")
    meta = {"data": str(data), "source": source, "synthetic": source == "synthetic", "made_by": "fmri-bench lm evaluate", "checkpoint": str(checkpoint), "llm": cfg.llm,
            "questions": kinds, "tuned questions": sorted(tuned), "descriptors": descriptors, "seed": seed,
            "n_boot": n_boot, "test subjects": len(set(subj)), "fit windows": len(fit), "verdicts": verdicts,
            "dataset info": DATASET_INFO.format(regions=tokenizer.config.n_parcels).strip()}
    table = book.save_results(out.stem, rows, out_dir=out.parent, meta=meta)
    return {"rows": rows, "verdicts": verdicts, "json": str(table.json_path), "md": str(table.md_path)}
