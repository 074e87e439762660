"""The book's results page: every table of both papers, row by row, beside ours.

In: the results folder the chapters write (``book/results/*.json``; ``meta.synthetic`` tells a
synthetic table from a real one) and ``PAPER_ROWS`` below (the papers' numbers, each with the
paper, section and what it measures). Out: ``book/results.md``, one table per paper table with
columns *paper*, *ours (synthetic)*, *ours (real)*; every cell is labelled with its source as
the book's introduction defines it, and a row we have not measured says so ("not run").

Paper numbers (quoted, not reproduced here):
- Flat-map MAE (Lane et al., arXiv 2510.13768): the released ViT-B 16-16 HCP model's masked MSE
  on a held-out clip (0.825); the v2 scaling table's best validation MSE on HCP at 1834 h (0.828).
- CortexMAE / Brainmarks analysis of frozen models (test accuracy %): HCP 21-class task state:
  flat map 99.0, parcel MLP 94.3, FC linear 82.4, chance 16.9. Traits (balanced accuracy,
  logistic): HCP-Aging sex flat map 87.9 / FC 81.9; age quartiles 47.4 / 45.6.
- fMRI-LM (Wei et al., arXiv 2511.21760, results): HCP sex accuracy 83.0 % fine-tuned (Qwen3
  variant), BrainLM on the same 81.1 %.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fmri_bench.paths import atomic_save


@dataclass(frozen=True)
class PaperRow:
    paper: str          # which paper table the row belongs to
    row: str            # what the row measures
    value: float        # the paper's number
    unit: str           # "%" or "MSE"
    cite: str           # paper and section
    table: str | None   # our results table that answers it (None: nothing here measures it)
    match: dict         # row filter: key -> value (a string ending in "*" matches a prefix)
    key: str            # the column holding our number
    best: str = "max"   # several matching rows: "max" | "min" | "min at largest size" (scaling points)
    ci: str | None = None  # the column with our interval


MAE = "Flat-map MAE (Lane et al., arXiv 2510.13768)"
BM = "Frozen probes (CortexMAE / Brainmarks analysis)"
LM = "fMRI-LM (Wei et al., arXiv 2511.21760)"
PAPER_ROWS = [
    PaperRow(MAE, "masked MSE on held-out clips (ViT-B, 625k steps)", 0.825, "MSE", "golden numbers of the released model",
             "ch02_yardsticks", {"split": "val, same site*", "predictor": "MAE*"}, "loss", "min"),
    PaperRow(MAE, "predict-zero on the same hidden pixels", math.nan, "MSE", "not reported",
             "ch02_yardsticks", {"split": "val, same site*", "predictor": "predict zero"}, "loss", "min"),
    PaperRow(MAE, "best validation MSE, largest data size (1834 h)", 0.828, "MSE", "v2 scaling table, HCP",
             "ch03_points", {}, "best val (synthetic)", "min at largest size"),
    PaperRow(BM, "HCP 21-class state: flat-map MAE", 99.0, "%", "published comparison, test accuracy",
             "ch04_state_decoding", {"task": "state21", "method": "mae*"}, "mean %", "max", "95% CI"),
    PaperRow(BM, "HCP 21-class state: parcel MLP", 94.3, "%", "published comparison, test accuracy",
             "ch04_state_decoding", {"task": "state21", "method": "parcel_mlp"}, "mean %", "max", "95% CI"),
    PaperRow(BM, "HCP 21-class state: FC linear", 82.4, "%", "published comparison, test accuracy",
             "ch04_state_decoding", {"task": "state21", "method": "fc"}, "mean %", "max", "95% CI"),
    PaperRow(BM, "HCP 21-class state: chance", 16.9, "%", "published comparison",
             "ch04_state_decoding", {"task": "state21", "method": "chance"}, "mean %", "max"),
    PaperRow(BM, "sex: flat-map MAE", 87.9, "%", "traits, HCP-Aging, balanced accuracy",
             "ch05_trait_decoding", {"task": "sex*", "method": "mae*"}, "mean %", "max", "95% CI"),
    PaperRow(BM, "sex: FC", 81.9, "%", "traits, HCP-Aging, balanced accuracy",
             "ch05_trait_decoding", {"task": "sex*", "method": "fc"}, "mean %", "max", "95% CI"),
    PaperRow(BM, "age quartiles: flat-map MAE", 47.4, "%", "traits, balanced accuracy",
             "ch05_trait_decoding", {"task": "age*", "method": "mae*"}, "mean %", "max", "95% CI"),
    PaperRow(BM, "age quartiles: FC", 45.6, "%", "traits, balanced accuracy",
             "ch05_trait_decoding", {"task": "age*", "method": "fc"}, "mean %", "max", "95% CI"),
    PaperRow(LM, "HCP sex, fine-tuned fMRI-LM (Qwen3)", 83.0, "%", "results table",
             "ch08_zero_few_shot", {"task": "sex few-shot", "method": "fmri-lm*", "k": "8"}, "mean %", "max", "95% CI"),
    PaperRow(LM, "HCP sex, fMRI-LM tuned on sex, answering held-out subjects", 83.0, "%", "results table",
             "lm_answers", {"task": "sex", "method": "fmri-lm*"}, "mean %", "max", "95% CI"),
    PaperRow(LM, "HCP sex, BrainLM", 81.1, "%", "results table", None, {}, ""),
]


def _matches(row: dict, match: dict) -> bool:
    for k, want in match.items():
        have = str(row.get(k, ""))
        if want.endswith("*") and not have.startswith(want[:-1]):
            return False
        if not want.endswith("*") and have != want:
            return False
    return True


def ours(results: Path, spec: PaperRow, synthetic: bool) -> str:
    """Our best matching number for a paper row from a results table of that kind, as a cell."""
    if spec.table is None:
        return "no counterpart here"
    path = results / f"{spec.table}.json"
    if not path.is_file():
        return "not run"
    doc = json.loads(path.read_text())
    if bool(doc.get("meta", {}).get("synthetic", True)) != synthetic:
        return "not run"
    rows = [r for r in doc["rows"] if _matches(r, spec.match) and isinstance(r.get(spec.key), (int, float))]
    if not rows:
        return "no such row"
    if spec.best == "min at largest size":
        top = max(r.get("size", 0) for r in rows)
        rows = [r for r in rows if r.get("size", 0) == top]
        label_extra = f"largest size: {top} {rows[0].get('unit', '')}".strip()
    else:
        label_extra = ""
    pick = (max if spec.best == "max" else min)(rows, key=lambda r: r[spec.key])
    value = pick[spec.key]
    text = f"{value:.1f} %" if spec.unit == "%" else f"{value:.4f}"
    if spec.ci and pick.get(spec.ci):
        text += f" {pick[spec.ci]}"
    exact = {k for k, v in spec.match.items() if not v.endswith("*")}  # a prefix match names the row it chose
    label = ", ".join(str(pick[k]) for k in ("method", "predictor", "task") if k in pick and k not in exact)
    label = label or ", ".join(str(pick[k]) for k in ("method", "predictor") if k in pick) or label_extra
    profile = doc.get("meta", {}).get("profile")
    made = f"{profile} profile" if profile else doc.get("meta", {}).get("made_by", "")
    where = f" ({'; '.join(x for x in (label, made) if x)})" if (label or made) else ""
    return f"{text}{where} [{'synthetic' if synthetic else 'real'}]"


def page(results: str | os.PathLike) -> str:
    results = Path(results)
    lines = ["# Results: the papers' tables beside ours", "",
             "Each row is one number of a paper table. **paper** cells are quoted from the paper named in the",
             "heading (real data, not reproduced here); **synthetic** cells are measured by this book's chapters on",
             "the synthetic cohort, whose ground truth is planted: they say whether the pipeline recovers it and are",
             "not estimates of what the methods reach on real brains; **real** cells are measured here on real data",
             "(none unless you ran the chapters' benchmarks on your own data). Where several of our rows answer a",
             "paper row, the best is shown with its name and 95 % CI. Regenerated at every book build from",
             "`book/results/`.", ""]
    for paper in dict.fromkeys(r.paper for r in PAPER_ROWS):
        lines += [f"## {paper}", "", "| row | paper | ours (synthetic) | ours (real) |", "|---|---|---|---|"]
        for r in (x for x in PAPER_ROWS if x.paper == paper):
            if math.isnan(r.value):
                cell = "not reported [paper]"
            else:
                quoted = f"{r.value:.1f} %" if r.unit == "%" else f"{r.value:.3f}"
                cell = f"{quoted} ({r.cite}) [paper]"
            lines.append(f"| {r.row} | {cell} | {ours(results, r, True)} | {ours(results, r, False)} |")
        lines.append("")
    return "\n".join(lines)


def write_page(results: str | os.PathLike, out: str | os.PathLike) -> Path:
    text = page(results)
    return atomic_save(lambda tmp: tmp.write_text(text), out)
