"""Subject-disjoint, family-grouped train / val / test splits.

In: one subject id per sample (a clip) and, optionally, one family id per sample (HCP twins and
siblings share a family; without families every subject is its own family). Out: a ``Split``,
three arrays of sample indices such that no subject and no family appears in two of them, so a
probe never sees a relative of a test subject (the upstream HCP split groups families with
``GroupKFold`` into 20 batches, arXiv 2510.13768 and MedARC-AI/fmri-fm).

- ``subject_split``: one random split (sklearn ``GroupShuffleSplit`` on family id), from a seed.
- ``resplits``: many such splits from one seed, for means and CIs over re-splits (Brainmarks).
- ``kfold_split``: the deterministic upstream style: families dealt into k ``GroupKFold`` folds,
  fold ``i`` is test, fold ``i + 1`` is val, the rest train.
- ``check_disjoint``: the assertion every benchmark runs before it trains anything.
- ``families_for``: family id per sample from a participants table (participants.tsv).

Too few families for three non-empty parts raises ``InputError`` saying how many are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit

from fmri_bench.errors import InputError

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Sample indices of one split. ``train`` / ``val`` / ``test``: sorted int64 arrays."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int | None = None

    def part(self, name: str) -> np.ndarray:
        if name not in PARTS:
            raise KeyError(f"unknown split part {name!r}; expected one of {PARTS}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {name: int(len(self.part(name))) for name in PARTS}

    def restrict(self, train=None, val=None, test=None) -> "Split":
        """Keep, in each part, only samples where the given boolean (N,) mask is True.

        For decoding across brain states: e.g. ``train=is_rest, val=is_rest, test=is_task``
        trains on rest clips of the train subjects and tests on task clips of the test subjects.
        """
        def keep(idx, mask):
            return idx if mask is None else idx[np.asarray(mask, dtype=bool)[idx]]

        return Split(keep(self.train, train), keep(self.val, val), keep(self.test, test), self.seed)

    def to_dict(self) -> dict:
        return {**{name: self.part(name).tolist() for name in PARTS}, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(*(np.asarray(d[name], dtype=np.int64) for name in PARTS), seed=d.get("seed"))


def _groups(subjects, families) -> tuple[np.ndarray, np.ndarray]:
    subjects = np.asarray(subjects)
    if subjects.ndim != 1:
        raise InputError(f"subjects must be one id per sample (1-D), got shape {subjects.shape}")
    if families is None:
        return subjects, subjects
    families = np.asarray(families)
    if families.shape != subjects.shape:
        raise InputError(f"families {families.shape} and subjects {subjects.shape} differ in length")
    # a subject listed under two families would leak across the split
    for s in np.unique(subjects):
        fam = np.unique(families[subjects == s])
        if len(fam) > 1:
            raise InputError(f"subject {s!r} belongs to several families {fam.tolist()}")
    return subjects, families


def _part_sizes(n_families: int, n_subjects: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise InputError(f"val_frac={val_frac} and test_frac={test_frac} must be in (0, 1) with sum < 1")
    n_test = max(1, int(round(test_frac * n_families)))
    n_val = max(1, int(round(val_frac * n_families)))
    if n_families - n_test - n_val < 1:
        raise InputError(
            f"too few families for subject-disjoint train/val/test splits: need at least 3 "
            f"(one per part), found {n_families} families from {n_subjects} subjects"
        )
    return n_val, n_test


def _unseen(families: np.ndarray, subjects: np.ndarray, exclude) -> np.ndarray:
    """(N,) bool: the sample's family holds no subject of ``exclude`` (e.g. pretraining subjects)."""
    if exclude is None:
        return np.ones(len(subjects), bool)
    seen = set(np.unique(families[np.isin(subjects, list(exclude))]).tolist())
    return ~np.isin(families, list(seen))


def subject_split(subjects, families=None, val_frac: float = 0.15, test_frac: float = 0.15,
                  seed: int = 0, exclude=None) -> Split:
    """One random family-grouped split. subjects, families: (N,) ids per sample -> Split.

    exclude: subjects that may only be in ``train`` (the subjects an encoder was pretrained on:
    the flat-map MAE paper's probes are tested on subjects pretraining never saw). Their whole
    families stay in train; val and test are drawn from the other families, as many as the
    fractions of all families ask for, fewer when the unseen families run short.
    """
    subjects, families = _groups(subjects, families)
    n_fam = len(np.unique(families))
    n_val, n_test = _part_sizes(n_fam, len(np.unique(subjects)), val_frac, test_frac)
    unseen = _unseen(families, subjects, exclude)
    n_unseen = len(np.unique(families[unseen]))
    if n_unseen < 2:
        raise InputError(f"too few families never seen in pretraining for val and test: need at least 2, "
                         f"found {n_unseen} of {n_fam}")
    if n_val + n_test > n_unseen:  # only with exclude: the seen families keep train non-empty
        n_test = min(n_unseen - 1, max(1, int(round(n_unseen * n_test / (n_val + n_test)))))
        n_val = n_unseen - n_test
    rs = np.random.SeedSequence(seed).generate_state(2)
    pool, seen = np.flatnonzero(unseen), np.flatnonzero(~unseen)
    rest, test = next(GroupShuffleSplit(1, test_size=n_test, random_state=int(rs[0]))
                      .split(pool, groups=families[pool]))
    rest, test = pool[rest], pool[test]
    if n_val == len(np.unique(families[rest])):
        train, val = rest[:0], rest
    else:
        tr, va = next(GroupShuffleSplit(1, test_size=n_val, random_state=int(rs[1]))
                      .split(rest, groups=families[rest]))
        train, val = rest[tr], rest[va]
    return Split(np.sort(np.concatenate([train, seen])), np.sort(val), np.sort(test), seed=seed)


def resplits(subjects, families=None, n_splits: int = 10, val_frac: float = 0.15,
             test_frac: float = 0.15, seed: int = 0, exclude=None) -> list[Split]:
    """``n_splits`` independent random splits; split ``i`` uses the i-th child of ``seed``.
    exclude: subjects kept in train (``subject_split``)."""
    children = np.random.SeedSequence(seed).generate_state(n_splits)
    return [subject_split(subjects, families, val_frac, test_frac, seed=int(s), exclude=exclude)
            for s in children]


def kfold_split(subjects, families=None, n_folds: int = 5, fold: int = 0) -> Split:
    """Families dealt into ``n_folds`` GroupKFold folds; test = fold, val = fold + 1, train rest."""
    subjects, families = _groups(subjects, families)
    n_fam = len(np.unique(families))
    if n_folds < 3 or n_fam < n_folds:
        raise InputError(
            f"too few families for {n_folds}-fold subject-disjoint splits: need at least "
            f"{max(n_folds, 3)}, found {n_fam} families from {len(np.unique(subjects))} subjects"
        )
    folds = [test for _, test in GroupKFold(n_folds).split(subjects, groups=families)]
    test, val = folds[fold % n_folds], folds[(fold + 1) % n_folds]
    train = np.setdiff1d(np.arange(len(subjects)), np.concatenate([test, val]))
    return Split(np.sort(train), np.sort(val), np.sort(test), seed=None)


def check_disjoint(split: Split, subjects, families=None, exclude=None) -> None:
    """Raise AssertionError naming the overlap if any subject or family is in two parts, or if
    a subject of ``exclude`` (or a relative) is in val or test."""
    subjects, families = _groups(subjects, families)
    if exclude is not None:
        unseen = _unseen(families, subjects, exclude)
        for name in ("val", "test"):
            bad = sorted(set(subjects[split.part(name)][~unseen[split.part(name)]].tolist()))
            assert not bad, f"{name} holds subjects seen in pretraining or their relatives: {bad[:5]}"
    for ids, what in ((subjects, "subject"), (families, "family")):
        sets = {name: set(ids[split.part(name)].tolist()) for name in PARTS}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sets[a] & sets[b]
            assert not shared, f"{what} ids shared by {a} and {b}: {sorted(shared)[:5]}"
    all_idx = np.concatenate([split.part(name) for name in PARTS])
    assert len(all_idx) == len(np.unique(all_idx)), "a sample index appears in two parts"


def families_for(subjects, participants, subject_col: str = "subject",
                 family_col: str = "family_id") -> np.ndarray:
    """Family id per sample from a participants table (pandas DataFrame, e.g. participants.tsv)."""
    if subject_col not in participants or family_col not in participants:
        raise InputError(f"participants table needs columns {subject_col!r} and {family_col!r}, "
                         f"found {list(participants.columns)}")
    lookup = dict(zip(participants[subject_col].astype(str), participants[family_col]))
    subjects = np.asarray(subjects).astype(str)
    missing = sorted(set(subjects) - set(lookup))
    if missing:
        raise InputError(f"{len(missing)} subjects missing from the participants table, e.g. {missing[:3]}")
    return np.asarray([lookup[s] for s in subjects])
