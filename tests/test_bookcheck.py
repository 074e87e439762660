"""The real-browser check of the built book, on pages built on purpose (good and broken)."""

import os
import shutil
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from fmri_bench import bookcheck  # noqa: E402

BROWSER = bookcheck.find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None and not os.environ.get("CI"),
                                   reason="no chromium / chromedriver here (.ci/run installs them)")

NAV = '<nav class="bd-sidebar"><a href="{up}index.html">home</a><a href="{up}notebooks/a.html">A</a>' \
      '<a href="{up}notebooks/b.html">B</a></nav>'


def page(up: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>t</title>"
            f"<script defer src='http://cdn.invalid/asset.js'></script></head><body>{NAV.format(up=up)}{body}</body></html>")


def site(root: Path, broken: bool) -> Path:
    import matplotlib.pyplot as plt

    html = root / "html"
    (html / "notebooks").mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(html / "notebooks" / "fig.png")
    plt.close(fig)
    (html / "index.html").write_text(page("", "<p>intro</p>"))
    table = "<table><tr><td>1</td></tr></table>"
    (html / "notebooks" / "a.html").write_text(page("../", f"<img src='fig.png'>{table}"))
    body = f"<img src='fig.png'>{table}<a href='a.html#x'>ok</a>"
    if broken:
        body += ("<img src='missing.png'><a href='gone.html'>gone</a>"
                 "<div class='cell_output'><pre>Traceback (most recent call last):\n  File x\nValueError: boom</pre></div>")
    (html / "notebooks" / "b.html").write_text(page("../", body))
    return html


@needs_browser
def test_a_good_book_passes(tmp_path):
    html = site(tmp_path, broken=False)
    found = bookcheck.check_site(html, ["notebooks/a.html", "notebooks/b.html"], BROWSER)
    # the one external asset (an unresolvable host) is an offline note on each page, not a problem
    assert [p for p in found if not p.offline] == []
    assert {p.page for p in found} == {"index.html", "notebooks/a.html", "notebooks/b.html"}
    assert all("cdn.invalid/asset.js" in p.what for p in found)


@needs_browser
def test_broken_image_traceback_link_and_missing_chapter_are_found(tmp_path):
    html = site(tmp_path, broken=True)
    problems = bookcheck.check_site(html, ["notebooks/a.html", "notebooks/b.html", "notebooks/c.html"], BROWSER)
    lines = [p.line() for p in problems if not p.offline]
    on_b = [line for line in lines if line.startswith("notebooks/b.html: ")]
    assert any("image did not load: missing.png" in line for line in on_b), lines
    assert any("a cell shows an error: Traceback (most recent call last)" in line for line in on_b), lines
    assert any("broken internal link: gone.html" in line for line in on_b), lines
    assert "notebooks/c.html: page missing from the build" in lines
    assert any("navigation does not list notebooks/c.html" in line for line in lines)
    assert not [line for line in lines if line.startswith("notebooks/a.html: ") and "c.html" not in line], lines


def test_chapter_pages_follow_the_executed_notebooks(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in ("01_flat_maps.ipynb", "00_cohort.ipynb"):
        (tmp_path / "notebooks" / name).write_text("{}")
    assert bookcheck.chapter_pages(tmp_path) == ["notebooks/00_cohort.html", "notebooks/01_flat_maps.html"]


def test_build_extension_writes_each_script_once():
    from sphinx.builders.html._assets import _JavaScript

    from fmri_bench import sphinx_ext

    thebe = 'const THEBE_JS_URL = "x"'
    ctx = {"script_files": [_JavaScript("a.js"), _JavaScript(None, body=thebe), _JavaScript("b.js"),
                            _JavaScript("", body=thebe, priority=500), _JavaScript("a.js", priority=200)]}
    sphinx_ext._page_context(None, "p", "page.html", ctx, None)
    assert [(s.filename or "", s.attributes.get("body", "")) for s in ctx["script_files"]] == [
        ("a.js", ""), ("", thebe), ("b.js", "")]
    assert ctx["default_mode"] == "light"
