"""Mask clean-up, cardiothoracic ratio, QC flags and CTR line drawing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.inference.ctr import (
    CtrResult,
    boundary_confidence,
    cardiothoracic_ratio,
    draw_ctr_lines,
    qc_flags,
)
from medseg.inference.postprocess import clean_masks, component_count

H, W = 100, 120
SPACING = (0.5, 0.7)  # (row, column) mm


def _lungs() -> np.ndarray:
    """Two lungs: image-left cols 10..49 (rows 20..79), image-right cols 70..109 (rows 30..79).

    Widest row: 30 (topmost of rows 30..79), cols 10..109 -> 100 px.
    """
    lungs = np.zeros((H, W), dtype=bool)
    lungs[20:80, 10:50] = True
    lungs[30:80, 70:110] = True
    return lungs


def _heart_ellipse(half_width: int = 20) -> np.ndarray:
    """Ellipse centred at (60, 62), semi-axes 12 rows x ``half_width`` columns.

    Columns 62 - half_width .. 62 + half_width, reached on row 60 only.
    """
    rr, cc = np.mgrid[:H, :W]
    return ((rr - 60) / 12.0) ** 2 + ((cc - 62) / float(half_width)) ** 2 <= 1.0


def _heart_cols(left: int, right: int) -> np.ndarray:
    heart = np.zeros((H, W), dtype=bool)
    heart[50:70, left : right + 1] = True
    return heart


# --- clean_masks -------------------------------------------------------------


def test_clean_masks_removes_blobs_and_fills_holes():
    lungs = _lungs()
    lungs[40:45, 20:25] = False  # a hole inside the image-left lung
    lungs[90:93, 60:63] = True  # a spurious 3x3 blob
    heart = _heart_ellipse()
    heart[5:7, 5:7] = True  # spurious heart speck
    other = np.zeros((H, W), dtype=bool)
    other[10:20, 10:20] = True
    other[14:16, 14:16] = False  # hole
    other[50:52, 100:102] = True  # second component: kept (label not in the mapping)
    masks = {"heart": heart, "lungs": lungs, "other": other}
    before = {k: v.copy() for k, v in masks.items()}

    cleaned = clean_masks(masks)

    assert list(cleaned) == ["heart", "lungs", "other"]
    assert all(v.dtype == bool and v.shape == (H, W) for v in cleaned.values())
    np.testing.assert_array_equal(cleaned["lungs"], _lungs())  # blob gone, hole filled
    np.testing.assert_array_equal(cleaned["heart"], _heart_ellipse())
    assert component_count(cleaned["lungs"]) == 2
    assert cleaned["other"][14:16, 14:16].all()  # hole filled
    assert cleaned["other"][50:52, 100:102].all()  # not component-filtered
    assert component_count(cleaned["other"]) == 2
    for key in masks:  # inputs untouched
        np.testing.assert_array_equal(masks[key], before[key])


def test_clean_masks_without_hole_filling_and_custom_counts():
    lungs = _lungs()
    lungs[40:45, 20:25] = False
    cleaned = clean_masks({"lungs": lungs}, expected_components={"lungs": 1}, fill_holes=False)
    assert component_count(cleaned["lungs"]) == 1
    assert not cleaned["lungs"][40:45, 20:25].any()  # hole kept
    # The image-left lung (60 x 40 - 25 px hole = 2375 px) beats the other (50 x 40).
    assert cleaned["lungs"].sum() == 60 * 40 - 25
    assert not cleaned["lungs"][:, 60:].any()


def test_component_count_uses_8_connectivity():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one component
    mask[4, 4] = True
    assert component_count(mask) == 2
    assert component_count(np.zeros((4, 4), dtype=bool)) == 0


# --- cardiothoracic_ratio ----------------------------------------------------


def test_ctr_hand_computed():
    result = cardiothoracic_ratio(_heart_ellipse(), _lungs(), SPACING)
    # Heart: columns 42..82 -> 41 px x 0.7 mm; thorax: 10..109 -> 100 px x 0.7 mm.
    assert result.heart_width_mm == pytest.approx(41 * 0.7)
    assert result.thoracic_width_mm == pytest.approx(100 * 0.7)
    assert result.ctr == pytest.approx(0.41)
    assert result.heart_line == (60, 42, 82)
    assert result.thorax_line == (30, 10, 109)
    assert result.flags == []


def test_heart_width_is_transverse_diameter_across_rows():
    # Right-heart border bulges on rows 40..49, left-heart border on rows 50..59:
    # transverse diameter = cols 40..79 = 40 px, although no row is wider than 30.
    heart = np.zeros((H, W), dtype=bool)
    heart[40:50, 40:60] = True
    heart[50:60, 50:80] = True
    result = cardiothoracic_ratio(heart, _lungs(), SPACING)
    assert result.heart_width_mm == pytest.approx(40 * 0.7)
    assert result.ctr == pytest.approx(0.40)
    # Row midway between the extremes' median rows 44.5 and 54.5.
    assert result.heart_line == (50, 40, 79)


def test_ctr_uses_column_spacing_only():
    a = cardiothoracic_ratio(_heart_ellipse(), _lungs(), (0.5, 0.7))
    b = cardiothoracic_ratio(_heart_ellipse(), _lungs(), (3.0, 0.7))
    assert a.heart_width_mm == b.heart_width_mm and a.thoracic_width_mm == b.thoracic_width_mm
    c = cardiothoracic_ratio(_heart_ellipse(), _lungs(), (0.5, 0.2))
    assert c.thoracic_width_mm == pytest.approx(20.0) and c.ctr == pytest.approx(a.ctr)


def test_cardiomegaly_flag():
    result = cardiothoracic_ratio(_heart_cols(30, 89), _lungs(), SPACING)  # 60 / 100
    assert result.ctr == pytest.approx(0.6)
    assert result.flags == ["cardiomegaly"]
    exactly_half = cardiothoracic_ratio(_heart_cols(30, 79), _lungs(), SPACING)  # 50 / 100
    assert exactly_half.ctr == pytest.approx(0.5)
    assert exactly_half.flags == []


@pytest.mark.parametrize(
    ("left", "right", "ctr"),
    [(50, 69, 0.2), (15, 104, 0.9)],  # 20 px and 90 px hearts against 100 px
)
def test_implausible_ctr(left, right, ctr):
    result = cardiothoracic_ratio(_heart_cols(left, right), _lungs(), SPACING)
    assert result.ctr == pytest.approx(ctr)
    assert result.flags == ["implausible_ctr"]  # no "cardiomegaly" for a failed mask


def test_heart_wider_than_thorax_is_implausible():
    result = cardiothoracic_ratio(_heart_cols(0, 119), _lungs(), SPACING)
    assert result.heart_width_mm > result.thoracic_width_mm
    assert "implausible_ctr" in result.flags and "cardiomegaly" not in result.flags


def test_missing_heart_and_lungs():
    empty = np.zeros((H, W), dtype=bool)
    no_heart = cardiothoracic_ratio(empty, _lungs(), SPACING)
    assert math.isnan(no_heart.ctr) and math.isnan(no_heart.heart_width_mm)
    assert no_heart.thoracic_width_mm == pytest.approx(70.0)
    assert no_heart.flags == ["missing_heart"] and no_heart.heart_line is None
    no_lungs = cardiothoracic_ratio(_heart_ellipse(), empty, SPACING)
    assert math.isnan(no_lungs.ctr) and no_lungs.flags == ["missing_lungs"]
    neither = cardiothoracic_ratio(empty, empty, SPACING)
    assert neither.flags == ["missing_heart", "missing_lungs"]


def test_ctr_rejects_bad_input():
    with pytest.raises(ValueError):
        cardiothoracic_ratio(_heart_ellipse(), _lungs()[:50], SPACING)
    with pytest.raises(ValueError):
        cardiothoracic_ratio(_heart_ellipse(), _lungs(), (0.5, 0.0))


# --- qc_flags ----------------------------------------------------------------


def _good_masks() -> dict[str, np.ndarray]:
    clavicles = np.zeros((H, W), dtype=bool)
    clavicles[15:20, 15:45] = True
    clavicles[15:20, 75:105] = True
    return {"heart": _heart_ellipse(), "lungs": _lungs(), "clavicles": clavicles}


def _confident(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.where(v, 0.98, 0.02) for k, v in masks.items()}


def test_qc_flags_clean_case():
    masks = _good_masks()
    ctr = cardiothoracic_ratio(masks["heart"], masks["lungs"], SPACING)
    assert qc_flags(masks, _confident(masks), ctr) == []
    assert qc_flags(masks, None, None) == []


def test_qc_flags_missing_and_components():
    masks = _good_masks()
    masks["clavicles"] = np.zeros((H, W), dtype=bool)
    masks["lungs"] = masks["lungs"].copy()
    masks["lungs"][90:93, 60:63] = True  # third lung component
    assert qc_flags(masks, None, None) == ["missing_clavicles", "lungs_not_two_components"]
    one_lung = _good_masks()
    one_lung["lungs"][:, 50:70] = one_lung["lungs"][:, 49:50]  # bridge -> one component
    assert component_count(one_lung["lungs"]) == 1
    assert qc_flags(one_lung, None, None) == ["lungs_not_two_components"]


def test_qc_flags_include_ctr_flags_without_duplicates():
    masks = _good_masks()
    masks["heart"] = np.zeros((H, W), dtype=bool)
    ctr = cardiothoracic_ratio(masks["heart"], masks["lungs"], SPACING)
    assert qc_flags(masks, None, ctr) == ["missing_heart"]
    wide = _good_masks()
    wide["heart"] = _heart_cols(30, 89)
    ctr = cardiothoracic_ratio(wide["heart"], wide["lungs"], SPACING)
    assert qc_flags(wide, None, ctr) == ["cardiomegaly"]


def test_low_confidence_near_half():
    masks = _good_masks()
    rng = np.random.default_rng(0)
    probs = {k: 0.5 + rng.uniform(-0.05, 0.05, size=(H, W)) for k in masks}
    assert boundary_confidence(masks, probs) < 0.56
    assert qc_flags(masks, probs, None) == ["low_confidence"]
    flat = {k: np.full((H, W), 0.3) for k in masks}
    assert boundary_confidence(masks, flat) == pytest.approx(0.7)


def test_low_confidence_counts_the_boundary_band_not_the_background():
    # Confident everywhere except within 2 px of the lung contour: the
    # whole-image mean stays high, the band mean does not.
    masks = {"lungs": _lungs()}
    probs = np.where(masks["lungs"], 0.99, 0.01)
    from scipy import ndimage

    edge = masks["lungs"] & ~ndimage.binary_erosion(masks["lungs"], border_value=1)
    near = ndimage.binary_dilation(edge, iterations=2)
    probs[near] = 0.5
    assert np.maximum(probs, 1 - probs).mean() > 0.85  # whole image looks fine
    assert qc_flags(masks, {"lungs": probs}, None) == ["low_confidence"]


def test_confidence_threshold_is_configurable():
    masks = _good_masks()
    probs = {k: np.where(v, 0.8, 0.2) for k, v in masks.items()}  # confidence 0.8
    assert qc_flags(masks, probs, None) == ["low_confidence"]
    assert qc_flags(masks, probs, None, min_confidence=0.75) == []


# --- draw_ctr_lines -----------------------------------------------------------


def test_draw_ctr_lines_changes_only_the_line_rows():
    result = cardiothoracic_ratio(_heart_ellipse(), _lungs(), SPACING)
    rgb = np.full((H, W, 3), 0.5, dtype=np.float32)
    out = draw_ctr_lines(rgb, result)
    assert out.shape == (H, W, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(rgb, 0.5)  # input untouched
    changed_rows = set(np.nonzero((out != rgb).any(axis=(1, 2)))[0].tolist())
    # 100 x 120 image -> 2 px lines on rows (row - 1, row).
    assert changed_rows == {29, 30, 59, 60}
    np.testing.assert_array_equal(out[59:61, 42:83], np.broadcast_to([1.0, 1.0, 0.0], (2, 41, 3)))
    np.testing.assert_array_equal(out[29:31, 10:110], np.broadcast_to([1.0, 0.0, 1.0], (2, 100, 3)))  # magenta
    # Nothing beyond the line ends.
    np.testing.assert_array_equal(out[59:61, :42], rgb[59:61, :42])
    np.testing.assert_array_equal(out[59:61, 83:], rgb[59:61, 83:])
    np.testing.assert_array_equal(out[29:31, :10], rgb[29:31, :10])


def test_draw_ctr_lines_thicker_on_large_images_and_skips_missing():
    big = np.zeros((600, 600, 3), dtype=np.float32)
    result = CtrResult(0.5, 50.0, 100.0, (300, 250, 350), None, [])
    out = draw_ctr_lines(big, result)
    rows = set(np.nonzero(out.any(axis=(1, 2)))[0].tolist())
    assert rows == {299, 300, 301}
    with pytest.raises(ValueError):
        draw_ctr_lines(np.zeros((10, 10)), result)


def _random_masks(seed: int, shape=(97, 83)) -> list[np.ndarray]:
    """Blobby masks with holes, islands, masks touching the image edge, empty and full ones."""
    rng = np.random.default_rng(seed)
    masks = [ndimage.gaussian_filter(rng.random(shape), sigma) > level
             for sigma, level in ((1.5, 0.5), (3, 0.5), (4, 0.52), (2, 0.45))]
    edge = np.zeros(shape, bool)
    edge[:30, :20] = True
    edge[10:15, 5:10] = False  # a hole in a mask touching the corner
    return [*masks, edge, np.zeros(shape, bool), np.ones(shape, bool)]


@pytest.mark.parametrize("seed", range(4))
def test_cropped_morphology_equals_whole_image_scipy(seed):
    """Hole filling, component selection and the boundary band work on the
    masks' bounding boxes (issue 14's speed-up): the results must be the
    whole-image scipy operations', pixel for pixel."""
    from medseg.inference.ctr import band_radius, boundary_confidence
    from medseg.inference.postprocess import fill_mask_holes, keep_largest_components

    rng = np.random.default_rng(100 + seed)
    for mask in _random_masks(seed):
        assert np.array_equal(fill_mask_holes(mask), ndimage.binary_fill_holes(mask))
        for n in (1, 2):
            labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
            sizes = np.bincount(labelled.ravel())[1:]
            expected = mask if count <= n else np.isin(labelled, np.argsort(-sizes, kind="stable")[:n] + 1)
            assert np.array_equal(keep_largest_components(mask, n), expected)
        prob = rng.random(mask.shape)
        got = boundary_confidence({"x": mask}, {"x": prob})
        conf = np.maximum(prob, 1 - prob)
        if mask.any() and not mask.all():
            boundary = mask & ~ndimage.binary_erosion(mask, border_value=1)
            band = ndimage.binary_dilation(boundary, iterations=band_radius(mask.shape))
            assert got == pytest.approx(conf[band].mean(), rel=1e-12)
        else:  # no contour: the whole image
            assert got == pytest.approx(conf.mean(), rel=1e-12)
