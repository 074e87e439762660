"""`fmri-bench reproduce`: tables from the chapters that make them, with provenance; the paper plan."""

import json
import re
from pathlib import Path

import pytest

from fmri_bench import reproduce
from fmri_bench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_chapter_names_its_tables():
    tables = reproduce.chapter_tables()
    assert set(tables) == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert all(tables.values()), {k: v for k, v in tables.items() if not v}
    assert "ch04_state_decoding" in tables["04_state_decoding.ipynb"]
    plan = reproduce.chapter_plan("smoke", only=["ch05_trait_decoding", "02"])
    assert [s.name for s in plan.steps] == ["02_pretraining", "05_trait_decoding"]
    assert {s.data for s in plan.steps} == {"synth-smoke"}
    assert {s.data for s in reproduce.chapter_plan("book", only=["05"]).steps} == {"synth-book"}


def test_reproduce_smoke_writes_tables_with_provenance(tmp_path, capsys):
    assert main(["reproduce", "--profile", "smoke", "--only", "ch00_cohort", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"tables=1 seconds=[\d.]+ commit=[0-9a-f]{40}(\+local-changes)?", last), last
    prov = json.loads((tmp_path / "provenance.json").read_text())
    (chapter,) = prov["chapters"]
    assert chapter["notebook"] == "00_cohort.ipynb" and chapter["tables"] == ["ch00_cohort"]
    assert prov["profile"] == "smoke" and prov["hardware"]["cpus"] >= 1
    table = json.loads((tmp_path / "results" / "ch00_cohort.json").read_text())
    assert table["rows"] and table["provenance"]["data"] == "synth-smoke"
    assert table["provenance"]["seed"] == 0 and table["provenance"]["wall_s"] > 0
    assert table["provenance"]["commit"] == prov["commit"]


def test_reproduce_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["reproduce", "--profile", "smoke", "--only", "ch99_nothing", "--out", str(tmp_path)]) == 2
    assert "no such table or chapter; tables: ch00_cohort" in capsys.readouterr().err
    assert main(["reproduce", "--profile", "smoke", "--data", "hcp-ya", "--out", str(tmp_path)]) == 2
    assert "embedded synthetic cohort" in capsys.readouterr().err
    assert main(["reproduce", "--profile", "paper", "--out", str(tmp_path)]) == 2
    assert "--profile paper needs --data" in capsys.readouterr().err
    assert main(["reproduce", "--profile", "paper", "--data", str(tmp_path), "--dry-run"]) == 2
    assert "split into train/ and val/" in capsys.readouterr().err


def test_paper_plan_dry_run_and_no_gpu(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    shards = tmp_path / "shards"
    for split in ("train", "val"):
        (shards / split).mkdir(parents=True)
    assert main(["reproduce", "--profile", "paper", "--data", str(shards), "--out", str(tmp_path / "o"),
                 "--gpus", "8", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "torch.distributed.run --nproc-per-node=8 -m fmri_bench.cli pretrain --config" in text
    assert "pretrain_base_paper.yaml" in text and "1.44 EFLOP" in text
    assert "note: fMRI-LM steps left out: --lm-data PATH" in text
    # with the raw runs: the fMRI-LM chain after the MAE steps, stage 2 under torchrun, estimates from the configs
    run = tmp_path / "hcp" / "100" / "MNINonLinear" / "Results" / "rfMRI_REST1_LR"
    run.mkdir(parents=True)
    (run / "rfMRI_REST1_LR_Atlas_MSMAll.dtseries.nii").write_bytes(b"")
    assert main(["reproduce", "--profile", "paper", "--data", str(shards), "--out", str(tmp_path / "o"),
                 "--gpus", "8", "--lm-data", str(tmp_path / "hcp"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    order = [name for name in ("lm_parcellate", "lm_split", "lm_describe", "lm_windows", "lm_tokenizer", "lm_align",
                               "lm_instruct", "lm_evaluate")
             for k, line in enumerate(lines) if line.strip().startswith(f"{k}. {name}:")]
    assert order == ["lm_parcellate", "lm_split", "lm_describe", "lm_windows", "lm_tokenizer", "lm_align", "lm_instruct",
                     "lm_evaluate"]
    evaluate = next(line for line in lines if "lm_evaluate:" in line)
    assert "lm evaluate --checkpoint" in evaluate and "instruct/fmri_lm.pt" in evaluate
    assert evaluate.split(" -> ")[-1].startswith("lm_answers") and "results/lm_answers.json" in evaluate
    align = next(line for line in lines if "lm_align:" in line)
    assert "torch.distributed.run --nproc-per-node=8 -m fmri_bench.cli lm align --config" in align
    assert "lm_paper.yaml" in align and "EFLOP" in align and "estimate" in align
    assert "--split" in next(line for line in lines if "lm_describe:" in line)
    assert main(["reproduce", "--profile", "paper", "--data", str(shards), "--lm-data", str(shards), "--dry-run"]) == 2
    assert "--lm-data needs the raw runs" in capsys.readouterr().err
    assert not (tmp_path / "o" / "provenance.json").exists()  # a dry run writes nothing
    if not torch.cuda.is_available():
        assert main(["reproduce", "--profile", "paper", "--data", str(shards), "--out", str(tmp_path / "o")]) == 2
        assert "it needs a GPU and none is visible here" in capsys.readouterr().err
