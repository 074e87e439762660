"""What every training config shares: YAML + ``key=value`` overrides -> a mapping, and the
learning-rate schedule (linear warm-up, then cosine to 0, as MAE and the flat-map MAE paper).

In: a YAML file path (or None) and overrides with dotted keys and YAML values
(``model_overrides.depth=2``, ``data.train_urls=[a.tar,b.tar]``). Out: a plain dict for a config
dataclass's ``from_dict``. Errors name the file and the line (YAML syntax), or the override.
"""

from __future__ import annotations

import math
import os

import yaml

from fmri_bench.errors import InputError


def read_config(path: str | os.PathLike | None = None, overrides=()) -> dict:
    """YAML file (or {}) + overrides -> dict."""
    d: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise InputError("config file not found", path)
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise InputError(f"not valid YAML{where}: {getattr(err, 'problem', None) or err}", path) from None
        if not isinstance(d, dict):
            raise InputError("config file must hold a YAML mapping", path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not key=value")
        *parents, leaf = key.split(".")
        node, where = d, path
        for parent in parents:
            from_file = parent in node
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                if from_file and where is not None:  # the file holds a non-mapping there
                    raise InputError(f"{parent!r} is {node!r}, not a section (a mapping of settings); "
                                     f"fix it in the file (the override {item!r} needs it)", where)
                raise InputError(f"override {item!r}: {parent!r} is not a section")
            where = where if from_file else None
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"override {item!r}: the value is not valid YAML") from None
    return d


def warmup_cosine(peak: float, step: int, warmup: int, steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up over ``warmup`` updates, then
    cosine from ``peak`` to 0 at ``steps``."""
    warmup = min(warmup, steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
