"""The dataset catalogue (data/datasets.yaml) and `fmri-bench data list`."""

import json
import re
from pathlib import Path

import pytest

from fmri_bench import catalog
from fmri_bench.cli import main
from fmri_bench.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_catalogue_entries_are_complete():
    cat = catalog.load_catalogue()
    assert {"synth-smoke", "synth-book", "hcp-ya", "fmriprep", "flatmap-shards"} <= set(cat)
    for e in cat.values():
        assert e.kind in catalog.KINDS and e.what and e.make and e.licence and e.used_by, e
        assert not Path(e.path).is_absolute() and ".." not in Path(e.path).parts, e


def test_catalogue_names_every_dataset_the_chapters_use():
    cat = catalog.load_catalogue()
    used = set()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        for cell in cells:
            used |= set(re.findall(r'cohort="([a-z]+)"', "".join(cell["source"])))
    assert used, "no chapter names a cohort: the pattern no longer matches the notebooks"
    assert {f"synth-{c}" for c in used} <= set(cat), sorted(used)
    # and every chapter a dataset claims exists
    chapters = {p.name[:2] for p in (ROOT / "notebooks").glob("*.ipynb")}
    claimed = {m for e in cat.values() for u in e.used_by for m in re.findall(r"\bch(\d\d)\b", u)}
    assert claimed <= chapters, sorted(claimed - chapters)


def test_data_list_shows_what_is_present(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path))
    (tmp_path / "synth" / "smoke-seed0").mkdir(parents=True)
    (tmp_path / "synth" / "smoke-seed0" / "run.bin").write_bytes(b"x" * 2500)
    assert main(["data", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["synth-smoke"]["present"] and rows["synth-smoke"]["size"] == 2500
    assert not rows["hcp-ya"]["present"] and rows["hcp-ya"]["size"] is None
    assert main(["data", "list"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"synth-smoke\s+synthetic\s+2\.5 kB", text), text
    assert "terms: WU-Minn HCP" in text and f"data folder: {tmp_path}" in text


def test_data_dir_defaults_to_the_checkouts_data_folder(monkeypatch):
    from fmri_bench.paths import data_dir

    monkeypatch.delenv("FMRI_BENCH_DATA", raising=False)
    monkeypatch.delenv("FMRI_BENCH_CACHE", raising=False)
    assert data_dir() == ROOT / "data"
    monkeypatch.setenv("FMRI_BENCH_CACHE", "/tmp/fmri-bench-cache-test")
    assert data_dir() == Path("/tmp/fmri-bench-cache-test/data")


def test_a_real_dataset_by_name_that_is_absent_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path))
    with pytest.raises(InputError, match=r"dataset 'flatmap-shards' is not here .*to get it: download"):
        catalog.resolve("flatmap-shards")
    assert main(["baseline", "fc", "--task", "sex", "--data", "hcp-ya"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmri-bench baseline: error: dataset 'hcp-ya' is not here") and "\n" not in err
    # a present one resolves to its folder; an unknown name is a path as before
    (tmp_path / "flatmap_shards").mkdir()
    (tmp_path / "flatmap_shards" / "a.tar").write_bytes(b"")
    assert catalog.resolve("flatmap-shards") == tmp_path / "flatmap_shards"
    assert catalog.resolve("no-such-name") == Path("no-such-name")


def test_malformed_catalogue_names_file_and_entry(tmp_path):
    bad = tmp_path / "datasets.yaml"
    bad.write_text("datasets:\n  x:\n    kind: imaginary\n    what: a\n    path: p\n    make: m\n"
                   "    licence: l\n    used_by: [t]\n")
    with pytest.raises(InputError, match=r"datasets.yaml: dataset 'x': kind must be one of"):
        catalog.load_catalogue(bad)
    bad.write_text("datasets:\n  x:\n    kind: real\n")
    with pytest.raises(InputError, match=r"dataset 'x': missing \['what', 'path', 'make', 'licence', 'used_by'\]"):
        catalog.load_catalogue(bad)
