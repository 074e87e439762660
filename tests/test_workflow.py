"""The book workflow (.github/workflows/book.yml) and .ci/run call the README's two commands."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"^make (book|test)\b", text, flags=re.M))


def test_book_workflow_parses_and_runs_the_readme_commands():
    assert readme_commands() == {"book", "test"}
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    assert {"build", "deploy"} <= set(wf["jobs"])
    steps = wf["jobs"]["build"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any(r.strip() == "make test" for r in runs), runs
    assert any(r.strip().startswith("make book") for r in runs), runs
    assert any("chromium" in r for r in runs), "the page check needs a browser"
    upload = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-pages-artifact")]
    assert upload and upload[0]["with"]["path"] == "book/_build/html"
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build" and any("deploy-pages" in s.get("uses", "") for s in deploy["steps"])
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on:` key as True
    assert "push" in on


def test_ci_runs_the_tests_and_the_smoke_book_with_a_browser():
    text = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "make test" in lines and "make book PROFILE=smoke" in lines
    assert lines.index("make test") < lines.index("make book PROFILE=smoke")
    assert "chromium-driver" in text and "CI=true" in text
