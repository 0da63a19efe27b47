"""Cardiothoracic ratio (CTR) and quality-control flags for a PA chest film.

Conventions:
    * Masks are bool arrays (H, W), row 0 at the top, column 0 at the image's
      left (the patient's right on a PA film). "col_left"/"col_right" below
      are image columns, not patient sides.
    * ``spacing_mm`` is (row spacing, column spacing) in mm, as
      ``IngestedImage.spacing_mm``. Widths are horizontal, so only the column
      spacing enters them.
    * A width is the edge-to-edge extent of the pixels it spans:
      ``(col_right - col_left + 1) * column spacing``. A mask pixel covers a
      whole pixel, so a one-pixel-wide mask is one pixel wide, not zero.

Heart width: the transverse cardiac diameter, ``max col - min col (+1)`` over
the whole heart mask. This is the clinical (Danzer) definition: the maximal
right-of-midline plus the maximal left-of-midline extent, measured at
whatever levels they occur, which sums to the overall horizontal extent
whatever the midline. The widest single row would underestimate it when the
right-atrial and left-ventricular borders bulge at different levels.

Thoracic width: the maximal internal thoracic diameter, the largest
``rightmost - leftmost (+1)`` lung pixel within one row, over the union of
both lungs; inner rib margins are approximated by the lungs' outer borders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medseg.inference.postprocess import component_count

# CTR > 0.5 on a PA film is the conventional threshold for cardiomegaly.
CARDIOMEGALY_THRESHOLD = 0.5
# "low_confidence" below this boundary-band confidence, for models that do
# not record their own threshold (calibrated on cross-validation).
DEFAULT_MIN_CONFIDENCE = 0.85
# Outside this range the masks, not the heart, are almost surely wrong.
PLAUSIBLE_CTR = (0.3, 0.8)

# Line colours stand apart from every mask fill: not cyan for the thorax,
# which is what the blue clavicle fill blended over the green lungs looks
# like (and the thorax line runs across the lungs).
HEART_LINE_COLOUR = (1.0, 1.0, 0.0)  # yellow
THORAX_LINE_COLOUR = (1.0, 0.0, 1.0)  # magenta

Line = tuple[int, int, int]  # (row, col_left, col_right), inclusive columns


@dataclass
class CtrResult:
    """Cardiothoracic ratio of one PA film.

    Attributes:
        ctr: heart_width_mm / thoracic_width_mm, or nan when a mask is empty.
        heart_width_mm: transverse cardiac diameter in mm (nan if no heart).
        thoracic_width_mm: maximal internal thoracic width in mm (nan if no
            lungs).
        heart_line: (row, col_left, col_right) of the heart width for drawing;
            the columns are the leftmost and rightmost heart pixels, the row
            is midway between the rows where those extremes occur (they
            generally differ). None if no heart.
        thorax_line: (row, col_left, col_right) of the widest lung row
            (topmost row on ties). None if no lungs.
        flags: subset of "cardiomegaly", "implausible_ctr", "missing_heart",
            "missing_lungs".
    """

    ctr: float
    heart_width_mm: float
    thoracic_width_mm: float
    heart_line: Line | None
    thorax_line: Line | None
    flags: list[str] = field(default_factory=list)


def _heart_extent(heart: np.ndarray) -> Line | None:
    """(row, min col, max col) of the transverse diameter, or None if empty."""
    rows, cols = np.nonzero(heart)
    if rows.size == 0:
        return None
    col_left, col_right = int(cols.min()), int(cols.max())
    # Median row of each extreme: a flat border touches many rows.
    row_left = float(np.median(rows[cols == col_left]))
    row_right = float(np.median(rows[cols == col_right]))
    row = int(math.floor((row_left + row_right) / 2 + 0.5))
    return row, col_left, col_right


def _widest_row(mask: np.ndarray) -> Line | None:
    """(row, leftmost col, rightmost col) of the row with the largest extent."""
    present = mask.any(axis=1)
    if not present.any():
        return None
    width = mask.shape[1]
    left = np.where(present, np.argmax(mask, axis=1), 0)
    right = np.where(present, width - 1 - np.argmax(mask[:, ::-1], axis=1), -1)
    extent = np.where(present, right - left + 1, 0)
    row = int(np.argmax(extent))  # first (topmost) on ties
    return row, int(left[row]), int(right[row])


def cardiothoracic_ratio(
    heart: np.ndarray, lungs: np.ndarray, spacing_mm: tuple[float, float]
) -> CtrResult:
    """Cardiothoracic ratio from heart and lung masks of a PA film.

    Args:
        heart: bool (H, W) heart mask.
        lungs: bool (H, W) mask of both lungs (union of left and right).
        spacing_mm: (row, column) pixel spacing in mm.

    Returns:
        CtrResult; see the module docstring for the width definitions.
        "cardiomegaly" is set for 0.5 < CTR <= 0.8 only: above 0.8 (or a
        heart wider than the thorax) the value is flagged "implausible_ctr"
        instead, because it signals a segmentation failure, not a finding.
    """
    heart = np.asarray(heart, dtype=bool)
    lungs = np.asarray(lungs, dtype=bool)
    if heart.ndim != 2 or heart.shape != lungs.shape:
        raise ValueError(
            f"heart and lungs must be 2-D masks of one shape, got {heart.shape} and {lungs.shape}"
        )
    col_spacing = float(spacing_mm[1])
    if not (col_spacing > 0 and math.isfinite(col_spacing)):
        raise ValueError(f"column spacing must be a positive number of mm, got {spacing_mm!r}")

    heart_line = _heart_extent(heart)
    thorax_line = _widest_row(lungs)
    flags: list[str] = []
    nan = float("nan")
    heart_mm = nan if heart_line is None else (heart_line[2] - heart_line[1] + 1) * col_spacing
    thorax_mm = nan if thorax_line is None else (thorax_line[2] - thorax_line[1] + 1) * col_spacing
    if heart_line is None:
        flags.append("missing_heart")
    if thorax_line is None:
        flags.append("missing_lungs")
    if flags:
        return CtrResult(nan, heart_mm, thorax_mm, heart_line, thorax_line, flags)

    ctr = heart_mm / thorax_mm
    lo, hi = PLAUSIBLE_CTR
    if ctr < lo or ctr > hi or heart_mm > thorax_mm:
        flags.append("implausible_ctr")
    elif ctr > CARDIOMEGALY_THRESHOLD:
        flags.append("cardiomegaly")
    return CtrResult(ctr, heart_mm, thorax_mm, heart_line, thorax_line, flags)


def band_radius(shape: tuple[int, ...]) -> int:
    """Half-width in pixels of the boundary band: 1 % of the larger side, >= 1."""
    return max(1, int(round(0.01 * max(shape[:2]))))


def boundary_confidence(
    masks: Mapping[str, np.ndarray], probabilities: Mapping[str, np.ndarray]
) -> float:
    """Mean confidence ``max(p, 1 - p)`` in a band around the predicted boundaries.

    For every label present in both mappings, the band is the mask's
    boundary (mask minus its erosion) dilated by :func:`band_radius` pixels,
    i.e. pixels within about 1 % of the image size of the predicted contour,
    on both sides. Confidences of all labels' bands are pooled. Why a band
    and not the whole image: most of a radiograph is far from any contour,
    where the network is near-certain, so a whole-image mean stays close to
    1 even when every contour is a guess. If no label has a band (all masks
    empty), the whole image is used instead.

    Args:
        masks: label -> bool (H, W).
        probabilities: label -> float (H, W) foreground probability in [0, 1].

    Returns:
        Mean confidence in [0.5, 1], or nan when no label has probabilities.
    """
    from medseg.inference.postprocess import bounding_slices

    def confidence(prob: np.ndarray) -> np.ndarray:
        prob = np.asarray(prob, dtype=np.float64)
        return np.maximum(prob, 1.0 - prob)

    band_values: list[np.ndarray] = []
    labelled: list[np.ndarray] = []
    for name, mask in masks.items():
        if name not in probabilities:
            continue
        mask = np.asarray(mask, dtype=bool)
        prob = np.asarray(probabilities[name])
        if prob.shape != mask.shape:
            raise ValueError(
                f"probabilities for {name!r} have shape {prob.shape}, mask {mask.shape}"
            )
        labelled.append(prob)
        radius = band_radius(mask.shape)
        # The band lies within `radius` of the mask: computed on that crop
        # (one pixel more for the erosion), it is the whole image's band.
        box = bounding_slices(mask, margin=radius + 1)
        if box is None:
            continue
        crop = mask[box]
        # border_value=1: the image edge does not count as a contour.
        boundary = crop & ~ndimage.binary_erosion(crop, border_value=1)
        if not boundary.any():  # the mask fills the whole image: no contour
            continue
        # Within `radius` taxicab steps of the contour: binary_dilation with
        # the cross `radius` times, in two passes instead of `radius`.
        band = ndimage.distance_transform_cdt(~boundary, metric="taxicab") <= radius
        band_values.append(confidence(prob[box][band]))
    if not band_values:  # no contour anywhere: the whole image
        band_values = [confidence(prob).ravel() for prob in labelled]
    if not band_values:
        return float("nan")
    pooled = np.concatenate(band_values)
    return float(pooled.mean()) if pooled.size else float("nan")


def qc_flags(
    masks: Mapping[str, np.ndarray],
    probabilities: Mapping[str, np.ndarray] | None,
    ctr: CtrResult | None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    confidence: float | None = None,
) -> list[str]:
    """Quality-control flags for one prediction, in a stable order, no duplicates.

    Args:
        masks: label -> bool (H, W) (after :func:`clean_masks` or raw).
        probabilities: label -> float (H, W) foreground probabilities, or None
            to skip the confidence check.
        ctr: result of :func:`cardiothoracic_ratio`, or None.
        min_confidence: threshold on :func:`boundary_confidence`; a model
            records its own, calibrated on cross-validation (its ``qc``).
        confidence: :func:`boundary_confidence` when the caller has it
            already (it is not computed twice).

    Returns:
        "missing_<label>" for every empty mask; "lungs_not_two_components"
        when the lung mask is non-empty but not exactly two 8-connected
        components (an empty one is already "missing_lungs"); the CTR flags;
        "low_confidence" when the boundary-band confidence < min_confidence.
    """
    flags: list[str] = []

    def add(flag: str) -> None:
        if flag not in flags:
            flags.append(flag)

    for name, mask in masks.items():
        if not np.asarray(mask, dtype=bool).any():
            add(f"missing_{name}")
    lungs = masks.get("lungs")
    if lungs is not None and np.asarray(lungs, dtype=bool).any() and component_count(lungs) != 2:
        add("lungs_not_two_components")
    if ctr is not None:
        for flag in ctr.flags:
            add(flag)
    if confidence is None and probabilities is not None:
        confidence = boundary_confidence(masks, probabilities)
    if confidence is not None and math.isfinite(confidence) and confidence < min_confidence:
        add("low_confidence")
    return flags


def line_thickness(shape: tuple[int, ...]) -> int:
    """Drawn line thickness in pixels: 2 below 512 px on the larger side, else 3."""
    return 2 if max(shape[:2]) < 512 else 3


def draw_ctr_lines(rgb: np.ndarray, result: CtrResult) -> np.ndarray:
    """Draw the heart (yellow) and thorax (magenta) width lines onto an RGB image.

    Args:
        rgb: float (H, W, 3) in [0, 1], e.g. from ``visualise.overlay_rgb``.
        result: the CTR whose lines are drawn; a missing line is skipped.

    Returns:
        A new float32 (H, W, 3) array. Each line covers columns
        col_left..col_right and :func:`line_thickness` rows starting at
        ``row - thickness // 2`` (clipped to the image). The heart line is
        drawn last, so it stays visible where the lines coincide.
    """
    out = np.array(rgb, dtype=np.float32, copy=True)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"rgb must have shape (H, W, 3), got {out.shape}")
    height = out.shape[0]
    thickness = line_thickness(out.shape)
    for line, colour in (
        (result.thorax_line, THORAX_LINE_COLOUR),
        (result.heart_line, HEART_LINE_COLOUR),
    ):
        if line is None:
            continue
        row, col_left, col_right = line
        top = max(0, row - thickness // 2)
        bottom = min(height, row - thickness // 2 + thickness)
        out[top:bottom, col_left : col_right + 1] = colour
    return out


__all__ = [
    "CtrResult",
    "band_radius",
    "boundary_confidence",
    "cardiothoracic_ratio",
    "draw_ctr_lines",
    "line_thickness",
    "qc_flags",
]
