"""Probes: grid heads learn toy problems, selection follows validation, trait decoding."""

import numpy as np
import pytest
import torch

from fmri_bench.errors import InputError
from fmri_bench.probe import (
    AttentivePoolHead, Features, ProbeConfig, apply_bins, quantile_bins, train_probe, trait_logistic,
)

FAST = ProbeConfig(epochs=6, batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def separable(rng, n, d=16, c=3):
    """Gaussian blobs, one per class, far apart -> (N, D), (N,)."""
    centers = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_linear_grid_learns_separable(rng):
    x, y = separable(rng, 600)
    res = train_probe(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], cfg=FAST)
    assert res.head == "linear"
    assert res.val_grid.shape == (3, 3)
    assert res.test_acc > 0.95
    assert res.val_acc == res.val_grid.max()
    assert res.confusion.sum() == 100 and np.trace(res.confusion) == round(100 * res.test_acc)
    np.testing.assert_array_equal(res.predict(x[500:]), res.test_pred)
    assert res.chance < 0.6


def test_attentive_head_learns_token_signal(rng):
    # class lives in one token at a random position among noise tokens: mean pooling dilutes
    # it, attention can find it (the token also carries a marker dimension)
    n, L, d = 500, 12, 16
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, L, d)).astype(np.float32)
    pos = rng.integers(0, L, n)
    x[np.arange(n), pos, 0] = 6.0
    x[np.arange(n), pos, 1] = np.where(y == 1, 4.0, -4.0)
    cfg = ProbeConfig(epochs=15, batch_size=64, lr_scales=(3.0, 30.0), weight_decays=(1e-3,),
                      attn_head_dim=8)
    res = train_probe(x[:350], y[:350], x[350:425], y[350:425], x[425:], y[425:], cfg=cfg)
    assert res.head == "attentive" and res.val_grid.shape == (2, 1)
    assert res.test_acc > 0.95


def test_attentive_head_shapes():
    head = AttentivePoolHead(32, 5, embed_dim=32, head_dim=8)
    pooled, attn = head.pool(torch.randn(4, 7, 32))
    assert pooled.shape == (4, 32) and attn.shape == (4, 4, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 4))
    head(torch.randn(4, 7, 32)).sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_selection_follows_validation_not_test(rng):
    # test labels are flipped: the head that learns is best on val and worst on test, the
    # head with a negligible lr stays near chance on both. Choosing on test would pick it.
    # One informative dimension among 20 keeps a random (untrained) head near chance.
    y = rng.integers(0, 2, 500)
    x = rng.normal(size=(500, 20)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 3.0, -3.0)
    cfg = ProbeConfig(epochs=20, batch_size=64, lr_scales=(1e-6, 100.0), weight_decays=(1e-3,))
    res = train_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], 1 - y[400:], cfg=cfg)
    assert res.best_lr_scale == 100.0
    assert res.val_grid[1, 0] > 0.95 and res.val_grid[0, 0] < 0.8
    assert res.test_acc < 0.05
    assert res.test_acc == pytest.approx((res.predict(x[400:]) == 1 - y[400:]).mean())


def test_grid_heads_train_independently(rng):
    # a head's result must not depend on which other heads share the grid
    x, y = separable(rng, 300)
    args = (x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:])
    one = train_probe(*args, cfg=ProbeConfig(epochs=3, lr_scales=(3.0,), weight_decays=(1e-3,)))
    two = train_probe(*args, cfg=ProbeConfig(epochs=3, lr_scales=(3.0, 30.0), weight_decays=(1e-3,)))
    w1 = one.heads.heads[0].linear.weight
    w2 = two.heads.heads[0].linear.weight
    assert w1.shape == w2.shape
    # same seed, same first head init: identical training
    torch.testing.assert_close(w1, w2)


def test_features_roundtrip(tmp_path, rng):
    f = Features({"cls": rng.normal(size=(5, 3))}, np.arange(5), np.array(list("aabbc")),
                 np.array([f"k{i}" for i in range(5)]))
    f.save(tmp_path / "f.npz")
    g = Features.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(g["cls"], f["cls"])
    assert g.subset([0, 2]).subjects.tolist() == ["a", "b"]


def test_quantile_bins_fit_on_train_only(rng):
    train = rng.uniform(0, 1, 400)
    test = rng.uniform(10, 11, 50)  # a shifted test set must not move the edges
    edges = quantile_bins(train, 4)
    np.testing.assert_allclose(edges, np.quantile(train, [0.25, 0.5, 0.75]))
    assert np.bincount(apply_bins(train, edges)).tolist() == [100, 100, 100, 100]
    assert (apply_bins(test, edges) == 3).all()
    with pytest.raises(InputError):
        quantile_bins([1.0, 2.0], 3)


def planted_age(rng, n_sub=40, clips=3):
    """Clips of n_sub subjects (siblings in pairs) whose first feature carries their age."""
    subjects = np.repeat(np.arange(n_sub), clips)
    age = np.repeat(rng.uniform(20, 40, n_sub), clips)
    x = np.c_[age / 10 + rng.normal(scale=0.2, size=len(age)), rng.normal(size=(len(age), 5))]
    return x, age, subjects, subjects // 2


def test_trait_logistic_recovers_planted_trait(rng):
    x, age, subjects, families = planted_age(rng)
    res = trait_logistic(x, age, subjects, families, q=2, n_splits=4, n_folds=3, n_Cs=4)
    assert res.n_classes == 2 and res.chance == 0.5
    assert res.mean > 0.85 and res.ci_low <= res.mean <= res.ci_high
    assert len(res.scores) == 4
    noise = trait_logistic(rng.normal(size=x.shape), age, subjects, families, q=2, n_splits=4,
                           n_folds=3, n_Cs=4)
    assert noise.mean < 0.75


def test_trait_logistic_tests_only_families_pretraining_never_saw(rng):
    n_sub, clips = 40, 3
    x, age, subjects, families = planted_age(rng, n_sub, clips)
    seen = set(range(36))  # families 0..17 seen, 18 and 19 (subjects 36..39) never
    res = trait_logistic(x, age, subjects, families, q=2, n_splits=3, n_folds=3, n_Cs=3, exclude=seen)
    assert res.n_test == 4 * clips  # the two unseen families, every split
    with pytest.raises(InputError, match="never saw"):
        trait_logistic(x, age, subjects, families, q=2, n_splits=2, n_folds=3, exclude=set(range(n_sub)))


def test_trait_logistic_too_few_families(rng):
    with pytest.raises(InputError, match="need at least 6 families, found 4"):
        trait_logistic(rng.normal(size=(8, 2)), np.arange(8) % 2, np.arange(8), np.arange(8) // 2)


def test_attentive_head_ignores_masked_tokens():
    head = AttentivePoolHead(8, 3, head_dim=4)
    x = torch.randn(2, 5, 8)
    keep = torch.tensor([[True, True, False, True, False]] * 2)
    _, attn = head.pool(x, keep)
    assert attn[..., ~keep[0]].max() < 1e-6
    y = x.clone()
    y[:, ~keep[0]] = 100.0  # whatever sits in masked tokens does not matter
    torch.testing.assert_close(head(x, keep), head(y, keep))


def test_trait_across_states_needs_both_states(rng):
    subjects = np.repeat(np.arange(12), 2)
    x, y = rng.normal(size=(24, 3)), np.tile([0, 1], 12)
    rest = np.ones(24, bool)  # no task clips at all
    with pytest.raises(InputError, match="no test clips"):
        trait_logistic(x, y, subjects, n_splits=1, n_folds=3, train_mask=rest, test_mask=~rest)
