"""k-fold and SCR official splits."""

from __future__ import annotations

import pytest

from medseg.preprocessing.splits import kfold_splits, make_splits, read_splits, scr_fold, scr_official_splits, write_splits


def test_kfold_partitions_cases():
    ids = [f"C{i:03d}" for i in range(23)]
    folds = kfold_splits(ids, k=5, seed=1, val_fraction=0.2)
    tests = [c for f in folds for c in f["test"]]
    assert sorted(tests) == ids  # each case tested exactly once
    for f in folds:
        parts = set(f["train"]), set(f["val"]), set(f["test"])
        assert parts[0] | parts[1] | parts[2] == set(ids)
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(f["val"]) >= 1


def test_kfold_seeded():
    ids = [f"C{i}" for i in range(20)]
    assert kfold_splits(ids, 4, seed=3) == kfold_splits(ids, 4, seed=3)
    assert kfold_splits(ids, 4, seed=3) != kfold_splits(ids, 4, seed=4)


def test_kfold_refuses_too_few_cases():
    with pytest.raises(ValueError, match="at least 5 cases"):
        kfold_splits(["a", "b"], k=5)


def test_scr_fold_numbers():
    assert scr_fold("JPCLN001") == 1
    assert scr_fold("JPCNN002") == 2
    assert scr_fold("JPCNN093") == 1
    assert scr_fold("PHANTOM0001") is None


def test_scr_official():
    ids = [f"JPCLN{i:03d}" for i in range(1, 21)] + [f"JPCNN{i:03d}" for i in range(1, 11)]
    folds = scr_official_splits(ids, seed=0, val_fraction=0.1)
    odd = {c for c in ids if int(c[-3:]) % 2}
    assert set(folds[0]["test"]) == odd
    assert set(folds[1]["test"]) == set(ids) - odd
    assert set(folds[0]["train"]) | set(folds[0]["val"]) == set(ids) - odd
    with pytest.raises(ValueError, match="JSRT"):
        scr_official_splits(["PHANTOM0001"])


def test_write_read(tmp_path):
    splits = make_splits([f"C{i}" for i in range(10)], "kfold", k=2)
    write_splits(tmp_path / "s.json", splits)
    assert read_splits(tmp_path / "s.json") == splits
