"""A simulated cohort's pretraining shards and the cached chapter model (the smoke cohort, cached
in the data directory like the chapters use it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmri_bench.errors import InputError
from fmri_bench.harness import cohort_shards, scan_runs
from fmri_bench.harness.datasets import cohort_fingerprint, pretraining_split, pretraining_subjects
from fmri_bench.synth import ensure_cohort, load_ground_truth
from fmri_bench.train import pretrained_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_cohort_shards_split_subjects_by_site():
    cohort = ensure_cohort("smoke", seed=0)
    dirs = cohort_shards(cohort, seed=0)
    gt, _ = load_ground_truth(cohort)
    site = {r["subject"]: r["site"] for r in gt["runs"] if r.get("path")}
    subjects = {k: {r.subject for r in scan_runs(v)} for k, v in dirs.items()}
    assert all(subjects.values())
    assert not subjects["train"] & subjects["val"] and not (subjects["train"] | subjects["val"]) & subjects["val_ood"]
    assert len({site[s] for s in subjects["train"] | subjects["val"]}) == 1  # in distribution: one site
    assert {site[s] for s in subjects["val_ood"]} == set(site.values()) - {site[next(iter(subjects["train"]))]}
    # families never straddle train and the held-out splits (participants.tsv family_id)
    import pandas as pd

    fam = dict(pd.read_csv(cohort / "participants.tsv", sep="\t", dtype=str)[["subject", "family_id"]].values)
    assert not {fam[s] for s in subjects["train"]} & {fam[s] for s in subjects["val"] | subjects["val_ood"]}
    # a second call reuses the shards
    before = {p: p.stat().st_mtime_ns for d in dirs.values() for p in Path(d).glob("*.tar")}
    assert cohort_shards(cohort, seed=0) == dirs
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_pretrained_model_is_cached_by_its_settings(tmp_path, monkeypatch):
    cohort = ensure_cohort("smoke", seed=0)
    cohort_shards(cohort, seed=0)  # shared with the chapters' data directory
    from fmri_bench import paths

    real = paths.data_dir()
    (tmp_path / "pretrain_shards").symlink_to(real / "pretrain_shards")
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path))
    a = pretrained_model(cohort, steps=2, batch_size=2, base_lr=1e-2)
    stamp = cohort_fingerprint(cohort)[:10]
    assert a == tmp_path / "models" / f"{cohort.name}-{stamp}-tiny2-s2-b2-lr0.01-seed0" / "model.pt" and a.is_file()
    stamp = a.stat().st_mtime_ns
    assert pretrained_model(cohort, steps=2, batch_size=2, base_lr=1e-2) == a and a.stat().st_mtime_ns == stamp
    # how a run is observed is not part of the key: a chapter asking for figures gets the cached model
    assert pretrained_model(cohort, steps=2, batch_size=2, base_lr=1e-2, figures=True, eval_every=1) == a
    assert a.stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="not operational"):
        pretrained_model(cohort, steps=3, batch_size=2, base_lr=1e-2, mask_ratio=0.5)
    b = pretrained_model(cohort, steps=2, batch_size=2, base_lr=1e-3)
    assert b != a and b.parent.name.endswith("lr0.001-seed0") and b.is_file()


def test_cohort_shards_are_rebuilt_for_a_regenerated_cohort(tmp_path, monkeypatch):
    """Same paths, new content (a new generator version or seed): the shards are flattened again."""
    import json
    import shutil

    from fmri_bench import convert

    src = ensure_cohort("smoke", seed=0)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("ground_truth.json", "ground_truth.npz", "participants.tsv"):
        shutil.copy(src / name, cohort / name)
    calls = []

    class Summary:
        failed = []

    def fake_flatten(inputs, out, **kw):
        calls.append(Path(out).name)
        Path(out).mkdir(parents=True, exist_ok=True)
        return Summary()

    monkeypatch.setattr(convert, "flatten", fake_flatten)
    cohort_shards(cohort, out=tmp_path / "shards")
    assert sorted(calls) == ["train", "val", "val_ood"]
    cohort_shards(cohort, out=tmp_path / "shards")
    assert len(calls) == 3  # reused
    gt = json.loads((cohort / "ground_truth.json").read_text())
    gt["seed"] = 12345
    (cohort / "ground_truth.json").write_text(json.dumps(gt))
    cohort_shards(cohort, out=tmp_path / "shards")
    assert len(calls) == 6


def test_pretraining_subjects_read_from_the_run_config(tmp_path):
    cohort = ensure_cohort("smoke", seed=0)
    dirs = cohort_shards(cohort, seed=0)
    split = pretraining_split(cohort)
    (tmp_path / "config.yaml").write_text(f"data:\n  train_urls: [{dirs['train']}]\n")
    assert pretraining_subjects(tmp_path / "model.pt") == {s for s, p in split.items() if p == "train"}
    assert pretraining_subjects(tmp_path / "elsewhere" / "model.pt") is None
