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
  without a GPU it refuses unless ``--force``. The fMRI-LM paper sizes (``configs/tokenizer_paper.yaml``,
  ``configs/lm_paper.yaml``) need parcel windows and a descriptor corpus of the real scans
  (``fmri-bench parcellate`` / ``describe``) and are not in this plan yet.
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

    def text(self) -> str:
        head = f"reproduce --profile {self.profile}: {len(self.steps)} steps on {self.data}"
        return "\n".join([head] + [f"  {k}. {s.line()}" for k, s in enumerate(self.steps, 1)])


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


def paper_plan(data: str | os.PathLike, out: str | os.PathLike, gpus: int = 1) -> Plan:
    """The paper runs as commands on a shard dataset with train/ and val/ folders; the MAE run
    goes to ``out/paper_runs/mae``, the tables to ``out/results``."""
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
    return Plan("paper", steps, str(root))


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
              notebooks: Path | None = None, verbose: bool = True) -> dict:
    """Run the plan of ``profile`` -> the provenance record (also ``<out>/provenance.json``)."""
    from fmri_bench.book import book_dir, execute_notebook

    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    out = Path(out) if out is not None else book_dir()
    if profile == "paper":
        if data is None:
            raise InputError("--profile paper needs --data: flat-map shards with train/ and val/ "
                             "(e.g. the catalogue's flatmap-shards, or a cohort's pretrain shards)")
        plan = paper_plan(data, out, gpus)
    else:
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
