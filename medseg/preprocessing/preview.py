"""Contact sheet of preprocessed cases with their label overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from medseg.nifti import load_nifti_2d
from medseg.preprocessing.manifest import read_manifest
from medseg.structures import DEFAULT_LABELS, labels_from_packed
from medseg.visualise import overlay_rgb, save_contact_sheet


def preview_manifest(
    manifest_path: str | Path,
    out_png: str | Path,
    labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS,
    max_cases: int = 12,
) -> int:
    """Render up to ``max_cases`` preprocessed cases (heart red, lungs green,
    clavicles blue) into one PNG. Returns the number of cases drawn."""
    manifest_path = Path(manifest_path)
    frame = read_manifest(manifest_path).head(max_cases)
    tiles, titles = [], []
    for row in frame.itertuples():
        image, _ = load_nifti_2d(manifest_path.parent / row.image)
        masks = {}
        if row.label:
            packed, _ = load_nifti_2d(manifest_path.parent / row.label)
            channels = labels_from_packed(packed, row.structures.split("|"), labels)
            masks = dict(zip(labels, channels > 0.5))
        tiles.append(overlay_rgb(image, masks))
        titles.append(f"{row.case_id} ({row.original_rows}x{row.original_cols})")
    if not tiles:
        raise ValueError(f"{manifest_path}: no cases to preview")
    save_contact_sheet(out_png, tiles, titles)
    return len(tiles)
