"""Shared by the benchmarks: phantoms preprocessed and loaded into memory."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from medseg.phantoms.write import write_phantom_dataset
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
from medseg.structures import DEFAULT_LABELS
from medseg.training.data import CaseTensors, load_cases


def phantom_cases(n: int, size: int, shape: tuple[int, int], seed: int,
                  groups: Sequence[Sequence[int]] | None = None) -> list[CaseTensors]:
    """Write ``n`` phantoms of ``shape``, preprocess them to ``size`` px, and
    load them; ``groups`` (case indices) split them, default one group of all."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantom_dataset(tmp / "raw", n=n, seed=seed, shape=shape)
        result = preprocess_dataset(DatasetSpec(tmp / "raw" / "images", tmp / "raw" / "masks"),
                                    PreprocessSettings(size=size), tmp / "pre")
        ids = [r["case_id"] for r in result.rows]
        groups = groups or [range(len(ids))]
        return [load_cases(result.manifest_path, [ids[i] for i in group], DEFAULT_LABELS) for group in groups]
