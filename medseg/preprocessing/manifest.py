"""The per-dataset manifest: one row per preprocessed case (CSV)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medseg.atomic import atomic_path

# Columns a manifest must have; more may follow.
MANIFEST_COLUMNS = (
    "case_id",
    "image",
    "label",
    "source",
    "source_format",
    "mask_source",
    "structures",
    "photometric",
    "spacing_source",
    "original_rows",
    "original_cols",
    "spacing_row_mm",
    "spacing_col_mm",
    "resized_rows",
    "resized_cols",
    "pad_top",
    "pad_left",
    "size",
    "preprocessed_spacing_mm",
    "scr_fold",
)


# Written too, but not required of older manifests: the input's path
# relative to the images folder (case IDs and mask keys derive from it), and
# the plane its millimetres are measured at (medseg.ingest.types), and the
# masks' partial-volume fractions (training's soft labels).
OPTIONAL_COLUMNS = ("input_name", "spacing_plane", "label_fractions")


def write_manifest(path: str | Path, rows: Sequence[dict]) -> None:
    """Write rows as CSV atomically, columns in :data:`MANIFEST_COLUMNS` order
    then :data:`OPTIONAL_COLUMNS`."""
    frame = pd.DataFrame(list(rows), columns=[*MANIFEST_COLUMNS, *OPTIONAL_COLUMNS])
    frame = frame.sort_values("case_id", kind="stable")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest; ``image``/``label`` stay relative to its folder."""
    frame = pd.read_csv(path, dtype={"case_id": str, "label": str, "label_fractions": str, "scr_fold": str},
                        keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a medseg manifest, missing columns {missing}")
    if "input_name" not in frame.columns:  # manifests written before it was recorded
        frame["input_name"] = [Path(s).name for s in frame["source"]]
    return frame


# spacing_source values that were renamed, hashed under their former names:
# a manifest written after the rename keeps the fingerprint that checkpoints
# and MLflow datasets made before it recorded (so training resumes and the
# lineage holds). "given" (a spacing set by the user or the config) was "config".
_FINGERPRINT_SPACING_SOURCE = {"given": "config"}


def manifest_fingerprint(path: str | Path) -> str:
    """SHA-256 of the manifest's content columns (not machine-specific paths;
    renamed spacing_source values under their former names; not the
    ``label_fractions`` path, which derives from the same masks as ``label``
    and came later: manifests keep the fingerprints checkpoints recorded)."""
    frame = read_manifest(path).drop(columns=["source", "mask_source", "label_fractions"], errors="ignore")
    if "spacing_source" in frame:
        frame["spacing_source"] = frame["spacing_source"].replace(_FINGERPRINT_SPACING_SOURCE)
    return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
