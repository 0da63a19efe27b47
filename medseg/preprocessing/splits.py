"""Train / validation / test splits.

- ``scr_official``: SCR's two folds, odd- and even-numbered JSRT cases; each
  fold is tested by a model trained on the other.
- ``kfold``: seeded k-fold for any dataset.
In both, a seeded fraction of each training part is held out for validation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import write_text_atomic

SPLIT_SCHEMES = ("kfold", "scr_official")
_JSRT_ID = re.compile(r"^JPC[LN]N(\d{3})$")


def scr_fold(case_id: str) -> int | None:
    """SCR fold of a JSRT case ID: 1 for odd numbers, 2 for even, else None."""
    match = _JSRT_ID.match(case_id)
    if not match:
        return None
    return 1 if int(match.group(1)) % 2 == 1 else 2


def _hold_out_validation(train: list[str], val_fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = list(rng.permutation(sorted(train)))
    n_val = int(round(len(shuffled) * val_fraction))
    if val_fraction > 0 and len(shuffled) >= 2:
        n_val = max(1, n_val)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def kfold_splits(case_ids: Sequence[str], k: int, seed: int = 0, val_fraction: float = 0.15) -> list[dict]:
    """Seeded k-fold: each case is in exactly one fold's test part.

    Returns:
        k dicts {"fold", "train", "val", "test"} of sorted case IDs.
    """
    ids = sorted(set(case_ids))
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if len(ids) < k:
        raise ValueError(f"k={k} folds need at least {k} cases, got {len(ids)}")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(ids))
    parts = [sorted(order[i::k]) for i in range(k)]
    folds = []
    for i, test in enumerate(parts):
        rest = [c for j, part in enumerate(parts) if j != i for c in part]
        train, val = _hold_out_validation(rest, val_fraction, rng)
        folds.append({"fold": i, "train": train, "val": val, "test": test})
    return folds


def scr_official_splits(case_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.15) -> list[dict]:
    """SCR's two folds: fold 0 tests the odd cases (SCR fold 1), fold 1 the even.

    Raises:
        ValueError: a case ID is not a JSRT ID (JPCLNnnn / JPCNNnnn).
    """
    ids = sorted(set(case_ids))
    unknown = [c for c in ids if scr_fold(c) is None]
    if unknown:
        raise ValueError(f"scr_official needs JSRT case IDs; not JSRT: {', '.join(unknown[:5])}")
    by_fold = {f: [c for c in ids if scr_fold(c) == f] for f in (1, 2)}
    rng = np.random.default_rng(seed)
    folds = []
    for i, (test_fold, train_fold) in enumerate(((1, 2), (2, 1))):
        train, val = _hold_out_validation(by_fold[train_fold], val_fraction, rng)
        folds.append({"fold": i, "train": train, "val": val, "test": by_fold[test_fold]})
    return folds


def make_splits(case_ids: Sequence[str], scheme: str, k: int = 5, seed: int = 0, val_fraction: float = 0.15) -> dict:
    """Splits document for ``scheme`` (see module docstring)."""
    if scheme == "kfold":
        folds = kfold_splits(case_ids, k, seed, val_fraction)
    elif scheme == "scr_official":
        folds = scr_official_splits(case_ids, seed, val_fraction)
    else:
        raise ValueError(f"unknown split scheme {scheme!r}; choose from {SPLIT_SCHEMES}")
    return {"scheme": scheme, "seed": seed, "val_fraction": val_fraction, "folds": folds}


def write_splits(path: str | Path, splits: dict) -> None:
    """Write the splits document as JSON, atomically."""
    write_text_atomic(path, json.dumps(splits, indent=1) + "\n")


def read_splits(path: str | Path) -> dict:
    """Read what :func:`write_splits` wrote."""
    return json.loads(Path(path).read_text())
