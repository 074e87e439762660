"""``fmri-bench reproduce``: every results table from one command, with its provenance.

In: a profile (``smoke`` | ``book`` | ``paper``), optionally the tables wanted (``--only``; a
table name such as ``ch04_state_decoding`` or a chapter such as ``04``) and a dataset. Out:
the tables (``<out>/results/<table>.json`` / ``.md``, each JSON with a ``provenance`` entry)
and ``<out>/provenance.json``: commit, profile, seed, dataset, hardware and wall time of each
chapter that made them.

- ``smoke`` / ``book``: a table is made by the chapter notebook that saves it
  (``book.save_results``), so reproducing it executes that chapter (``book.execute_notebook``)
  on the embedded synthetic cohort; what the chapters cache (cohort, shards, models, text
  states) is reused, so a second run only re-executes the notebooks.
- ``paper``: the flat-map MAE paper's sizes (``configs/pretrain_base_paper.yaml``: ViT-B for
  625k steps) as library commands, pretraining under ``torchrun`` on a GPU machine, then the
  state and trait probes and the FC baseline, on a dataset of flat-map shards with ``train/``
  and ``val/`` folders. ``--dry-run`` prints the plan and its estimated compute; on a machine
  without a GPU it refuses unless ``--force``. With ``--lm-data`` (the raw runs: an HCP tree or
  an fMRIPrep folder with its participants table) the fMRI-LM chain at the paper's sizes
  follows (``lm_paper_steps``: parcellate, split, describe, windows, ``configs/tokenizer_paper.yaml``,
  ``configs/lm_paper.yaml`` under torchrun, ``configs/instruct_paper.yaml``, ``lm evaluate``), each step with a
  compute estimate from its config (``lm_estimates``), and last ``lm evaluate``: the tuned and
  zero-shot answers on the test subjects beside their yardsticks (table ``lm_answers``); the
  few-shot adaptation is chapter 08's code.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save, checkout_root

PROFILES = ("smoke", "book", "paper")
_SAVE = re.compile(r'save_results\(\s*"([A-Za-z0-9_.-]+)"')
_COHORT = re.compile(r'cohort="([a-z]+)"')


@dataclass
class Step:
    """One unit of the plan: a chapter (smoke / book) or a command (paper)."""

    name: str
    tables: list[str]
    command: list[str] | None = None  # paper: the command line; None: a chapter notebook
    notebook: Path | None = None
    estimate: str = ""
    data: str = ""

    def line(self) -> str:
        what = shlex.join(self.command) if self.command else str(self.notebook.name)
        tail = f"  [{self.estimate}]" if self.estimate else ""
        return f"{self.name}: {what} -> {', '.join(self.tables) or '(inputs of later steps)'}{tail}"


@dataclass
class Plan:
    profile: str
    steps: list[Step] = field(default_factory=list)
    data: str = ""
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        head = f"reproduce --profile {self.profile}: {len(self.steps)} steps on {self.data}"
        return "\n".join([head] + [f"  {k}. {s.line()}" for k, s in enumerate(self.steps, 1)]
                         + [f"  note: {n}" for n in self.notes])


def chapter_tables(notebooks: Path | None = None) -> dict[str, list[str]]:
    """Chapter notebook file -> the tables it saves (read from its sources)."""
    from fmri_bench.book import notebooks_dir

    src = notebooks or notebooks_dir()
    out = {}
    for nb in sorted(src.glob("*.ipynb")):
        text = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        out[nb.name] = sorted(dict.fromkeys(_SAVE.findall(text)))
    return out


def _chapter_cohort(nb: Path, profile: str) -> str:
    """The synthetic cohort a chapter reads in a profile (its profile_settings), as a catalogue name."""
    text = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    found = _COHORT.findall(text)
    if not found:
        return "no cohort"
    # book=dict(cohort="book", ...) comes first, smoke=dict(cohort="smoke", ...) after it
    return f"synth-{found[-1] if profile == 'smoke' and len(found) > 1 else found[0]}"


def _last_times(out: Path) -> dict[str, float]:
    prov = out / "provenance.json"
    if not prov.is_file():
        return {}
    try:
        doc = json.loads(prov.read_text())
    except ValueError:
        return {}
    return {c["notebook"]: c["seconds"] for c in doc.get("chapters", []) if c.get("profile") == doc.get("profile")}


def _select(chapters: dict[str, list[str]], only: list[str] | None) -> list[str]:
    if not only:
        return list(chapters)
    chosen = []
    for name in only:
        hits = [nb for nb, tables in chapters.items()
                if name in tables or nb == name or nb.removesuffix(".ipynb") == name or nb.startswith(f"{name}_")]
        if not hits:
            tables = sorted(t for ts in chapters.values() for t in ts)
            raise InputError(f"--only {name}: no such table or chapter; tables: {', '.join(tables)}")
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen)


def chapter_plan(profile: str, only: list[str] | None = None, out: Path | None = None,
                 notebooks: Path | None = None) -> Plan:
    from fmri_bench.book import notebooks_dir

    src = notebooks or notebooks_dir()
    chapters = chapter_tables(src)
    last = _last_times(out) if out is not None else {}
    steps = []
    for nb in _select(chapters, only):
        est = f"last run {last[nb]:.0f} s" if nb in last else ""
        steps.append(Step(nb.removesuffix(".ipynb"), chapters[nb], notebook=src / nb, estimate=est,
                          data=_chapter_cohort(src / nb, profile)))
    return Plan(profile, steps, ", ".join(sorted({s.data for s in steps})))


# --- the paper profile -------------------------------------------------------------------------
# Compute of the paper runs, from the papers' settings (flat-map MAE, arXiv 2510.13768: ViT-B,
# 625k steps at batch 32; chapter 02 counts 72 GFLOP of training per clip -> 1.44 EFLOP).
PAPER_MAE_EFLOP = 1.44


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def lm_estimates(cfg: Path, n_parcels: int = 360) -> dict[str, str]:
    """Compute estimates of the fMRI-LM paper steps from their configs (FLOPs, 2 per multiply-add,
    forward + backward): a transformer step costs ~6 x params x tokens (4 x with frozen weights
    under LoRA, which computes no weight gradient) + 12 x layers x tokens^2 x width of attention.
    Assumed: MMP 360 parcels (a CIFTI adds 19 subcortical regions), 160-frame windows, the
    default LLM SmolLM2-135M-Instruct (30 layers, width 576; GPT-2 124M costs about the same,
    Qwen3-0.6B ~4x)."""
    tok, lmc, ins = _yaml(cfg / "tokenizer_paper.yaml"), _yaml(cfg / "lm_paper.yaml"), _yaml(cfg / "instruct_paper.yaml")
    from fmri_bench.models.tokenizer import tokenizer_config

    # tokenizer: the config's preset (paper: ViT-S 384-d, 12 + 12 layers; ~12 d^2 parameters a layer)
    tc = tokenizer_config(tok.get("preset", "paper"), **tok.get("model_overrides", {}))
    d, layers = tc.embed_dim, tc.depth + tc.decoder_depth
    t_tok = n_parcels * (tc.n_frames // tc.patch_len)
    per_window = 6 * layers * 12 * d * d * t_tok + 12 * layers * t_tok ** 2 * d
    e_tok = per_window * tok["batch_size"] * tok["steps"] / 1e18
    # LLM: 135M parameters, 30 layers, width 576; sequences <fmri> fMRI </fmri> text
    p_llm, l_llm, w_llm = 135e6, 30, 576
    t_lm = t_tok + 2 + int(lmc["model_overrides"]["max_text_tokens"])
    seq = 4 * p_llm * t_lm + 12 * l_llm * t_lm ** 2 * w_llm
    t2t = 4 * p_llm * 256
    e_lm = (lmc["batch_size"] * seq + lmc["t2t_batch_size"] * t2t) * lmc["steps"] / 1e18
    e_ins = ins["batch_size"] * seq * ins["steps"] / 1e18
    note = f"estimate, {n_parcels} parcels assumed"
    return {"tokenizer": f"~{e_tok:.1f} EFLOP ({t_tok} tokens a window x batch {tok['batch_size']} x "
                         f"{tok['steps']} steps; {note})",
            "lm_align": f"~{e_lm:.2f} EFLOP ({t_lm} positions a sequence x batch {lmc['batch_size']} + "
                        f"{lmc['t2t_batch_size']} plain texts x {lmc['steps']} steps, LoRA on SmolLM2-135M; {note})",
            "lm_instruct": f"~{e_ins:.2f} EFLOP (batch {ins['batch_size']} x {ins['steps']} steps; {note})"}


def lm_paper_steps(lm_data: str | os.PathLike, run: Path, cfg: Path, cli: list[str], torchrun: list[str],
                   res: Path) -> list[Step]:
    """The fMRI-LM chain on raw runs (an HCP tree or an fMRIPrep folder with its participants
    table): parcellate, split, describe, windows, tokenizer, lm align (under torchrun), lm
    instruct, lm evaluate (the answers on the test subjects: table ``lm_answers`` in ``res``).
    Outputs under ``run`` (``paper_runs/``)."""
    from fmri_bench.harness import adapters

    root = Path(lm_data)
    if not root.is_dir() or adapters.detect_layout(root) is None:
        raise InputError("--lm-data needs the raw runs: an HCP tree (*_Atlas_MSMAll.dtseries.nii) or an "
                         "fMRIPrep derivatives folder", root)
    par, lmd, est = run / "parcels", run / "lmdata", lm_estimates(cfg)
    fit = [f"data.windows={lmd / 'fit' / 'windows.npy'}", f"data.corpus={lmd / 'fit' / 'corpus.jsonl'}"]
    src = str(root)
    return [
        Step("lm_parcellate", [], cli + ["parcellate", src, "--out", str(par), "--atlas", "mmp"],
             estimate="minutes per 100 runs (CPU)", data=src),
        Step("lm_split", [], cli + ["lm", "split", str(par), "--labels-from", src, "--out", str(run / "split.json")],
             estimate="seconds", data=src),
        Step("lm_describe", [], cli + ["describe", str(par), "--out", str(run / "corpus.jsonl"), "--split",
                                       str(run / "split.json")], estimate="~1 s a run (CPU)", data=src),
        Step("lm_windows", [], cli + ["lm", "windows", str(par), "--corpus", str(run / "corpus.jsonl"), "--labels-from",
                                      src, "--out", str(lmd)], estimate="seconds", data=src),
        Step("lm_tokenizer", [], cli + ["tokenizer", "--config", str(cfg / "tokenizer_paper.yaml"), "--run-dir",
                                        str(run / "tok"), *fit], estimate=est["tokenizer"], data=src),
        Step("lm_align", [], torchrun + ["lm", "align", "--config", str(cfg / "lm_paper.yaml"), "--run-dir",
                                         str(run / "lm"), f"tokenizer={run / 'tok' / 'tokenizer.pt'}", *fit],
             estimate=est["lm_align"], data=src),
        Step("lm_instruct", [], cli + ["lm", "instruct", "--config", str(cfg / "instruct_paper.yaml"), "--run-dir",
                                       str(run / "instruct"), f"checkpoint={run / 'lm' / 'fmri_lm.pt'}",
                                       f"windows={lmd / 'fit' / 'windows.npy'}", f"labels={lmd / 'fit' / 'labels.jsonl'}"],
             estimate=est["lm_instruct"], data=src),
        Step("lm_evaluate", ["lm_answers"], cli + ["lm", "evaluate", "--checkpoint", str(run / "instruct" / "fmri_lm.pt"),
                                                   "--data", str(lmd), "--out", str(res / "lm_answers.json")],
             estimate="one forward pass a window and question (minutes on a GPU)", data=src),
    ]


def paper_plan(data: str | os.PathLike, out: str | os.PathLike, gpus: int = 1,
               lm_data: str | os.PathLike | None = None) -> Plan:
    """The paper runs as commands on a shard dataset with train/ and val/ folders; the MAE run
    goes to ``out/paper_runs/mae``, the tables to ``out/results``. ``lm_data``: the raw runs
    (HCP tree / fMRIPrep folder) for the fMRI-LM chain (``lm_paper_steps``); without it the
    plan says those steps are left out."""
    from fmri_bench.catalog import resolve

    root = resolve(data)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise InputError("the paper profile needs flat-map shards split into train/ and val/ folders "
                         "(as fmri_bench.harness.cohort_shards writes them, or the upstream shard ranges)", root)
    run, res = Path(out) / "paper_runs", Path(out) / "results"
    cfg = (checkout_root() or Path(".")) / "configs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "-m", "fmri_bench.cli"]
    cli = [sys.executable, "-m", "fmri_bench.cli"]
    steps = [
        Step("pretrain", [], torchrun + ["pretrain", "--config", str(cfg / "pretrain_base_paper.yaml"),
                                         "--run-dir", str(run / "mae"), f"data.train_urls=[{root / 'train'}]",
                                         f"data.val_urls=[{root / 'val'}]"],
             estimate=f"{PAPER_MAE_EFLOP} EFLOP: ~1 H100-hour of compute at 40 % of bf16 peak; "
                      "data-bound in practice (~5.5k clips/s to feed)"),
        Step("state21", ["state21_mae"], cli + ["probe", "--checkpoint", str(run / "mae" / "model.pt"),
                                               "--task", "state21", "--data", str(root), "--out",
                                               str(res / "state21_mae.json")], estimate="minutes"),
        Step("sex", ["sex_mae"], cli + ["probe", "--checkpoint", str(run / "mae" / "model.pt"), "--task", "sex",
                                       "--data", str(root), "--out", str(res / "sex_mae.json")],
             estimate="minutes"),
        Step("fc", ["state21_fc"], cli + ["baseline", "fc", "--task", "state21", "--data", str(root), "--out",
                                         str(res / "state21_fc.json")], estimate="minutes"),
    ]
    notes = ["fMRI-LM few-shot adaptation (k labelled subjects per class) is chapter 08's code, not a paper step"]
    if lm_data is None:
        notes.insert(0, "fMRI-LM steps left out: --lm-data PATH (an HCP tree or fMRIPrep folder with its "
                        "participants table) adds parcellate -> split -> describe -> windows -> tokenizer -> "
                        "lm align -> lm instruct -> lm evaluate")
    else:
        steps += lm_paper_steps(lm_data, run, cfg, cli, torchrun, res)
    return Plan("paper", steps, str(root), notes)


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def commit() -> str:
    root = checkout_root()
    if root is None:
        return "unknown (not a source checkout)"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git failed)"
    return head + ("+local-changes" if dirty else "")


def _stamp_tables(results: Path, tables: list[str], prov: dict) -> list[str]:
    """Add the provenance to each table JSON a step wrote -> the tables found."""
    found = []
    for name in tables:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        doc["provenance"] = prov
        text = json.dumps(doc, indent=1) + "\n"
        atomic_save(lambda tmp: tmp.write_text(text), path)
        found.append(name)
    return found


def _seed(step: Step) -> int:
    """The seed a chapter runs with (its ``seed=`` setting; the chapters default to 0)."""
    if step.notebook is None:
        return 0
    found = re.search(r"\bseed=(\d+)", step.notebook.read_text().replace('\\"', '"'))
    return int(found.group(1)) if found else 0


def reproduce(profile: str = "smoke", only: list[str] | None = None, out: str | os.PathLike | None = None,
              data: str | None = None, dry_run: bool = False, force: bool = False, gpus: int = 1,
              notebooks: Path | None = None, verbose: bool = True, lm_data: str | None = None) -> dict:
    """Run the plan of ``profile`` -> the provenance record (also ``<out>/provenance.json``)."""
    from fmri_bench.book import book_dir, execute_notebook

    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    out = Path(out) if out is not None else book_dir()
    if profile == "paper":
        if data is None:
            raise InputError("--profile paper needs --data: flat-map shards with train/ and val/ "
                             "(e.g. the catalogue's flatmap-shards, or a cohort's pretrain shards)")
        plan = paper_plan(data, out, gpus, lm_data)
    else:
        if lm_data is not None:
            raise InputError("--lm-data is for --profile paper (the smoke and book profiles run the chapters)")
        if data not in (None, "synth-smoke", "synth-book"):
            raise InputError(f"--data {data}: the smoke and book profiles reproduce the chapters' tables on "
                             "the embedded synthetic cohort; real data go through --profile paper or "
                             "fmri-bench probe / baseline --data")
        plan = chapter_plan(profile, only, out, notebooks)
    if verbose:
        print(plan.text(), flush=True)
    hw = hardware()
    if dry_run:
        return {"profile": profile, "plan": [s.line() for s in plan.steps], "hardware": hw, "dry_run": True}
    if profile == "paper" and not hw["cuda"] and not force:
        raise InputError("--profile paper trains ViT-B for 625k steps: it needs a "
                         "GPU and none is visible here (torch.cuda.is_available() is False); --dry-run shows the "
                         "plan, --force runs it anyway")
    results = out / "results"
    record = {"profile": profile, "commit": commit(), "hardware": hw, "chapters": []}
    prov_path = out / "provenance.json"
    if prov_path.is_file() and profile != "paper":
        try:
            old = json.loads(prov_path.read_text())
            if old.get("profile") == profile:  # keep what other --only runs recorded
                keep = {s.notebook.name for s in plan.steps}
                record["chapters"] = [c for c in old.get("chapters", []) if c["notebook"] not in keep]
        except ValueError:
            pass
    t_all = time.perf_counter()
    for k, step in enumerate(plan.steps, 1):
        t0 = time.perf_counter()
        if verbose:
            print(f"[{k}/{len(plan.steps)}] {step.name} ...", end=" ", flush=True)
        if step.command is None:
            execute_notebook(step.notebook, out / "notebooks" / step.notebook.name, profile, results)
        else:
            done = subprocess.run(step.command)
            if done.returncode != 0:
                raise InputError(f"step {step.name} failed (exit {done.returncode}): {shlex.join(step.command)}")
        seconds = time.perf_counter() - t0
        prov = {"commit": record["commit"], "profile": profile, "seed": _seed(step), "data": step.data or plan.data,
                "hardware": f"{hw['platform']}, {hw['cpus']} CPUs" + (f", {', '.join(hw['gpus'])}" if hw["cuda"] else ""),
                "wall_s": round(seconds, 1), "made_by": step.notebook.name if step.notebook else step.name}
        found = _stamp_tables(results, step.tables, prov)
        missing = sorted(set(step.tables) - set(found))
        if missing:
            raise InputError(f"{step.name} finished but did not write {', '.join(missing)}", results)
        record["chapters"].append({"notebook": step.notebook.name if step.notebook else step.name,
                                   "profile": profile, "tables": found, "seconds": round(seconds, 1),
                                   "seed": prov["seed"],
                                   "data": prov["data"]})
        if verbose:
            print(f"ok {seconds:.1f} s", flush=True)
        atomic_save(lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"), prov_path)
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    atomic_save(lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"), prov_path)
    return record
