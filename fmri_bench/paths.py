"""The one place that decides where fmri_bench reads and writes its own files.

- ``cache_dir()``: derived, reproducible artefacts (flat-map operators, dequantised models).
  ``$FMRI_BENCH_CACHE`` if set, else ``<checkout>/.cache`` when running from a source
  checkout, else ``~/.cache/fmri_bench``.
- ``data_dir()``: datasets (the synthetic cohorts, shards, models, your own data by link; the
  catalogue is ``data/datasets.yaml``, see ``fmri_bench.catalog``). ``$FMRI_BENCH_DATA`` if
  set; else ``cache_dir() / "data"`` when ``$FMRI_BENCH_CACHE`` is set or when installed; else
  ``<checkout>/data``.
- ``package_data(name)``: small committed assets shipped inside the package.
- ``atomic_save(save, path)``: every file the package writes goes through it (temporary file in
  the same directory, then rename), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout holding this package (has pyproject.toml), or None when installed."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None


def cache_dir() -> Path:
    env = os.environ.get("FMRI_BENCH_CACHE")
    if env:
        path = Path(env)
    elif (root := checkout_root()) is not None:
        path = root / ".cache"
    else:
        path = Path.home() / ".cache" / "fmri_bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    env = os.environ.get("FMRI_BENCH_DATA")
    if env:
        path = Path(env)
    elif os.environ.get("FMRI_BENCH_CACHE") or checkout_root() is None:
        path = cache_dir() / "data"  # a relocated cache keeps its datasets with it
    else:
        path = checkout_root() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_data(name: str) -> Path:
    """Path of a committed asset in ``fmri_bench/data``."""
    path = PACKAGE_DIR / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: packaged asset missing (reinstall fmri_bench)")
    return path


def atomic_save(save, path: str | os.PathLike) -> Path:
    """Call ``save(tmp)`` then rename ``tmp`` onto ``path`` -> ``path``.

    ``tmp`` is in the same directory (so the rename is atomic), keeps the file's name and
    extension (writers that pick a format by extension still work) and is unique per process
    and thread; it is removed if ``save`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_work(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove entries of ``folder`` matching ``pattern`` (a regex whose group ``pid`` is the
    writer's process id) whose process is gone: what a killed run left -> the removed paths."""
    import re
    import shutil

    rx, removed = re.compile(pattern), []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = rx.fullmatch(path.name)
        if m and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
