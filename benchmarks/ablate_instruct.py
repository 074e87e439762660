"""fMRI-LM stage-3 ablations on the synthetic cohort: LoRA vs a frozen LLM, and descriptors in
the prompt vs none (retrained without them, the paper's ablation), on the same data, split,
tokenizer, shots and test subjects. All numbers SYNTHETIC.

The setting is chapter 08's (``notebooks/08_zero_few_shot.ipynb``), run once per variant:
parcel series summarised to 14 regions (Yeo-7 x hemisphere), windows of ``--window`` points, a
small tokenizer trained here on the training subjects (reconstruction only), SmolLM2-135M-Instruct
(or ``--llm tiny``: a tiny random Llama, a pipeline check). Per variant:

1. instruction tuning on the rest / task question (training subjects), then its balanced accuracy
   on the test subjects' windows;
2. from that state, few-shot tuning on exactly ``--k`` subjects per sex (class-balanced, outside
   the test subjects and their families: ``lm_instruct.few_shot_subjects``), then the sex
   question on the test subjects.

Variants (fMRI-LM, Wei et al., arXiv 2511.21760, ablations): ``lora`` (r 8, alpha 16 on the
attention and MLP projections; adapter + heads trained), ``frozen`` (the LLM frozen: only the
fMRI adapter and heads are trained), ``lora, no descriptors`` (tuned and asked without the
descriptor text), ``flatmap`` (LoRA as ``lora``, but the LLM reads the flat-map MAE encoder as its
tokenizer: the frozen tiny MAE's patch features of the 16-frame flat-map clip of the same run
nearest each window's start, every brain patch a token; the parcel tokenizer's window spans 64 x
2 s, the clip 16 frames, so the two read the same runs, not the same seconds). Yardsticks on the
same shots / windows: chance (50 %), a linear probe on the tokenizer features (and on the pooled
MAE features), the run-length-only probe for the state question (rest and task runs differ in
length). Balanced accuracy with a subject-bootstrap 95 % CI.

Last line, machine-readable: ``ablate_instruct data=synthetic llm=... k=... state_lora=...
state_frozen=... state_nodesc=... state_flatmap=... sex_lora=... sex_frozen=... sex_nodesc=... sex_flatmap=...
sex_probe=... state_runlength=... sex_flatprobe=... state_flatprobe=... seconds=...`` (balanced accuracies in %).

Run: ``.venv/bin/python benchmarks/ablate_instruct.py [--llm tiny] [--cohort smoke]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from fmri_bench import descriptors as D
from fmri_bench import lm
from fmri_bench import lm_instruct as I
from fmri_bench import parcels as P
from fmri_bench import tokenizer_train as tt
from fmri_bench.fmri_lm import FmriLM, fmri_lm_config, tokenizer_inputs
from fmri_bench.harness.datasets import pretraining_split
from fmri_bench.synth import ensure_cohort

VARIANTS = {"lora": dict(finetune="lora", descriptors=True), "frozen": dict(finetune="frozen", descriptors=True),
            "nodesc": dict(finetune="lora", descriptors=False),
            "flatmap": dict(finetune="lora", descriptors=True, features="flat")}


def flatmap_features(a, cohort, scans, starts_s):
    """The flat-map MAE encoder as the tokenizer: for each window, the frozen tiny MAE's patch
    features (chapters 02 / 06: 2000 steps at batch 16, base lr 1.6e-2, cached; ``--mae-steps``)
    of the 16-frame flat-map clip of the same run whose start is nearest the window's start,
    brain patches only (the fs_LR mask is the same for every clip) -> (n, brain patches, D)."""
    from fmri_bench import harness
    from fmri_bench.harness.features import EncoderExtractor, extract, load_encoder
    from fmri_bench.harness.tasks import task_clips
    from fmri_bench.tokenizer_train import scan_of_shard_key
    from fmri_bench.train import pretrained_model

    ckpt = pretrained_model(cohort, steps=a.mae_steps, batch_size=16, base_lr=1.6e-2, seed=a.seed)
    data = harness.load_dataset(cohort)
    clips = task_clips("sex", data)  # consecutive 16-frame clips of every rest and task run
    tr = {r.key: r.tr for r in data.runs}
    keys = np.array([scan_of_shard_key(k) for k in clips.run_keys])
    t_clip = np.array([st * tr[k] for st, k in zip(clips.starts, clips.run_keys)])
    pick = []
    for scan, t0 in zip(scans, starts_s):
        idx = np.flatnonzero(keys == scan)
        if not len(idx):
            raise SystemExit(f"no flat-map clips for scan {scan}")
        pick.append(int(idx[np.argmin(np.abs(t_clip[idx] - t0))]))
    uniq = np.unique(pick)
    keep = np.zeros(len(clips), bool)
    keep[uniq] = True
    f = extract(clips.subset(keep), data, {"mae": EncoderExtractor(load_encoder(ckpt), ("patch", "brain"))},
                batch_size=8)["mae"]
    patch, brain = np.asarray(f.arrays["patch"], np.float32), np.asarray(f.arrays["brain"]) > 0.5
    if not (brain == brain[0]).all():
        raise SystemExit("flat-map clips with different brain masks")
    rows = np.searchsorted(uniq, pick)
    return torch.from_numpy(patch[rows][:, brain[0]])


def prepare(a):
    """Chapter 08's windows, labels, test subjects and tokenizer features."""
    cohort = ensure_cohort(a.cohort, seed=a.seed)
    part = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"subject": str}).set_index("subject")
    series = P.cohort_series(cohort)
    split = pretraining_split(cohort, seed=a.seed)
    train_subjects = sorted(s for s, v in split.items() if v == "train")
    records = D.describe(series, train_subjects, seed=a.seed)
    data = tt.corpus_windows([P.network_series(s) for s in series], records, length=a.window)
    subj = np.asarray(data.subjects)
    keep = np.unique(np.concatenate([np.flatnonzero(subj == s)[np.linspace(0, (subj == s).sum() - 1,
                                                                           a.windows_per_subject).astype(int)]
                                     for s in np.unique(subj)]))
    # window j of a run starts j x window x 2 s in (consecutive windows at TR 2 s)
    nth = np.array([data.scans[:i].count(sc) for i, sc in enumerate(data.scans)])
    starts_s = nth[keep] * a.window * 2.0
    windows, lengths, subj = data.windows[keep], data.lengths[keep], subj[keep]
    texts, scans = [data.texts[i] for i in keep], [data.scans[i] for i in keep]
    labels = {"sex": np.where(part.loc[subj, "sex"].to_numpy() == "M", "Male", "Female"),
              "state": np.array(["rest" if "rfMRI" in s else "task" for s in scans])}
    rng = np.random.default_rng(a.seed)
    held = sorted(set(split) - set(train_subjects))
    sex_of = part["sex"]
    test_subjects = sorted(sum([sorted(rng.choice([s for s in held if sex_of[s] == c], a.test_per_class,
                                                  replace=False)) for c in ("F", "M")], []))
    tok_cfg = tt.load_config(None, [f"model_overrides={{patch_len: {a.patch_len}, dead_code_threshold: 1.0}}",
                                    f"steps={a.tok_steps}", "batch_size=8", "lr=1e-3", "llm=none", f"seed={a.seed}",
                                    f"eval_every={a.tok_steps}", f"ckpt_every={a.tok_steps}", "progress=false"])
    wd = tt.WindowData(windows, texts, list(subj), np.full(len(windows), np.nan), lengths, scans)
    tokenizer = tt.train(tok_cfg, None, data=wd, val_subjects=test_subjects)["model"].eval()
    feats, _ = tokenizer_inputs(tokenizer, torch.from_numpy(windows))
    flat = flatmap_features(a, cohort, scans, starts_s) if "flatmap" in a.variants else None
    subjects_all = sorted(set(subj))
    return dict(part=part, subj=subj, texts=texts, labels=labels, lengths=lengths, feats=feats, tokenizer=tokenizer,
                flat=flat,
                test_subjects=test_subjects, is_test=np.isin(subj, test_subjects),
                is_train=np.isin(subj, train_subjects), subjects_all=subjects_all,
                sub_sex=[sex_of[s] for s in subjects_all], fam=[part.loc[s, "family_id"] for s in subjects_all])


def load(a):
    if a.llm == "tiny":
        return lm.tiny_random_llm(words=lm.TINY_WORDS + tuple("What is the of participant ? . , : an fMRI cohort "
                                                               "regions".split()))
    return lm.load_llm(a.llm)


def run_variant(a, d, name, shots):
    v = VARIANTS[name]
    tc = d["tokenizer"].config
    torch.manual_seed(a.seed)
    feats = d["flat"] if v.get("features") == "flat" else d["feats"]
    # the flat-map MAE's tokens: one 16-frame time patch x the brain patches (no time axis to be causal over)
    n_tokens, n_time = (feats.shape[1], 1) if v.get("features") == "flat" else (tc.n_parcels, tc.n_time_patches)
    model = FmriLM(load(a), fmri_lm_config(feat_dim=feats.shape[2], n_parcels=n_tokens, n_time_patches=n_time,
                                           n_codes=d["tokenizer"].quantiser.n_codes,
                                           precision="auto", max_text_tokens=a.prompt_tokens, finetune=v["finetune"],
                                           f2f_weight=0.0 if n_time == 1 else 1.0))  # stage 3 trains no F2F
    fit = (model.tokenizer, a.prompt_tokens)
    tr, te = np.flatnonzero(d["is_train"]), np.flatnonzero(d["is_test"])
    ex = dict(n_regions=tc.n_parcels, descriptors=v["descriptors"], fit=fit)
    state_train = I.examples(d["labels"], d["texts"], tr, ["state"], seed=a.seed, **ex)
    state_test = I.examples(d["labels"], d["texts"], te, ["state"], seed=a.seed + 1, paraphrase=0, **ex)
    sex_test = I.examples(d["labels"], d["texts"], te, ["sex"], seed=a.seed + 1, paraphrase=0, **ex)
    ev = dict(n_boot=a.n_boot, seed=a.seed)
    I.instruct_train(model, feats, state_train, steps=a.instruct_steps, batch_size=a.batch_size, lr=a.lr,
                     seed=a.seed)
    out = {"state": I.evaluate(model, feats, state_test, d["subj"], **ev)}
    shot_idx = np.flatnonzero(np.isin(d["subj"], shots))
    I.instruct_train(model, feats, I.examples(d["labels"], d["texts"], shot_idx, ["sex"], seed=a.seed + a.k, **ex),
                     steps=a.shot_steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed + a.k)
    out["sex"] = I.evaluate(model, feats, sex_test, d["subj"], **ev)
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", default=None, help="'tiny' (random tiny Llama) or a model path (default SmolLM2-135M)")
    p.add_argument("--cohort", default="book")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--patch-len", type=int, default=16)
    p.add_argument("--windows-per-subject", type=int, default=6)
    p.add_argument("--test-per-class", type=int, default=4)
    p.add_argument("--tok-steps", type=int, default=150)
    p.add_argument("--instruct-steps", type=int, default=60)
    p.add_argument("--shot-steps", type=int, default=12)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mae-steps", type=int, default=2000, help="the flat-map MAE's pretraining steps (cached)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    d = prepare(a)
    shots = I.few_shot_subjects(d["subjects_all"], d["sub_sex"], a.k, d["test_subjects"], families=d["fam"],
                                seed=a.seed + a.k)
    res = {}
    for name in a.variants:
        t = time.perf_counter()
        res[name] = run_variant(a, d, name, shots)
        print(f"{name}: state {100 * res[name]['state']['balanced_accuracy']:.1f} %, sex (k={a.k}) "
              f"{100 * res[name]['sex']['balanced_accuracy']:.1f} %, {res[name]['trainable']:,} trainable, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    # yardsticks on the same windows and shots
    te, tr = np.flatnonzero(d["is_test"]), np.flatnonzero(d["is_train"])
    shot_idx = np.flatnonzero(np.isin(d["subj"], shots))
    yard = {}
    for key, X, y, train_i in (("sex_probe", I.pooled(d["feats"]), d["labels"]["sex"], shot_idx),
                               ("state_probe", I.pooled(d["feats"]), d["labels"]["state"], tr),
                               ("state_runlength", d["lengths"][:, None].astype(float), d["labels"]["state"], tr),
                               *((("sex_flatprobe", I.pooled(d["flat"]), d["labels"]["sex"], shot_idx),
                                  ("state_flatprobe", I.pooled(d["flat"]), d["labels"]["state"], tr))
                                 if d["flat"] is not None else ())):
        pred = I.probe_predict(X, y, train_i, te, seed=a.seed)
        yard[key] = {"balanced_accuracy": I.balanced_accuracy(y[te], pred),
                     "ci95": I.subject_bootstrap(y[te], pred, d["subj"][te], a.n_boot, a.seed)}
    rows = [("state", n, r["state"]) for n, r in res.items()] + [("sex", n, r["sex"]) for n, r in res.items()]
    rows += [(k.split("_")[0], k.split("_", 1)[1], r) for k, r in yard.items()]
    print(f"\n{'task':<6} {'method':<12} {'balanced acc %':>14}  95 % CI (subject bootstrap)   [synthetic]")
    for task, m, r in rows:
        print(f"{task:<6} {m:<12} {100 * r['balanced_accuracy']:14.1f}  [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
    print(f"chance: 50.0 %; {len(d['test_subjects'])} test subjects, {len(te)} test windows; k = {a.k} per sex")
    fields = [f"{t}_{m}={100 * r['balanced_accuracy']:.1f}" for t, m, r in rows]
    print(f"ablate_instruct data=synthetic llm={a.llm or 'smollm2-135m'} k={a.k} " + " ".join(fields)
          + f" seconds={time.perf_counter() - t0:.0f}")
    return res, yard


if __name__ == "__main__":
    main()
