"""The book pipeline: every chapter runs in the smoke profile; the runner reports failures.

Chapter tests are parametrised over ``notebooks/*.ipynb``; runner tests use tiny notebooks
written in the test. Each executed notebook starts a kernel (~2 s).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat
import pytest

from fmri_bench import book, cli
from fmri_bench.errors import InputError

CHAPTERS = sorted(book.notebooks_dir().glob("*.ipynb"))


def make_notebook(path: Path, *code: str, params: str | None = 'PROFILE = "book"\nOUT_DIR = None',
                  tags: dict[int, list[str]] | None = None, outputs: list[str] | None = None) -> Path:
    """A notebook: a markdown title (cell 0), the parameters cell (cell 1), then ``code`` cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}")]
    if params is not None:
        cell = nbformat.v4.new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    cells += [nbformat.v4.new_code_cell(src) for src in code]
    for index, cell_tags in (tags or {}).items():
        cells[index].metadata["tags"] = cell_tags
    nb.cells = cells
    if outputs is not None:
        nb.metadata["fmri_bench"] = {"outputs": outputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# --- the chapters --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_runs_in_smoke_profile(source, tmp_path):
    (run,) = book.run_notebooks("smoke", [source], out_dir=tmp_path, verbose=False)
    assert run.executed == tmp_path / "notebooks" / source.name
    done = nbformat.read(run.executed, as_version=4)
    code = [c for c in done.cells if c.cell_type == "code"]
    injected = next(c for c in code if "injected-parameters" in c.metadata.get("tags", []))
    assert 'PROFILE = "smoke"' in injected.source
    # smoke chapters aim at well under a minute (CPU); this wall-clock bound only catches runaways
    # (several workers share the 2 cores here, and a loaded CI runner is slower still)
    assert run.seconds < 300, f"{source.name}: smoke profile took {run.seconds:.0f} s"


@pytest.mark.parametrize("source", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_source_follows_the_convention(source):
    nb = nbformat.read(source, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit without outputs"
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    lines = [ln.split("#")[0].strip() for ln in nb.cells[params[0]].source.splitlines()]
    assert [ln for ln in lines if ln] == ['PROFILE = "book"', "OUT_DIR = None"]
    following = next(c for c in nb.cells[params[0] + 1:] if c.cell_type == "code")
    assert re.search(r"profile_settings\(\s*PROFILE\b", following.source)
    assert nb.metadata["kernelspec"]["name"] == "python3"


# --- the runner ----------------------------------------------------------------------------
def test_profile_and_out_dir_are_injected(tmp_path):
    nb = make_notebook(
        tmp_path / "src" / "inj.ipynb",
        "from fmri_bench import book\n"
        "cfg = book.profile_settings(PROFILE, book=dict(n=100, name='full'), smoke=dict(n=3))",
        "(book.output_dir(OUT_DIR) / 'seen.txt').write_text(f'{PROFILE} {cfg.n} {cfg.name}')\n"
        "book.save_results('inj', [dict(n=cfg.n, score=0.123456)], out_dir=OUT_DIR)",
        tags={3: ["must-output"]}, outputs=["seen.txt", "inj.json", "inj.md"],
    )
    (run,) = book.run_notebooks("smoke", [nb], out_dir=tmp_path / "out", verbose=False)
    results = tmp_path / "out" / "results"
    assert (results / "seen.txt").read_text() == "smoke 3 full"
    assert json.loads((results / "inj.json").read_text())["rows"] == [{"n": 3, "score": 0.123456}]
    assert "| 3 | 0.1235 |" in (results / "inj.md").read_text()
    done = nbformat.read(run.executed, as_version=4)
    assert done.cells[2].metadata["tags"] == ["injected-parameters"]
    assert done.cells[1].metadata["tags"] == ["parameters", "remove-cell"]  # defaults hidden in the book
    assert f'OUT_DIR = "{results}"' in done.cells[2].source
    assert done.cells[4].outputs[0]["data"]["text/markdown"].startswith("| n | score |")
    assert done.metadata["kernelspec"]["name"] == "python3"  # the executed copy stays portable


def test_failing_cell_names_notebook_cell_and_exception(tmp_path):
    good = make_notebook(tmp_path / "a_good.ipynb", "x = 1")
    bad = make_notebook(tmp_path / "b_bad.ipynb", "x = 1", "y = 2\nraise ValueError('boom: 42')", "z = 3")
    after = make_notebook(tmp_path / "c_after.ipynb", "x = 1")
    with pytest.raises(book.NotebookError) as info:
        book.run_notebooks("smoke", [after, bad, good], out_dir=tmp_path / "out", verbose=False)
    err = info.value
    assert (err.cell_index, err.first_line) == (3, "y = 2")  # index in the source notebook
    assert str(err).startswith(f"{bad}: cell 3 `y = 2`: ValueError: boom: 42")
    assert (tmp_path / "out" / "notebooks" / "a_good.ipynb").is_file()
    assert not (tmp_path / "out" / "notebooks" / "c_after.ipynb").exists()  # stopped at the failure


def test_missing_parameters_cell_is_a_clear_error(tmp_path):
    nb = make_notebook(tmp_path / "noparams.ipynb", "x = 1", params=None)
    with pytest.raises(InputError, match="noparams.ipynb: no code cell tagged 'parameters'"):
        book.run_notebooks("smoke", [nb], out_dir=tmp_path / "out", verbose=False)
    nb = make_notebook(tmp_path / "noout.ipynb", "x = 1", params='PROFILE = "book"')
    with pytest.raises(InputError, match="does not assign OUT_DIR"):
        book.run_notebooks("smoke", [nb], out_dir=tmp_path / "out", verbose=False)


def test_missing_outputs_stop_the_run(tmp_path):
    silent = make_notebook(tmp_path / "silent.ipynb", "x = 1", "y = 2", tags={3: ["must-output"]})
    with pytest.raises(book.NotebookError, match=r"silent.ipynb: cell 3 `y = 2`: cell tagged 'must-output' produced no output"):
        book.run_notebooks("smoke", [silent], out_dir=tmp_path / "out", verbose=False)
    stale = tmp_path / "out" / "results" / "table.json"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("{}")  # left by an earlier run: must not count
    nofile = make_notebook(tmp_path / "nofile.ipynb", "x = 1", outputs=["table.json"])
    with pytest.raises(book.NotebookError, match="required output files missing or empty .*: table.json"):
        book.run_notebooks("smoke", [nofile], out_dir=tmp_path / "out", verbose=False)


def test_cli_runs_a_notebook_dir(tmp_path, capsys):
    src = tmp_path / "src"
    make_notebook(src / "01_one.ipynb", "print(PROFILE)")
    make_notebook(src / "02_two.ipynb", "raise KeyError('nope')")
    argv = ["book", "--profile", "smoke", "--notebooks", str(src), "--out", str(tmp_path / "out"), "--no-build"]
    assert cli.main(argv + ["--only", "01"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] 01_one.ipynb (smoke) ... ok" in out and "1 notebooks executed" in out
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "[2/2] 02_two.ipynb (smoke) ... FAILED" in captured.out
    assert f"{src / '02_two.ipynb'}: cell 2 `raise KeyError('nope')`: KeyError: 'nope'" in captured.err
    assert cli.main(argv + ["--only", "03"]) == 2
    assert "--only 03: no such notebook; have 01_one, 02_two" in capsys.readouterr().err


# --- the library helpers (no kernel) ---------------------------------------------------------
def test_profile_settings():
    book_cfg = dict(n_frames=300, space="fs_LR_32k")
    smoke = book.profile_settings("smoke", book=book_cfg, smoke=dict(n_frames=20))
    full = book.profile_settings("book", book=book_cfg, smoke=dict(n_frames=20))
    assert (smoke.n_frames, smoke.space, smoke.profile) == (20, "fs_LR_32k", "smoke")
    assert (full.n_frames, full.profile) == (300, "book")
    with pytest.raises(InputError, match=r"smoke settings \['n_frame'\] are not book settings"):
        book.profile_settings("smoke", book=book_cfg, smoke=dict(n_frame=20))
    with pytest.raises(InputError, match="unknown profile 'fast'"):
        book.profile_settings("fast", book=book_cfg)


def test_save_results_and_table(tmp_path):
    import numpy as np

    table = book.save_results("t1", [dict(method="mae", acc=np.float32(0.25)), dict(method="fc", acc=0.5)],
                              out_dir=tmp_path, meta={"source": "synthetic"})
    data = json.loads((tmp_path / "t1.json").read_text())
    assert data["meta"] == {"source": "synthetic"} and data["rows"][1] == {"method": "fc", "acc": 0.5}
    assert table.markdown().splitlines() == ["| method | acc |", "|---|---|", "| mae | 0.25 |", "| fc | 0.5 |"]
    with pytest.raises(InputError, match="letters, digits"):
        book.save_results("../escape", [dict(a=1)], out_dir=tmp_path)


@pytest.mark.slow
def test_build_book_offline_from_an_executed_notebook(tmp_path):
    """jupyter-book builds the repository's _config.yml over a tiny book with one chapter."""
    src = tmp_path / "book"
    (src / "notebooks").mkdir(parents=True)
    (src / "intro.md").write_text("# Tiny\n\nIntro page.\n")
    (src / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - glob: notebooks/*\n")
    nb = make_notebook(tmp_path / "nb" / "01_ch.ipynb", "from fmri_bench import book\n"
                       "book.save_results('tab', [dict(method='flat', score=0.75)], out_dir=OUT_DIR)")
    book.run_notebooks("smoke", [nb], out_dir=src, verbose=False)
    index = book.build_book(src, config=Path(book.__file__).parents[1] / "_config.yml", strict=True, verbose=False)
    assert index == src / "_build" / "html" / "index.html"
    page = (src / "_build" / "html" / "notebooks" / "01_ch.html").read_text()
    assert "<table" in page and "0.75" in page
    assert "results" not in {p.name for p in (src / "_build" / "html").iterdir()}  # tables are not pages
