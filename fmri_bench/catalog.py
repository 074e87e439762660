"""The dataset catalogue: every dataset fmri_bench reads, by name, and what is present here.

In: ``data/datasets.yaml`` of the source checkout (name -> kind, what, path, make, licence,
used_by). Out: ``Entry`` rows, each resolved against ``paths.data_dir()`` (present or not, its
size), for ``fmri-bench data list``; ``resolve(name_or_path)`` turns a catalogue name into its
directory so commands can take ``--data NAME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fmri_bench.errors import InputError
from fmri_bench.paths import checkout_root, data_dir

KINDS = ("synthetic", "derived", "real")
FIELDS = ("kind", "what", "path", "make", "licence", "used_by")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    what: str
    path: str
    make: str
    licence: str
    used_by: tuple[str, ...] = field(default_factory=tuple)

    def location(self, root: Path | None = None) -> Path:
        return (root or data_dir()) / self.path

    def present(self, root: Path | None = None) -> bool:
        loc = self.location(root)
        return loc.is_dir() and any(loc.iterdir())


def catalogue_path() -> Path:
    root = checkout_root()
    if root is None or not (root / "data" / "datasets.yaml").is_file():
        raise InputError("the dataset catalogue (data/datasets.yaml) ships with the source checkout; "
                         "run from a clone of the repository")
    return root / "data" / "datasets.yaml"


def load_catalogue(path: str | os.PathLike | None = None) -> dict[str, Entry]:
    """name -> Entry; a malformed catalogue is an InputError naming the file and the entry."""
    import yaml

    path = Path(path) if path is not None else catalogue_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"cannot read the dataset catalogue: {' '.join(str(err).split())}", path) from err
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict):
        raise InputError("a dataset catalogue needs a top-level 'datasets:' mapping", path)
    out = {}
    for name, spec in doc["datasets"].items():
        if not isinstance(spec, dict):
            raise InputError(f"dataset {name!r}: expected a mapping of {', '.join(FIELDS)}", path)
        missing = [k for k in FIELDS if k not in spec]
        extra = sorted(set(spec) - set(FIELDS))
        if missing or extra:
            raise InputError(f"dataset {name!r}: missing {missing}, unknown {extra}", path)
        if spec["kind"] not in KINDS:
            raise InputError(f"dataset {name!r}: kind must be one of {KINDS}, got {spec['kind']!r}", path)
        out[name] = Entry(name, spec["kind"], spec["what"], spec["path"], spec["make"], spec["licence"],
                          tuple(spec["used_by"]))
    return out


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links are not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def listing(root: Path | None = None, catalogue: dict[str, Entry] | None = None) -> list[dict]:
    """One row per catalogued dataset: name, kind, present, path, size (bytes or None), used_by."""
    root = root or data_dir()
    rows = []
    for e in (catalogue or load_catalogue()).values():
        here = e.present(root)
        loc = e.location(root)
        rows.append({"name": e.name, "kind": e.kind, "present": here, "path": str(loc),
                     "size": dir_size(loc.resolve()) if here else None, "used_by": list(e.used_by),
                     "licence": e.licence, "make": e.make})
    return rows


def format_listing(rows: list[dict]) -> str:
    lines = [f"data folder: {data_dir()}"]
    for r in rows:
        state = human(r["size"]) if r["present"] else "absent"
        lines.append(f"{r['name']:<16} {r['kind']:<9} {state:>9}  {r['path']}")
        lines.append(f"{'':<16} used by: {'; '.join(r['used_by'])}")
        if not r["present"]:
            lines.append(f"{'':<16} to get it: {r['make']}")
        if r["kind"] == "real":
            lines.append(f"{'':<16} terms: {r['licence']}")
    return "\n".join(lines)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A catalogue name -> its directory under the data folder; anything else is taken as a path."""
    text = str(name_or_path)
    if os.sep not in text and not Path(text).exists():
        try:
            cat = load_catalogue()
        except InputError:
            cat = {}
        if text in cat:
            entry = cat[text]
            if entry.kind == "synthetic" and entry.path.startswith("synth/"):
                from fmri_bench.synth import ensure_cohort

                profile, _, seed = Path(entry.path).name.rpartition("-seed")
                return ensure_cohort(profile, seed=int(seed), progress=True)  # made on first use
            if not entry.present():
                raise InputError(f"dataset {text!r} is not here ({entry.location()}); to get it: {entry.make}")
            return entry.location()
    return Path(text)
