"""Splits never share a subject or a family; too few families is a clear error."""

import numpy as np
import pandas as pd
import pytest

from fmri_bench.errors import InputError
from fmri_bench.splits import (
    Split, check_disjoint, families_for, kfold_split, resplits, subject_split,
)


def cohort(n_sub=30, clips=4):
    """Clips of n_sub subjects; subjects 2k and 2k+1 are siblings (one family)."""
    subjects = np.repeat([f"sub-{i:02d}" for i in range(n_sub)], clips)
    families = np.repeat([f"fam-{i // 2}" for i in range(n_sub)], clips)
    return subjects, families


@pytest.mark.parametrize("seed", range(8))
def test_random_split_is_disjoint(seed):
    subjects, families = cohort()
    split = subject_split(subjects, families, seed=seed)
    check_disjoint(split, subjects, families)
    assert sum(split.sizes().values()) == len(subjects)  # every clip lands somewhere
    assert min(split.sizes().values()) > 0
    again = subject_split(subjects, families, seed=seed)
    np.testing.assert_array_equal(split.test, again.test)  # reproducible from the seed


def test_resplits_differ_and_stay_disjoint():
    subjects, families = cohort()
    splits = resplits(subjects, families, n_splits=6, seed=3)
    for s in splits:
        check_disjoint(s, subjects, families)
    assert len({tuple(s.test) for s in splits}) > 1


@pytest.mark.parametrize("fold", range(5))
def test_kfold_split(fold):
    subjects, families = cohort()
    split = kfold_split(subjects, families, n_folds=5, fold=fold)
    check_disjoint(split, subjects, families)
    # 15 families over 5 folds: 3 families = 6 subjects = 24 clips each in val and test
    assert split.sizes() == {"train": 72, "val": 24, "test": 24}


def test_check_disjoint_catches_a_leak():
    subjects, families = cohort(6, 1)
    leaky = Split(np.array([0, 2, 4]), np.array([1]), np.array([3, 5]))  # sub-00 / sub-01 siblings
    with pytest.raises(AssertionError, match="family"):
        check_disjoint(leaky, subjects, families)
    check_disjoint(leaky, subjects)  # without families, subjects alone do not overlap


def test_too_few_families():
    subjects, families = cohort(4, 2)  # 2 families
    with pytest.raises(InputError, match="need at least 3 .* found 2 families from 4 subjects"):
        subject_split(subjects, families)
    with pytest.raises(InputError, match="need at least 5"):
        kfold_split(subjects, families, n_folds=5)
    split = subject_split(*cohort(3, 2)[:1])  # 3 subjects, no families: just enough
    assert split.sizes() == {"train": 2, "val": 2, "test": 2}


def test_subject_in_two_families_is_an_error():
    with pytest.raises(InputError, match="several families"):
        subject_split(["a", "a", "b", "c"], [1, 2, 3, 4])


def test_restrict_and_roundtrip():
    subjects, families = cohort(12, 2)
    is_rest = np.tile([True, False], 12)
    split = subject_split(subjects, families, seed=0)
    cross = split.restrict(train=is_rest, val=is_rest, test=~is_rest)
    assert is_rest[cross.train].all() and (~is_rest[cross.test]).all()
    assert len(cross.train) == len(split.train) // 2
    back = Split.from_dict(split.to_dict())
    np.testing.assert_array_equal(back.val, split.val)


def test_families_for():
    table = pd.DataFrame({"subject": ["s1", "s2", "s3"], "family_id": [7, 7, 9]})
    assert families_for(["s1", "s3", "s2"], table).tolist() == [7, 9, 7]
    with pytest.raises(InputError, match="missing"):
        families_for(["s4"], table)


@pytest.mark.parametrize("seed", range(6))
def test_pretraining_subjects_and_their_siblings_stay_in_train(seed):
    subjects, families = cohort(n_sub=30)
    seen = {f"sub-{i:02d}" for i in range(0, 21, 2)}  # 11 subjects; their siblings are seen families too
    split = subject_split(subjects, families, seed=seed, exclude=seen)
    check_disjoint(split, subjects, families, exclude=seen)
    evaluated = set(subjects[np.concatenate([split.val, split.test])])
    assert not evaluated & seen
    assert not evaluated & {f"sub-{i + 1:02d}" for i in range(0, 21, 2)}  # no sibling of a seen subject
    assert seen <= set(subjects[split.train])
    assert len(split.val) and len(split.test) and sum(split.sizes().values()) == len(subjects)


def test_exclude_none_is_the_plain_split():
    subjects, families = cohort()
    a, b = subject_split(subjects, families, seed=4), subject_split(subjects, families, seed=4, exclude=set())
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(a.part(part), b.part(part))


def test_exclude_shrinks_val_and_test_to_the_unseen_families():
    subjects, families = cohort(n_sub=30)  # 15 families: val 2, test 2 when all unseen
    seen = {f"sub-{i:02d}" for i in range(0, 26)}  # 13 families seen, 2 unseen (sub-26..29)
    split = subject_split(subjects, families, seed=0, exclude=seen)
    assert set(subjects[split.val]) | set(subjects[split.test]) == {"sub-26", "sub-27", "sub-28", "sub-29"}
    with pytest.raises(InputError, match="never seen in pretraining"):
        subject_split(subjects, families, seed=0, exclude=set(subjects[:-4]) | {"sub-28"})


def test_check_disjoint_catches_a_pretraining_subject_in_test():
    subjects, families = cohort()
    split = subject_split(subjects, families, seed=1)
    leaked = {subjects[split.test[0]]}
    with pytest.raises(AssertionError, match="seen in pretraining"):
        check_disjoint(split, subjects, families, exclude=leaked)
