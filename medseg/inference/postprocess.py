"""Clean predicted binary masks: keep the expected connected components, fill holes.

A segmentation network's thresholded output often carries small spurious
islands (a speck of "lung" in the abdomen) and pin holes. Anatomy tells how
many pieces each label should have on a PA chest film: one heart, two lungs,
two clavicles. Keeping the N largest components and filling holes removes
these artefacts without touching the shape of the real structures.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from scipy import ndimage

# Read-only so the default argument cannot be mutated between calls.
DEFAULT_EXPECTED_COMPONENTS: Mapping[str, int] = MappingProxyType(
    {"heart": 1, "lungs": 2, "clavicles": 2}
)

# 8-connectivity: pixels touching diagonally belong to the same structure, so
# a thin diagonal isthmus does not split one lung into two "components".
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_bool_2d(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask {name!r} must be 2-D (H, W), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def bounding_slices(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """(row, column) slices of a bool (H, W) mask's foreground bounding box,
    grown by ``margin`` pixels on every side and clipped to the image; None
    for an empty mask.

    Why: morphology on a crop costs the crop's pixels, not the image's (a
    heart is a tenth of a radiograph); with a margin of one pixel more than
    an operation reaches, the crop's result equals the whole image's.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, mask.shape[0])),
            slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, mask.shape[1])))


def fill_mask_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of a bool (H, W) mask (a hole:
    background not 4-connected to the image border), computed on the
    mask's bounding box grown by one pixel: that ring is background joined
    to the outside, so the result equals the whole image's. Returns a new
    bool (H, W) array."""
    out = np.array(mask, dtype=bool)
    box = bounding_slices(out, margin=1)
    if box is not None:
        out[box] = ndimage.binary_fill_holes(out[box])
    return out


def component_count(mask: np.ndarray) -> int:
    """Number of 8-connected foreground components of a bool mask (H, W)."""
    _, count = ndimage.label(_as_bool_2d(mask, "mask"), structure=_EIGHT_CONNECTED)
    return int(count)


def keep_largest_components(mask: np.ndarray, n: int) -> np.ndarray:
    """Keep the ``n`` largest 8-connected components of a bool mask (H, W).

    Ties in size are broken by component order (raster order of the first
    pixel), so the result is deterministic. Returns a new bool (H, W) array.
    """
    if n < 1:
        raise ValueError(f"number of components to keep must be >= 1, got {n}")
    mask = _as_bool_2d(mask, "mask")
    out = mask.copy()
    box = bounding_slices(mask)  # every component lies inside: the same labels, fewer pixels
    if box is None:
        return out
    labelled, count = ndimage.label(mask[box], structure=_EIGHT_CONNECTED)
    if count <= n:
        return out
    sizes = np.bincount(labelled.ravel())[1:]  # index 0 is background
    # Stable sort on -size: equal sizes keep their label order.
    keep = np.argsort(-sizes, kind="stable")[:n] + 1
    out[box] = np.isin(labelled, keep)
    return out


def clean_masks(
    masks: Mapping[str, np.ndarray],
    expected_components: Mapping[str, int] = DEFAULT_EXPECTED_COMPONENTS,
    fill_holes: bool = True,
) -> dict[str, np.ndarray]:
    """Keep the expected number of components per label, then fill holes.

    Args:
        masks: label -> bool (H, W) mask (any array castable to bool).
        expected_components: label -> N, the number of largest 8-connected
            components to keep. Labels not listed here are only hole-filled
            (when ``fill_holes``).
        fill_holes: fill enclosed background regions
            (:func:`fill_mask_holes`) after component selection,
            so a spurious island inside a hole cannot survive either way.

    Returns:
        {label: bool (H, W)} with the same keys and order as ``masks``; the
        inputs are not modified.
    """
    cleaned: dict[str, np.ndarray] = {}
    for name, mask in masks.items():
        out = _as_bool_2d(mask, name)
        if name in expected_components:
            out = keep_largest_components(out, int(expected_components[name]))
        else:
            out = out.copy()
        if fill_holes and out.any():
            out = fill_mask_holes(out)
        cleaned[name] = np.asarray(out, dtype=bool)
    return cleaned


__all__ = [
    "DEFAULT_EXPECTED_COMPONENTS",
    "bounding_slices",
    "clean_masks",
    "fill_mask_holes",
    "component_count",
    "keep_largest_components",
]
