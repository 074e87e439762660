"""The book pipeline: chapter notebooks -> executed copies (papermill) -> jupyter-book HTML.

In:  ``notebooks/*.ipynb`` (chapter sources, committed without outputs) and a profile name.
Out: executed copies in ``book/notebooks/``, results tables in ``book/results/``, and the HTML
     book in ``book/_build/html/`` (all ignored by git).

The convention every chapter notebook follows
---------------------------------------------
1. One code cell tagged ``parameters`` (papermill's tag) that holds exactly two assignments::

       PROFILE = "book"   # "smoke" (CI, seconds) or "book" (the full chapter)
       OUT_DIR = None     # where the chapter writes files; None -> book/results

   The runner injects ``PROFILE`` and ``OUT_DIR`` in a cell right after it. Nothing derived
   from ``PROFILE`` belongs in the parameters cell: it would keep the default's values.
2. The next code cell turns the profile into settings, and the rest of the notebook reads
   ``cfg.<name>`` only::

       from fmri_bench import book
       cfg = book.profile_settings(PROFILE, book=dict(n_frames=300, space="fs_LR_32k"),
                                   smoke=dict(n_frames=20))

   ``book=`` names every setting with its full-chapter value; ``smoke=`` overrides some of
   them (a name ``book=`` does not have is an error). Smoke must run in well under a minute.
3. Files go under ``book.output_dir(OUT_DIR)`` only (never next to the notebook). Tables go
   through ``book.save_results("name", rows, out_dir=OUT_DIR)``, which writes ``name.json``
   and ``name.md`` and displays the table when it is a cell's last expression; flat-map
   videos through ``book.video(frames, out / "name.gif")`` (a GIF, shown inline).
4. Required outputs: a code cell tagged ``must-output`` must produce output (text, a figure,
   a table); files the chapter must write are listed, relative to ``OUT_DIR``, in the notebook
   metadata ``{"fmri_bench": {"outputs": ["flat_maps.json"]}}``. They are deleted before the
   run and must exist, non-empty, after it.
5. Sources are committed without outputs; figures are shown inline (the runner gives the
   kernel matplotlib's inline backend even when ``MPLBACKEND=Agg`` is set). Cell tags of
   myst-nb (``remove-stderr``, ``remove-input``, ...) act on the HTML book only.

A cell error, a missing output or a malformed notebook raises ``NotebookError`` naming the
notebook, the cell (index in the source notebook and its first line) and the exception line;
``fmri-bench book`` prints it and exits 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save, cache_dir, checkout_root
from fmri_bench.results import markdown_table

PROFILES = ("smoke", "book")
KERNEL_NAME = "fmri-bench"
PARAMETERS_TAG = "parameters"
MUST_OUTPUT_TAG = "must-output"
_REQUIRED_PARAMETERS = ("PROFILE", "OUT_DIR")


def _root() -> Path:
    return checkout_root() or Path.cwd()


def book_dir() -> Path:
    """``book/`` of the checkout: holds _toc.yml, prose pages, executed notebooks, results."""
    return _root() / "book"


def notebooks_dir() -> Path:
    """``notebooks/`` of the checkout: the chapter sources."""
    return _root() / "notebooks"


# --- what notebooks call ---------------------------------------------------------------------
def profile_settings(profile: str, *, book: dict, smoke: dict | None = None) -> types.SimpleNamespace:
    """Settings of one profile: ``book`` holds every setting, ``smoke`` overrides some of them.

    Returns a namespace (``cfg.n_frames``). An unknown profile or a ``smoke`` key that ``book``
    does not define is an error, so a misspelt setting never silently keeps the book value.
    """
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    smoke = smoke or {}
    if "profile" in book:
        raise InputError("'profile' is reserved (cfg.profile is the profile name); rename that setting")
    unknown = sorted(set(smoke) - set(book))
    if unknown:
        raise InputError(f"smoke settings {unknown} are not book settings ({sorted(book)})")
    values = dict(book, **smoke) if profile == "smoke" else dict(book)
    return types.SimpleNamespace(profile=profile, **values)


def output_dir(out_dir: str | os.PathLike | None = None) -> Path:
    """The directory a chapter writes into: ``out_dir``, or ``book/results`` when None (created)."""
    if out_dir is None:
        root = checkout_root()
        path = root / "book" / "results" if root is not None else cache_dir() / "results"
    else:
        path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


class ResultsTable:
    """A saved results table; shows as a markdown table when it is a cell's last expression."""

    def __init__(self, name: str, rows: list[dict], json_path: Path, md_path: Path):
        self.name, self.rows, self.json_path, self.md_path = name, rows, json_path, md_path

    def markdown(self) -> str:
        return self.md_path.read_text()

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __repr__(self) -> str:
        return f"ResultsTable({self.name!r}, {len(self.rows)} rows, {self.json_path})"


def _plain(value):
    """numpy scalars -> Python scalars (so they print and serialise like numbers)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_results(name: str, rows: list[dict] | dict, out_dir: str | os.PathLike | None = None,
                 meta: dict | None = None) -> ResultsTable:
    """Write ``<out_dir>/<name>.json`` ({"name", "meta", "rows"}) and ``<name>.md`` (the table).

    rows: a list of flat dicts (one per table row), a single dict (one row), or dataclass
    instances such as ``fmri_bench.results.Record``. Values must be JSON-serialisable (numpy
    scalars are converted; NaN is written as null).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise InputError(f"results name {name!r}: use letters, digits, '_', '-', '.' only")
    rows = [rows] if isinstance(rows, dict) or dataclasses.is_dataclass(rows) else list(rows)
    rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"results {name!r}: rows must be a non-empty list of dicts")
    rows = [{k: _plain(v) for k, v in r.items()} for r in rows]
    out = output_dir(out_dir)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    record = {"name": name, "meta": meta or {}, "rows": rows}
    text = json.dumps(_json_safe(record), indent=1, allow_nan=False) + "\n"
    atomic_save(lambda tmp: tmp.write_text(text), json_path)
    atomic_save(lambda tmp: tmp.write_text(markdown_table(rows)), md_path)
    return ResultsTable(name, rows, json_path, md_path)


def video(frames, path: str | os.PathLike, fps: float = 4.0, vlim: float | None = None,
          cmap: str = "RdBu_r", scale: int = 1):
    """Save flat-map frames as an animated GIF and return it for inline display.

    frames: (T, H, W) float, NaN outside the cortex mask (``FlatMapper.to_image(x, fill=np.nan)``)
    -> ``path`` (a looping GIF, colour limits +-vlim, default the 99th percentile of |frames|;
    NaN drawn light grey) and an ``IPython.display.HTML`` embedding it, which the HTML book
    shows as an animation. scale: integer upsampling of each pixel.
    """
    import base64

    import imageio.v3 as iio
    import matplotlib
    import numpy as np
    from IPython.display import HTML

    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or len(frames) == 0:
        raise InputError(f"video: expected frames (T, H, W), got shape {frames.shape}")
    if vlim is None:
        finite = np.abs(frames[np.isfinite(frames)])
        vlim = float(np.percentile(finite, 99)) if finite.size else 1.0
    rgba = matplotlib.colormaps[cmap]((np.clip(frames, -vlim, vlim) + vlim) / (2 * vlim))
    rgba[~np.isfinite(frames)] = (0.9, 0.9, 0.9, 1.0)
    rgb = (rgba[..., :3] * 255).astype(np.uint8)  # (T, H, W, 3)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, rgb, extension=".gif", duration=1000.0 / fps, loop=0)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return HTML(f'<img src="data:image/gif;base64,{data}" alt="{path.name}" style="max-width:100%"/>')


# --- running notebooks -----------------------------------------------------------------------
class NotebookError(RuntimeError):
    """A chapter notebook failed: which notebook, which cell, what went wrong (one line each)."""

    def __init__(self, notebook: str | os.PathLike, problem: str, cell_index: int | None = None,
                 first_line: str | None = None, executed: str | os.PathLike | None = None):
        self.notebook, self.problem, self.cell_index = os.fspath(notebook), problem, cell_index
        self.first_line, self.executed = first_line, None if executed is None else os.fspath(executed)
        where = f"{self.notebook}"
        if cell_index is not None:
            where += f": cell {cell_index} `{first_line}`"
        message = f"{where}: {problem}"
        if self.executed:
            message += f" (executed copy with the traceback: {self.executed})"
        super().__init__(message)


@dataclass
class NotebookRun:
    name: str          # file name, e.g. "01_flat_maps.ipynb"
    source: Path
    executed: Path
    seconds: float


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:80]
    return ""


def _check_source(nb, path: Path) -> int:
    """Index of the parameters cell; raise InputError when the notebook breaks the convention."""
    tagged = [i for i, c in enumerate(nb.cells)
              if c.cell_type == "code" and PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise InputError(
            "no code cell tagged 'parameters'; add one holding PROFILE = \"book\" and OUT_DIR = None "
            "(see the convention in fmri_bench/book.py)", path)
    if len(tagged) > 1:
        raise InputError(f"{len(tagged)} cells tagged 'parameters' (cells {tagged}); keep one", path)
    source = nb.cells[tagged[0]].source
    missing = [n for n in _REQUIRED_PARAMETERS if not re.search(rf"^{n}\s*=", source, re.M)]
    if missing:
        raise InputError(f"parameters cell {tagged[0]} does not assign {', '.join(missing)}", path)
    return tagged[0]


def _required_files(nb, path: Path) -> list[str]:
    outputs = nb.metadata.get("fmri_bench", {}).get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise InputError("metadata fmri_bench.outputs must be a list of file names", path)
    return outputs


@contextmanager
def _kernel_env():
    """A private kernelspec running *this* interpreter, and inline figures in the kernel.

    Writing the spec into a temporary JUPYTER_PATH entry means no install step, and no
    user-level ``python3`` spec can swap in another Python.
    """
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "MPLBACKEND", "PYDEVD_DISABLE_FILE_VALIDATION")}
    with tempfile.TemporaryDirectory(prefix="fmri-bench-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        # log level ERROR: the kernel's own chatter (a TCP-without-encryption notice on every
        # start) is noise for a local batch run; cell errors still come back as outputs.
        spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                         "--IPKernelApp.log_level=ERROR"],
                "display_name": "Python 3 (fmri-bench)", "language": "python"}
        atomic_save(lambda tmp: tmp.write_text(json.dumps(spec)), spec_dir / "kernel.json")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (tmp, saved["JUPYTER_PATH"]) if p)
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences a debugger warning in outputs
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _source_index(exec_index: int, param_index: int) -> int | None:
    """Cell index in the source notebook of a cell of the parameterised one (None: injected)."""
    if exec_index <= param_index:
        return exec_index
    return None if exec_index == param_index + 1 else exec_index - 1


def _running_cell(executed: Path, param_index: int) -> tuple[int | None, str | None]:
    """The last cell papermill started when execution broke off (it records start times)."""
    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:
        return None, None
    started = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not started:
        return None, None
    index = _source_index(started[-1], param_index)
    return index, _first_line(nb.cells[started[-1]].source) if index is not None else "(injected parameters)"


def _out_param(results: Path, source: Path) -> str:
    """OUT_DIR as injected: relative to the notebook's directory (the kernel's cwd) when both are
    inside the checkout, so executed copies and the HTML book carry no machine paths."""
    root = checkout_root()
    res, src = results.resolve(), source.resolve().parent
    if root is not None and res.is_relative_to(root) and src.is_relative_to(root):
        return os.path.relpath(res, src)
    return str(res)


def execute_notebook(source: str | os.PathLike, executed: str | os.PathLike, profile: str = "smoke",
                     out_dir: str | os.PathLike | None = None, cell_timeout: float | None = None) -> float:
    """Run one notebook with papermill, injecting PROFILE and OUT_DIR; return the seconds taken.

    Raises InputError for a notebook that breaks the convention, NotebookError for a failing
    cell or a missing output. The executed copy is written even when a cell fails.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    source, executed = Path(source), Path(executed)
    try:
        nb = nbformat.read(source, as_version=4)
    except Exception as err:  # nbformat raises several types for a broken file
        raise InputError(f"not a readable notebook ({type(err).__name__}: {err})", source) from err
    param_index = _check_source(nb, source)
    required = _required_files(nb, source)
    results = output_dir(out_dir)
    for name in required:  # a stale file from an earlier run must not satisfy the check
        (results / name).unlink(missing_ok=True)
    executed.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    with _kernel_env():
        try:
            papermill.execute_notebook(
                str(source), str(executed), parameters={"PROFILE": profile, "OUT_DIR": _out_param(results, source)},
                kernel_name=KERNEL_NAME, progress_bar=False, log_output=False, cwd=str(source.parent),
                execution_timeout=cell_timeout,
            )
        except PapermillExecutionError as err:
            index = _source_index(err.cell_index, param_index)
            first = _first_line(err.source) if index is not None else "(injected parameters)"
            raise NotebookError(source, f"{err.ename}: {_first_line(str(err.evalue))}".rstrip(": "),
                                index, first, executed) from None
        except Exception as err:  # kernel died, cell timed out, kernel did not start
            index, first = _running_cell(executed, param_index)
            raise NotebookError(source, f"{type(err).__name__}: {_first_line(str(err))}".rstrip(": "),
                                index, first, executed if executed.is_file() else None) from err
    seconds = time.perf_counter() - start

    done = nbformat.read(executed, as_version=4)
    for i, cell in enumerate(done.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code" and MUST_OUTPUT_TAG in tags and not cell.get("outputs"):
            index = _source_index(i, param_index)
            raise NotebookError(source, f"cell tagged '{MUST_OUTPUT_TAG}' produced no output",
                                index, _first_line(cell.source), executed)
    missing = [n for n in required if not (results / n).is_file() or (results / n).stat().st_size == 0]
    if missing:
        raise NotebookError(source, f"required output files missing or empty in {results}: {', '.join(missing)}",
                            executed=executed)
    # In the HTML book the injected cell shows the values used; the defaults would only confuse.
    done.cells[param_index].metadata.setdefault("tags", []).append("remove-cell")
    nbformat.write(done, executed)
    return seconds


def _select(paths: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return paths
    chosen = []
    for name in only:
        hits = [p for p in paths if name in (p.name, p.stem) or p.stem.startswith(f"{name}_")]
        if not hits:
            raise InputError(f"--only {name}: no such notebook; have {', '.join(p.stem for p in paths)}")
        chosen += [p for p in hits if p not in chosen]
    return sorted(chosen)


def run_notebooks(profile: str = "smoke", notebooks: list[str | os.PathLike] | None = None,
                  out_dir: str | os.PathLike | None = None, only: list[str] | None = None,
                  cell_timeout: float | None = None, verbose: bool = True) -> list[NotebookRun]:
    """Execute chapter notebooks in order, stopping at the first failure.

    notebooks: notebook files, or None for every ``notebooks/*.ipynb`` (sorted).
    out_dir: where executed copies (``<out_dir>/notebooks/``) and results (``<out_dir>/results/``,
    injected as OUT_DIR) go; default ``book/``.
    only: names (``01``, ``01_flat_maps`` or the file name) selecting a subset.
    """
    if notebooks is None:
        src = notebooks_dir()
        paths = sorted(src.glob("*.ipynb"))
        if not paths:
            raise InputError("no notebooks (*.ipynb) found", src)
    else:
        paths = sorted(Path(p) for p in notebooks)
        for p in paths:
            if not p.is_file():
                raise InputError("notebook not found", p)
    full_run = notebooks is None and not only
    paths = _select(paths, only)
    out = Path(out_dir) if out_dir is not None else book_dir()
    executed_dir, results = out / "notebooks", out / "results"
    if full_run and executed_dir.is_dir():  # a chapter whose source is gone must leave the book
        for stale in sorted(set(executed_dir.glob("*.ipynb")) - {executed_dir / p.name for p in paths}):
            stale.unlink()
            print(f"removed stale executed notebook {stale}", flush=True)

    runs = []
    for k, path in enumerate(paths, 1):
        if verbose:
            print(f"[{k}/{len(paths)}] {path.name} ({profile}) ...", end=" ", flush=True)
        try:
            seconds = execute_notebook(path, executed_dir / path.name, profile, results, cell_timeout)
        except (NotebookError, InputError):
            if verbose:
                print("FAILED", flush=True)
            raise
        runs.append(NotebookRun(path.name, path, executed_dir / path.name, seconds))
        if verbose:
            print(f"ok {seconds:.1f} s", flush=True)
    return runs


# --- building the HTML -----------------------------------------------------------------------
def _jupyter_book_command() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    raise InputError("jupyter-book not found next to this Python or on PATH; run `make book`")


def build_book(source: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
               toc: str | os.PathLike | None = None, strict: bool = False, verbose: bool = True) -> Path:
    """Build the HTML book with jupyter-book (no execution: notebooks are already executed).

    source: the book directory (default ``book/``); config: ``_config.yml`` at the repository
    root; toc: ``<source>/_toc.yml``. Returns the path of ``index.html``. Raises NotebookError
    (notebook = the book directory) when jupyter-book fails or Sphinx reports errors, or, with
    ``strict``, any warning (an unknown directive, a broken reference, a missing page).
    """
    source = Path(source) if source is not None else book_dir()
    config = Path(config) if config is not None else _root() / "_config.yml"
    toc = Path(toc) if toc is not None else source / "_toc.yml"
    for needed in (config, toc):
        if not needed.is_file():
            raise InputError("missing (needed to build the book)", needed)
    if not list((source / "notebooks").glob("*.ipynb")):
        print(f"warning: no executed notebooks in {source / 'notebooks'}; the book has only prose pages",
              flush=True)
    from fmri_bench.results_page import write_page

    write_page(source / "results", source / "results.md")  # the papers' tables beside ours
    # --path-output: without it jupyter-book writes _build/ next to the _config.yml it finds.
    cmd = _jupyter_book_command() + ["build", str(source), "--config", str(config), "--toc", str(toc),
                                     "--path-output", str(source)]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    start = time.perf_counter()
    # A fresh build every time: Sphinx's incremental build keeps pages of removed chapters and
    # reports a document's warnings only when that document is rebuilt.
    shutil.rmtree(source / "_build", ignore_errors=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # no terminal colours
    errors = [line for line in log.splitlines() if re.search(r"\b(ERROR|CRITICAL|SEVERE)\b", line)]
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    index = source / "_build" / "html" / "index.html"
    if proc.returncode != 0 or errors or not index.is_file():
        tail = "\n".join(errors or log.splitlines()[-20:])
        raise NotebookError(source, f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    if strict and warnings:
        raise NotebookError(source, f"{len(warnings)} Sphinx warnings (strict build):\n" + "\n".join(warnings))
    if verbose:
        for line in warnings:
            print(line, flush=True)
        print(f"book built in {seconds:.1f} s ({len(warnings)} warnings): {index.resolve()}", flush=True)
    return index
