"""Is this a plausible upright frontal (PA/AP) chest film? Judged on the predicted masks.

A cardiothoracic ratio means something only on an upright frontal chest
film. A network run on anything else (a film rotated by 90 or 180 degrees,
mirrored, a lateral view, not a chest at all) still outputs masks, and the
CTR of those masks can look perfectly normal. This module checks the masks'
layout against the anatomy of a frontal chest and says when the film is not
one, so the CTR can be withheld (:func:`gate_ctr`).

Conventions (as :mod:`medseg.inference.ctr`): masks are bool (H, W), row 0 at
the top, column 0 at the image's left, which is the patient's RIGHT on a
PA/AP film; ``spacing_mm`` is (row, column) pixel spacing in mm. Labels:
"heart", "lungs" (both lungs), "clavicles" (both clavicles).

Flags (see :func:`check_anatomy` for every rule):

``not_frontal_chest``
    The DICOM View Position names a lateral or oblique view, or the lung
    mask is not two substantial, solid, upright fields side by side with
    human extents in mm (no lungs, one field, two fields stacked vertically,
    one field far smaller than the other, a thorax 1.5 m wide, ...).
``implausible_anatomy``
    Two lung fields side by side, but they are upside down (costophrenic
    angles at the top) or mirrored (the patient's right lung clearly the
    smaller), or the heart is absent, not between them, not in their lower
    half (a film upside down), not towards the patient's left (a mirrored
    film, or a dextrocardia, which a reader should confirm anyway), or the
    clavicles are not over the lung apices.

Every threshold was calibrated on the 124 expert (SCR) masks of JSRT fold 1
and on the procedural phantoms: the measured ranges are quoted next to each
constant, and tests/test_plausibility.py checks that no SCR case is flagged
and that every mirrored or upside-down copy is. Most rules leave a wide
margin and are deliberately generous (children, cardiomegaly, effusions,
rotated patients): they are meant to catch films that are not upright
frontal chests, not to grade anatomy. Left-right is the exception: a real
heart can lie almost on the midline, and the lungs' asymmetry is modest, so
the two laterality rules have little room on either side (see
:data:`MIN_HEART_SIDE` and :data:`MIN_LUNG_RIGHT_LEFT_RATIO`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from medseg.inference.ctr import CtrResult

NOT_FRONTAL_CHEST = "not_frontal_chest"
IMPLAUSIBLE_ANATOMY = "implausible_anatomy"
# In the order they are reported.
ANATOMY_FLAGS: tuple[str, ...] = (NOT_FRONTAL_CHEST, IMPLAUSIBLE_ANATOMY)
# Flags that read the CTR clinically; dropped when the CTR is withheld.
CTR_READING_FLAGS: tuple[str, ...] = ("cardiomegaly", "implausible_ctr")

# DICOM View Position (0018,5101) values of views that are not frontal:
# lateral (LL, RL, LAT, LATERAL, LEFT/RIGHT LATERAL) and oblique (RLO, LLO,
# RAO, LAO, OBLIQUE). Compared after upper-casing and dropping spaces, "_"
# and "-". Decubitus views (RLD, LLD) are frontal projections and are left
# to the mask rules; an empty or unknown value is not evidence either way.
NON_FRONTAL_VIEW_POSITIONS: frozenset[str] = frozenset(
    {"LL", "RL", "LAT", "LATERAL", "LEFTLATERAL", "RIGHTLATERAL", "LLAT", "RLAT",
     "RLO", "LLO", "RAO", "LAO", "OBLIQUE", "OBL"}
)

# 8-connectivity, as medseg.inference.postprocess: a thin diagonal isthmus
# does not split one lung into two fields.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Measured ranges quoted below: "SCR" = the 124 expert masks of JSRT fold 1
# (adults, 0.35 mm pixels), min-max; "phantoms" = 40 procedural phantoms of
# several sizes and aspects.

# A lung field below this many pixels is a speck, too small for its shape
# to be measured (a 1-pixel mask, noise). Real fields have thousands of
# pixels even on a 128-pixel image.
MIN_FIELD_PIXELS = 16

# Smaller / larger lung field area. The patient's left lung is the smaller
# (the heart takes its place): SCR 0.58-1.00 (median 0.82), phantoms
# 0.74-0.91. One lung plus a speck, or a lateral field plus a fragment, is
# far below. Generous for effusions and collapse.
MIN_LUNG_AREA_RATIO = 0.2

# Fields joined by a thin bridge (a prediction that leaks across the
# mediastinum) are split at the column of least lung in the middle half of
# the joined field when that column holds at most this fraction of the
# field's fullest column. A lateral lung field or a noise blob has no such
# waist. Only tried when the two largest components are not already a pair
# of comparable size (MIN_LUNG_AREA_RATIO).
MAX_BRIDGE_FRACTION = 0.15

# Side by side: the two fields' row ranges overlap by at least this
# fraction of the shorter field's height (SCR 0.95-1.00; rotated by 90
# degrees they are stacked: 0) ...
MIN_VERTICAL_OVERLAP = 0.5
# ... and their column ranges by at most this fraction of the narrower
# field's width (SCR 0: the mediastinum lies between them; rotated by 90
# degrees: about 1).
MAX_HORIZONTAL_OVERLAP = 0.25

# Each lung field's height / width, in mm: upright lungs are tall (SCR
# 1.32-2.75, phantoms 1.43-2.83); rotated by 90 degrees they lie flat (the
# inverse, <= 0.76).
MIN_FIELD_ASPECT = 0.8

# Area / area with holes filled: a lung field is solid (SCR 1.00;
# predictions are hole-filled anyway); a noise cluster is not.
MIN_FIELD_SOLIDITY = 0.9
# Area / bounding-box area: a lung field fills much of its box (SCR
# 0.40-0.66, phantoms 0.51-0.65); a sparse noise cluster does not.
MIN_FIELD_BOX_FILL = 0.25

# Human extents in mm, generous enough for a premature newborn and the
# largest adult: thoracic width (the lungs' outer borders) and lung height
# (top of the apices to the lowest lung pixel). SCR adults: width 239-349 mm,
# height 188-343 mm; a newborn's lungs span about 80-100 mm. A 1024-pixel
# film read with 5 mm pixels (a wrong spacing) gives a thorax over 3 m wide.
THORACIC_WIDTH_MM = (60.0, 500.0)
LUNG_HEIGHT_MM = (40.0, 450.0)

# Lung uprightness. On an upright frontal film each lung's lowest point is
# its lateral costophrenic angle and its highest point the apex, medial of
# the lateral border. Per field: the lateral position (0 = the field's medial
# edge, 1 = its lateral edge) of its lowest LUNG_STRIP_FRACTION of rows minus
# that of its highest; averaged over both fields. SCR 0.46-0.71 (median
# 0.63), phantoms 0.19-0.51; upside down (rotated by 180 degrees, or flipped
# top to bottom) it is negated. A network that puts the heart where hearts
# usually are still outlines the dark lung fields as they are, so this
# catches upside-down films that the heart rules miss (the phantom-trained
# test model: about -0.3).
LUNG_STRIP_FRACTION = 0.1
MIN_LUNG_UPRIGHTNESS = 0.0

# Lung laterality. The patient's right lung (the image's left on a PA film)
# is the larger: three lobes, and the heart bulges into the left. Measured
# as the geometric mean of two right/left ratios: whole-field areas, and
# lung pixels within the heart's rows (where the cardiac impression is).
# SCR 0.90-2.02 (median 1.31, 1st percentile 0.93), phantoms 1.10-1.49. A
# mirrored film gives the inverse (SCR <= 1.12, so it is the heart rule
# that catches every mirrored SCR film); this rule catches lungs outlined
# mirrored around a heart mask left where hearts usually are (the
# phantom-trained test model: 0.79-0.82). 0.86 is midway (in log) between
# the lowest SCR value and those.
MIN_LUNG_RIGHT_LEFT_RATIO = 0.86
# ... but only where the heart gives little evidence of its own: a heart
# clearly towards the patient's left (side >= WEAK_HEART_SIDE, see below;
# SCR median 0.36) with a small right lung is an upright film with right
# lung disease, not a mirrored one; its CTR is given.
WEAK_HEART_SIDE = 0.15

# Heart centroid level within the lungs' height (0 = top row of the lungs,
# 1 = bottom row): the heart lies in the lower part of the chest (SCR
# 0.60-0.85, median 0.69; phantoms 0.67-0.74). Upside down the level is 1
# minus that (SCR <= 0.41), so 0.5 sits midway.
MIN_HEART_LEVEL = 0.5

# Heart laterality: the offset of the heart's horizontal centre (halfway
# between its leftmost and rightmost pixels) from the thoracic midline
# (halfway between the lungs' outer borders), in half heart widths, positive
# towards the patient's left (the image's right). Equivalently
# (left extent - right extent) / (left extent + right extent) of the
# transverse cardiac diameter about the midline: about 1/3 for the textbook
# heart (a third right of the midline, two thirds left). SCR 0.034-0.67
# (median 0.36, 1st percentile 0.048, 5th 0.15), phantoms 0.22-0.52.
# Mirroring negates it exactly, so the only threshold that separates every
# film from its mirror image is 0 (a heart exactly on the midline counts as
# not towards the left). Of the measures tried (heart area fraction left
# of the midline, heart centroid offset, lung area ratio, mediastinal gap
# offset, combinations of them), this one alone was positive on all 124 SCR
# films; a few real hearts lie almost on the midline, so a predicted heart
# there can be flagged, as a dextrocardia would.
MIN_HEART_SIDE = 0.0

# Clavicles' centroid level within the lungs' height: the clavicles cross
# the lung apices (SCR 0.035-0.18, phantoms 0.07-0.15); upside down they
# lie near the bottom (SCR >= 0.82).
MAX_CLAVICLE_LEVEL = 0.4


@dataclass
class AnatomyCheck:
    """Outcome of :func:`check_anatomy`.

    Attributes:
        flags: subset of :data:`ANATOMY_FLAGS`, in that order; empty for a
            plausible upright frontal chest.
        reasons: one short sentence per failed rule, e.g. "lung fields not
            side by side (vertical overlap 0.00, horizontal overlap 0.93)".
        measurements: the measured quantities, by name (see
            :func:`check_anatomy`); a quantity is missing when an earlier
            rule made it unmeasurable (no lungs, one field, ...). Heights
            and widths in mm, levels, ratios and fractions unitless.
        size_reasons: those of ``reasons`` that come from a size in mm
            (thoracic width, lung height): the rules a wrong pixel spacing
            breaks. (The other rules use ratios, unchanged by a spacing
            wrong by the same factor on both axes.)
    """

    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)
    size_reasons: list[str] = field(default_factory=list)

    @property
    def plausible(self) -> bool:
        """True when no rule failed (no flag)."""
        return not self.flags

    def _fail(self, flag: str, reason: str, size: bool = False) -> None:
        if flag not in self.flags:
            self.flags.append(flag)
            self.flags.sort(key=ANATOMY_FLAGS.index)
        self.reasons.append(reason)
        if size:
            self.size_reasons.append(reason)


@dataclass(frozen=True)
class _Field:
    """One lung field: a bool (H, W) mask and its extents (inclusive pixels)."""

    mask: np.ndarray
    area: int
    top: int
    bottom: int
    left: int
    right: int
    centroid_col: float

    @classmethod
    def of(cls, mask: np.ndarray) -> "_Field":
        rows, cols = np.nonzero(mask)
        return cls(mask, int(rows.size), int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()),
                   float(cols.mean()))

    @property
    def crop(self) -> np.ndarray:
        """The mask cut to the field's bounding box."""
        return self.mask[self.top:self.bottom + 1, self.left:self.right + 1]

    @property
    def height(self) -> int:
        return self.bottom - self.top + 1

    @property
    def width(self) -> int:
        return self.right - self.left + 1


def is_non_frontal_view(view_position: str | None) -> bool:
    """True when a DICOM View Position names a lateral or oblique view
    (:data:`NON_FRONTAL_VIEW_POSITIONS`); None, empty or unknown: False."""
    if not view_position:
        return False
    key = re.sub(r"[\s_\-]", "", str(view_position)).upper()
    return key in NON_FRONTAL_VIEW_POSITIONS


def _label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labelled int array, component sizes with index 0 = label 1)."""
    labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    return labelled, sizes


def _split_bridged(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Split one field at a narrow vertical waist in its middle half.

    Returns the (image-left, image-right) parts, the waist column removed,
    or None when the field has no column with at most
    :data:`MAX_BRIDGE_FRACTION` of its fullest column's pixels there.
    """
    occupancy = mask.sum(axis=0)
    cols = np.flatnonzero(occupancy)
    if cols.size < 4:
        return None
    left, right = int(cols[0]), int(cols[-1])
    span = right - left + 1
    lo, hi = left + span // 4, right - span // 4
    if hi <= lo:
        return None
    waist = lo + int(np.argmin(occupancy[lo:hi + 1]))
    if occupancy[waist] > MAX_BRIDGE_FRACTION * occupancy.max():
        return None
    left_part = mask.copy()
    left_part[:, waist:] = False
    right_part = mask.copy()
    right_part[:, :waist + 1] = False
    if not left_part.any() or not right_part.any():
        return None
    return left_part, right_part


def _lung_fields(lungs: np.ndarray) -> list[_Field]:
    """The two lung fields (image-left first), or fewer when there are not two.

    The two largest 8-connected components; when the second is missing or
    much smaller than the first (:data:`MIN_LUNG_AREA_RATIO`), the largest
    is split at a bridge if it has one (:func:`_split_bridged`).
    """
    labelled, sizes = _label(lungs)
    if sizes.size == 0:
        return []
    order = np.argsort(-sizes, kind="stable")
    masks = [labelled == (order[0] + 1)]
    if sizes.size > 1:
        masks.append(labelled == (order[1] + 1))
    if len(masks) == 1 or sizes[order[1]] < MIN_LUNG_AREA_RATIO * sizes[order[0]]:
        split = _split_bridged(masks[0])
        if split is not None:
            masks = list(split)
    fields = [_Field.of(m) for m in masks]
    return sorted(fields, key=lambda f: f.centroid_col)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    """Number of pixels two inclusive ranges share."""
    return max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)


def _check_lungs(check: AnatomyCheck, lungs: np.ndarray, spacing: tuple[float, float]) -> list[_Field] | None:
    """Lung-field rules; returns the two fields when they pass, else None."""
    m = check.measurements
    failed_before = len(check.reasons)
    row_mm, col_mm = spacing
    fields = _lung_fields(lungs)
    m["lung_fields"] = float(len(fields))
    if not fields:
        check._fail(NOT_FRONTAL_CHEST, "no lung field")
        return None
    if len(fields) < 2:
        check._fail(NOT_FRONTAL_CHEST, "one lung field, not two side by side")
        return None
    a, b = fields
    ratio = min(a.area, b.area) / max(a.area, b.area)
    m["lung_area_ratio"] = ratio
    if min(a.area, b.area) < MIN_FIELD_PIXELS:
        check._fail(NOT_FRONTAL_CHEST, f"a lung field has {min(a.area, b.area)} < {MIN_FIELD_PIXELS} pixels")
        return None
    if ratio < MIN_LUNG_AREA_RATIO:
        check._fail(NOT_FRONTAL_CHEST, f"lung fields of unequal size (area ratio {ratio:.2f} < "
                                       f"{MIN_LUNG_AREA_RATIO})")
    vertical = _overlap((a.top, a.bottom), (b.top, b.bottom)) / min(a.height, b.height)
    horizontal = _overlap((a.left, a.right), (b.left, b.right)) / min(a.width, b.width)
    m["lung_vertical_overlap"] = vertical
    m["lung_horizontal_overlap"] = horizontal
    if vertical < MIN_VERTICAL_OVERLAP or horizontal > MAX_HORIZONTAL_OVERLAP:
        check._fail(NOT_FRONTAL_CHEST, f"lung fields not side by side (vertical overlap {vertical:.2f}, "
                                       f"horizontal overlap {horizontal:.2f})")
    aspect = min(f.height * row_mm / (f.width * col_mm) for f in fields)
    m["lung_min_aspect"] = aspect
    if aspect < MIN_FIELD_ASPECT:
        check._fail(NOT_FRONTAL_CHEST, f"a lung field lies flat (height/width {aspect:.2f} < {MIN_FIELD_ASPECT})")
    solidity = min(f.area / int(ndimage.binary_fill_holes(f.crop).sum()) for f in fields)
    box_fill = min(f.area / (f.height * f.width) for f in fields)
    m["lung_min_solidity"] = solidity
    m["lung_min_box_fill"] = box_fill
    if solidity < MIN_FIELD_SOLIDITY or box_fill < MIN_FIELD_BOX_FILL:
        check._fail(NOT_FRONTAL_CHEST, f"a lung field is not solid (solidity {solidity:.2f}, box fill "
                                       f"{box_fill:.2f})")
    width_mm = (b.right - a.left + 1) * col_mm
    top, bottom = min(a.top, b.top), max(a.bottom, b.bottom)
    height_mm = (bottom - top + 1) * row_mm
    m["thoracic_width_mm"] = width_mm
    m["lung_height_mm"] = height_mm
    if not THORACIC_WIDTH_MM[0] <= width_mm <= THORACIC_WIDTH_MM[1]:
        check._fail(NOT_FRONTAL_CHEST, f"thorax {width_mm:.0f} mm wide, outside {THORACIC_WIDTH_MM} mm", size=True)
    if not LUNG_HEIGHT_MM[0] <= height_mm <= LUNG_HEIGHT_MM[1]:
        check._fail(NOT_FRONTAL_CHEST, f"lungs {height_mm:.0f} mm high, outside {LUNG_HEIGHT_MM} mm", size=True)
    return None if len(check.reasons) > failed_before else [a, b]


def _level(rows: np.ndarray, top: int, bottom: int) -> float:
    """Mean of ``rows`` as a fraction of the lungs' height (0 = top row, 1 = bottom row)."""
    return float((rows.mean() - top) / max(bottom - top, 1))


def _lateral_position(field: _Field, cols: np.ndarray, lateral_is_left: bool) -> float:
    """Mean lateral position of pixels in image columns ``cols`` within the
    field's box: 0 at its medial edge, 1 at its lateral edge."""
    x = (float(cols.mean()) - field.left + 0.5) / field.width
    return 1.0 - x if lateral_is_left else x


def _uprightness(field: _Field, lateral_is_left: bool) -> float:
    """Lateral position of the field's lowest rows minus that of its highest
    (see :data:`MIN_LUNG_UPRIGHTNESS`)."""
    crop = field.crop
    strip = max(1, int(round(LUNG_STRIP_FRACTION * field.height)))
    positions = []
    for part in (crop[-strip:], crop[:strip]):
        _, cols = np.nonzero(part)
        positions.append(_lateral_position(field, cols + field.left, lateral_is_left))
    return positions[0] - positions[1]


def _check_lung_layout(check: AnatomyCheck, fields: list[_Field], heart: np.ndarray | None) -> None:
    """Lung uprightness and laterality, for two side-by-side fields."""
    m = check.measurements
    right, left = fields  # the patient's right lung is on the image's left
    upright = (_uprightness(right, True) + _uprightness(left, False)) / 2.0
    m["lung_uprightness"] = upright
    if upright <= MIN_LUNG_UPRIGHTNESS:
        check._fail(IMPLAUSIBLE_ANATOMY, f"lung fields upside down (uprightness {upright:.2f} <= "
                                         f"{MIN_LUNG_UPRIGHTNESS})")
    ratios = [right.area / left.area]
    heart_rows = heart.any(axis=1) if heart is not None else None
    if heart_rows is not None and heart_rows.any():
        right_px, left_px = int(right.mask[heart_rows].sum()), int(left.mask[heart_rows].sum())
        if right_px and left_px:
            ratios.append(right_px / left_px)
    m["lung_right_left_ratio"] = float(np.exp(np.mean(np.log(ratios))))


def _check_heart_and_clavicles(check: AnatomyCheck, fields: list[_Field], heart: np.ndarray | None,
                               clavicles: np.ndarray | None) -> None:
    """Heart and clavicle rules, relative to two plausible lung fields."""
    m = check.measurements
    a, b = fields
    top, bottom = min(a.top, b.top), max(a.bottom, b.bottom)
    midline = (a.left + b.right) / 2.0
    if heart is not None:
        rows, cols = np.nonzero(heart)
        if rows.size == 0:
            check._fail(IMPLAUSIBLE_ANATOMY, "no heart between the lung fields")
        else:
            level = _level(rows, top, bottom)
            side = float((int(cols.max()) + int(cols.min()) - 2.0 * midline) / (cols.max() - cols.min() + 1))
            centroid = float(cols.mean())
            m["heart_level"] = level
            m["heart_side"] = side
            if not a.centroid_col < centroid < b.centroid_col:
                check._fail(IMPLAUSIBLE_ANATOMY, "heart not between the lung fields")
            if level < MIN_HEART_LEVEL:
                check._fail(IMPLAUSIBLE_ANATOMY, f"heart in the upper part of the lungs (level {level:.2f} < "
                                                 f"{MIN_HEART_LEVEL})")
            if side <= MIN_HEART_SIDE:
                check._fail(IMPLAUSIBLE_ANATOMY, f"heart not towards the patient's left (side {side:.2f} <= "
                                                 f"{MIN_HEART_SIDE}): mirrored film or dextrocardia")
    ratio = m.get("lung_right_left_ratio", 1.0)
    side = m.get("heart_side", 0.0)
    if MIN_HEART_SIDE < side < WEAK_HEART_SIDE and ratio < MIN_LUNG_RIGHT_LEFT_RATIO or \
            "heart_side" not in m and ratio < MIN_LUNG_RIGHT_LEFT_RATIO:
        check._fail(IMPLAUSIBLE_ANATOMY, f"heart near the midline (side {side:.2f}) and the patient's right lung "
                                         f"(image left) the smaller (ratio {ratio:.2f} < "
                                         f"{MIN_LUNG_RIGHT_LEFT_RATIO}): mirrored lungs")
    if clavicles is not None and clavicles.any():
        rows, _ = np.nonzero(clavicles)
        level = _level(rows, top, bottom)
        m["clavicle_level"] = level
        if level > MAX_CLAVICLE_LEVEL:
            check._fail(IMPLAUSIBLE_ANATOMY, f"clavicles not over the lung apices (level {level:.2f} > "
                                             f"{MAX_CLAVICLE_LEVEL})")


def _spacing(spacing_mm: Sequence[float]) -> tuple[float, float]:
    row_mm, col_mm = float(spacing_mm[0]), float(spacing_mm[1])
    if not (row_mm > 0 and col_mm > 0 and math.isfinite(row_mm) and math.isfinite(col_mm)):
        raise ValueError(f"spacing must be two positive numbers of mm, got {spacing_mm!r}")
    return row_mm, col_mm


def _mask(masks: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...] | None) -> np.ndarray | None:
    if name not in masks:
        return None
    mask = np.asarray(masks[name], dtype=bool)
    if mask.ndim != 2 or (shape is not None and mask.shape != shape):
        raise ValueError(f"mask {name!r} must be 2-D and of the lungs' shape {shape}, got {mask.shape}")
    return mask


def check_anatomy(masks: Mapping[str, np.ndarray], spacing_mm: Sequence[float],
                  view_position: str | None = None) -> AnatomyCheck:
    """Check that masks show an upright frontal chest; say why not.

    Args:
        masks: label -> bool (H, W) mask (any array castable to bool), all of
            one shape, with row 0 at the top and column 0 at the image's
            left (the patient's right on a PA/AP film). Labels used:
            "lungs" (both lungs), "heart", "clavicles" (both). A label absent
            from the mapping is not checked; a label present with an empty
            mask is absent anatomy (except clavicles, which a prediction may
            miss on a normal film).
        spacing_mm: (row, column) pixel spacing in mm, both > 0.
        view_position: the DICOM View Position (e.g. "PA", "AP", "LL"), or
            None when unknown.

    Returns:
        :class:`AnatomyCheck`. ``not_frontal_chest`` when the view position
        is lateral/oblique (:func:`is_non_frontal_view`), or the lungs are
        not two fields (8-connected components, a bridged pair split, see
        :func:`_lung_fields`) with: each >= :data:`MIN_FIELD_PIXELS`;
        area ratio >= :data:`MIN_LUNG_AREA_RATIO`; row ranges overlapping by
        >= :data:`MIN_VERTICAL_OVERLAP` and column ranges by <=
        :data:`MAX_HORIZONTAL_OVERLAP`; height/width in mm >=
        :data:`MIN_FIELD_ASPECT`; solidity >= :data:`MIN_FIELD_SOLIDITY` and
        bounding-box fill >= :data:`MIN_FIELD_BOX_FILL`; thoracic width and
        lung height within :data:`THORACIC_WIDTH_MM` / :data:`LUNG_HEIGHT_MM`.
        Only when the lungs pass, ``implausible_anatomy`` when the lungs'
        uprightness <= :data:`MIN_LUNG_UPRIGHTNESS`, their right/left ratio
        < :data:`MIN_LUNG_RIGHT_LEFT_RATIO`, the heart is
        empty, its centroid column is not strictly between the two fields'
        centroid columns, its centroid level (0 = top row of the lungs, 1 =
        bottom row) < :data:`MIN_HEART_LEVEL`, or its laterality (see
        :data:`MIN_HEART_SIDE`) <= :data:`MIN_HEART_SIDE`; or when the
        clavicles (non-empty) have a centroid level >
        :data:`MAX_CLAVICLE_LEVEL`. Measurements recorded (when reached):
        lung_fields, lung_area_ratio, lung_vertical_overlap,
        lung_horizontal_overlap, lung_min_aspect, lung_min_solidity,
        lung_min_box_fill, thoracic_width_mm, lung_height_mm,
        lung_uprightness, lung_right_left_ratio, heart_level, heart_side,
        clavicle_level. Never raises on empty, 1-pixel or
        odd-sized masks.

    Raises:
        ValueError: the spacing is not positive, or a mask is not 2-D or
            differs in shape from the others.
    """
    spacing = _spacing(spacing_mm)
    check = AnatomyCheck()
    if is_non_frontal_view(view_position):
        check._fail(NOT_FRONTAL_CHEST, f"DICOM View Position {view_position!r} is not a frontal view")
    lungs = _mask(masks, "lungs", None)
    shape = lungs.shape if lungs is not None else None
    heart = _mask(masks, "heart", shape)
    clavicles = _mask(masks, "clavicles", shape if shape is not None else (heart.shape if heart is not None
                                                                            else None))
    if lungs is None:  # a model without lungs: nothing to judge the layout by
        return check
    fields = _check_lungs(check, lungs, spacing)
    if fields is not None:
        _check_lung_layout(check, fields, heart)
        _check_heart_and_clavicles(check, fields, heart, clavicles)
    return check


# Polarity cue (:func:`middle_minus_sides`): on a frontal chest film in
# display polarity the mediastinum and spine, bright, fill the middle of the
# image and the lungs, dark, its sides. Mean of the middle band (columns
# 42-58 %) minus that of the side bands (columns 15-30 % and 70-85 %), rows
# 25-75 %, on the image scaled to [0, 1] (1st-99th percentile window).
# Measured: the 124 JSRT films of SCR fold 1 read correctly (their PNG
# exports with --invert) 0.042-0.66 (median 0.19), the same read without
# --invert -0.66 to -0.042; phantoms of several sizes and aspects 0.10-0.33;
# the real legacy CR 0.34. Below this the image looks stored white-is-zero
# (or inverted by mistake): only ever a hint in a flag's reasons, never a
# correction.
LOOKS_INVERTED_BELOW = -0.02
_MIDDLE_COLUMNS = (0.42, 0.58)
_SIDE_COLUMNS = ((0.15, 0.30), (0.70, 0.85))
_CUE_ROWS = (0.25, 0.75)

# The start of the hint given when the polarity cue says "inverted" (so a
# results table can be searched for it).
INVERT_HINT = "the image looks inverted"
# Likewise for a size rule failed with a spacing the user gave.
GIVEN_SPACING_HINT = "as given"


def middle_minus_sides(image: np.ndarray) -> float:
    """The polarity cue of a radiograph: mean brightness of its middle
    column band minus that of its side bands (see :data:`LOOKS_INVERTED_BELOW`).

    Args:
        image: (H, W) in display polarity (as read), any range; scaled here
            to [0, 1] by its 1st and 99th percentiles.

    Returns:
        Positive when the middle is brighter than the sides (a chest film the
        right way round: mediastinum bright, lungs dark); negative when it
        is darker (a chest film stored white-is-zero and not inverted); 0.0
        for a constant or tiny image.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 8:
        return 0.0
    lo, hi = np.percentile(image, [1.0, 99.0])
    if not hi > lo:
        return 0.0
    scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    h, w = scaled.shape
    rows = slice(int(h * _CUE_ROWS[0]), max(int(h * _CUE_ROWS[1]), int(h * _CUE_ROWS[0]) + 1))

    def band(lo_frac: float, hi_frac: float) -> np.ndarray:
        start = int(w * lo_frac)
        return scaled[rows, start:max(int(w * hi_frac), start + 1)]

    middle = band(*_MIDDLE_COLUMNS)
    sides = np.concatenate([band(*cols).ravel() for cols in _SIDE_COLUMNS])
    return float(middle.mean() - sides.mean())


def reading_hints(check: AnatomyCheck, *, source_format: str, spacing_source: str, spacing_mm: Sequence[float],
                  inverted: bool = False, polarity: float | None = None) -> list[str]:
    """Hints on how the way a scan was read may explain its anatomy flags.

    A PNG / JPEG / TIFF carries neither polarity nor spacing, and a DICOM
    file may carry no spacing: read with the wrong ones, a chest film gets
    masks that fail the anatomy rules. These hints say so next to the
    failed rules, never change the result.

    Args:
        check: :func:`check_anatomy` of the scan's masks.
        source_format: "dicom", "jsrt" or "raster" (``IngestedImage.source_format``).
        spacing_source: the scan's ``IngestedImage.spacing_source``.
        spacing_mm: the (row, column) spacing used.
        inverted: the raster was read inverted (``ReadOptions.invert``).
        polarity: :func:`middle_minus_sides` of the image as read, or None
            when not measured.

    Returns:
        Sentences, [] when ``check`` has no flag: the spacing was assumed
        (or given, not read from the file) and a size rule failed; for a
        raster, the image looks inverted (``polarity`` below
        :data:`LOOKS_INVERTED_BELOW`: give or drop ``--invert``) or, flagged
        ``not_frontal_chest`` without that cue, a reminder to check
        ``--invert`` and ``--pixel-spacing``.
    """
    from medseg.ingest.types import SPACING_ASSUMED, SPACING_GIVEN

    if not check.flags:
        return []
    hints = []
    spacing = "x".join(f"{float(v):g}" for v in dict.fromkeys(spacing_mm))
    spacing_hinted = False
    if check.size_reasons and spacing_source == SPACING_ASSUMED:
        hints.append(f"pixel spacing assumed: the file has none and none was given, so {spacing} mm was used and "
                     "the sizes in mm are wrong unless that is the true spacing; give it with --pixel-spacing MM "
                     "(chest films are digitised at about 0.1-0.4 mm)")
        spacing_hinted = True
    elif check.size_reasons and spacing_source == SPACING_GIVEN:
        hints.append(f"pixel spacing {spacing} mm {GIVEN_SPACING_HINT} (--pixel-spacing), not read from the file: "
                     "check it")
        spacing_hinted = True
    if source_format == "raster":
        if polarity is not None and polarity < LOOKS_INVERTED_BELOW:
            if inverted:
                hints.append(f"{INVERT_HINT} after --invert (its middle darker than its sides, where a chest film "
                             "shows the bright mediastinum between the dark lungs): if bone is bright in the file "
                             "itself, predict it without --invert")
            else:
                hints.append(f"{INVERT_HINT} (its middle darker than its sides, where a chest film shows the bright "
                             "mediastinum between the dark lungs): if bone is dark in the file (stored "
                             "white-is-zero, like the JSRT PNGs), predict it with --invert")
        elif NOT_FRONTAL_CHEST in check.flags:
            hints.append("a PNG / JPEG / TIFF carries no polarity" + ("" if spacing_hinted else " or pixel spacing")
                         + ": check --invert (files stored white-is-zero, bone dark)"
                         + ("" if spacing_hinted else " and --pixel-spacing MM"))
    return hints


def anatomy_flags(masks: Mapping[str, np.ndarray], spacing_mm: Sequence[float],
                  view_position: str | None = None) -> list[str]:
    """The flags of :func:`check_anatomy`: [] for a plausible upright frontal chest."""
    return check_anatomy(masks, spacing_mm, view_position).flags


def gate_ctr(ctr: CtrResult | None, flags: Sequence[str],
             anatomy: AnatomyCheck) -> tuple[CtrResult | None, list[str]]:
    """Withhold the CTR of a film whose anatomy is implausible.

    Args:
        ctr: the scan's :class:`~medseg.inference.ctr.CtrResult`, or None.
        flags: the scan's QC flags so far (:func:`medseg.inference.ctr.qc_flags`).
        anatomy: :func:`check_anatomy` of the same masks.

    Returns:
        (ctr, flags). With no anatomy flag: ``ctr`` unchanged and ``flags``
        as a new list. Otherwise: the anatomy flags appended (stable order,
        no duplicates), :data:`CTR_READING_FLAGS` removed from ``flags`` and
        from the result, and a copy of ``ctr`` with ``ctr = nan`` and no
        lines to draw (heart and thoracic widths kept, as measured).
    """
    out = list(flags)
    if not anatomy.flags:
        return ctr, out
    out = [f for f in out if f not in CTR_READING_FLAGS]
    for flag in anatomy.flags:
        if flag not in out:
            out.append(flag)
    if ctr is not None:
        ctr = replace(ctr, ctr=float("nan"), heart_line=None, thorax_line=None,
                      flags=[f for f in ctr.flags if f not in CTR_READING_FLAGS])
    return ctr, out


__all__ = [
    "ANATOMY_FLAGS",
    "AnatomyCheck",
    "CTR_READING_FLAGS",
    "IMPLAUSIBLE_ANATOMY",
    "NOT_FRONTAL_CHEST",
    "anatomy_flags",
    "check_anatomy",
    "gate_ctr",
    "GIVEN_SPACING_HINT",
    "INVERT_HINT",
    "LOOKS_INVERTED_BELOW",
    "is_non_frontal_view",
    "middle_minus_sides",
    "reading_hints",
]
