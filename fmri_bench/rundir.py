"""The run directory of a training job: its config, its metrics log and its checkpoints.

In: a directory and the run's config (a dict). Out, in the directory: ``config.yaml`` (checked
against the config of a later call once a checkpoint exists: a different config is refused, keys
that only change how a run is observed may differ), ``metrics.jsonl`` (one JSON record per line) and ``checkpoint.pt``
(written atomically, ``torch.load(weights_only=True)`` reads it). ``rng_state`` /
``set_rng_state`` capture every random generator a run draws from, for exact resumes.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save


def config_diff(old: dict, new: dict, ignore=(), prefix: str = "") -> list[str]:
    """'key: old -> new' for each differing (dotted) key; top-level ``ignore`` keys are skipped."""
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, (), f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class RunDir:
    """Create or reopen a run directory for ``config``.

    resume: continue from ``checkpoint.pt`` when there is one (``self.resume_from``); without it,
    a directory that already holds a checkpoint is refused.
    """

    def __init__(self, path: str | os.PathLike, config: dict, resume: bool = False, ignore=()):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError("--run-dir is a file, not a directory", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_path = self.path / "checkpoint.pt"
        # a directory without a checkpoint holds nothing to protect (a run that failed before its
        # first checkpoint): its config is replaced, so a corrected retry starts cleanly
        if self.config_path.exists() and self.checkpoint_path.exists():
            old = yaml.safe_load(self.config_path.read_text()) or {}
            diff = config_diff(old, config, ignore)
            if diff:
                raise InputError("run directory holds a run with a different config (" + "; ".join(diff[:5])
                                 + "): use a new --run-dir, or the same config to resume", self.path)
        if self.checkpoint_path.exists() and not resume:
            raise InputError("run directory already holds a checkpoint: pass --resume to continue it, "
                             "or use a new --run-dir", self.path)
        atomic_save(lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)), self.config_path)
        self.resume_from = self.checkpoint_path if (resume and self.checkpoint_path.exists()) else None

    def restart_metrics(self, history: list[dict]) -> None:
        """Rewrite the log to ``history`` (drops what a killed run logged after its checkpoint)."""
        text = "".join(json.dumps(r) + "\n" for r in history)
        atomic_save(lambda tmp: tmp.write_text(text), self.metrics_path)

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, obj: dict) -> None:
        from fmri_bench.models.mae import save_checkpoint

        save_checkpoint(self.checkpoint_path, obj)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl``: train records have ``loss``, eval records ``val_loss``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rng_state(*generators: torch.Generator) -> dict:
    """Every random state a run draws from: torch (CPU, CUDA), numpy, Python, and ``generators``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    saved = state["generators"] if "generators" in state else [state["mask"]]  # older checkpoints
    for g, s in zip(generators, saved):
        g.set_state(s)
