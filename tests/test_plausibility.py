"""Anatomical plausibility QC: is this an upright frontal chest? Else no CTR.

Masks from the phantoms' truth and the SCR experts must pass; the same masks
rotated, mirrored or transposed, lateral-like and non-chest layouts, and
absurd spacings must be flagged. End to end, ``medseg predict`` must give
such scans the flag and an empty CTR, and keep the upright ones' CTR.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from dicom_factory import make_dicom
from medseg.inference.ctr import cardiothoracic_ratio, qc_flags
from medseg.inference.plausibility import (
    ANATOMY_FLAGS,
    IMPLAUSIBLE_ANATOMY,
    MIN_HEART_LEVEL,
    MIN_HEART_SIDE,
    MIN_LUNG_RIGHT_LEFT_RATIO,
    WEAK_HEART_SIDE,
    NOT_FRONTAL_CHEST,
    anatomy_flags,
    check_anatomy,
    gate_ctr,
    is_non_frontal_view,
)
from medseg.phantoms.anatomy import render_phantom

MEDSEG = [sys.executable, "-m", "medseg"]

# Transforms of an upright PA film and the flag each must raise.
TRANSFORMS = {
    "rot90": (lambda m: np.rot90(m, 1), NOT_FRONTAL_CHEST),
    "rot270": (lambda m: np.rot90(m, 3), NOT_FRONTAL_CHEST),
    "transpose": (lambda m: m.T, NOT_FRONTAL_CHEST),
    "rot180": (lambda m: np.rot90(m, 2), IMPLAUSIBLE_ANATOMY),
    "mirror": (np.fliplr, IMPLAUSIBLE_ANATOMY),
    "upside_down": (np.flipud, IMPLAUSIBLE_ANATOMY),
}
PHANTOM_CASES = [(1, (256, 256)), (2, (160, 128)), (3, (128, 192)), (4, (300, 220)), (5, (512, 384))]


def _labels(structures: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SCR structures -> the prediction labels heart / lungs / clavicles."""
    return {
        "heart": structures["heart"],
        "lungs": structures["left_lung"] | structures["right_lung"],
        "clavicles": structures["left_clavicle"] | structures["right_clavicle"],
    }


def _phantom(seed: int, shape: tuple[int, int]) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """Truth masks of a phantom and a spacing that makes the image 350 mm wide."""
    _, structures = render_phantom(seed, shape)
    col = 350.0 / shape[1]
    return _labels(structures), (col, col)


def _transform(masks, fn):
    return {name: np.ascontiguousarray(fn(mask)) for name, mask in masks.items()}


# --- phantom truth masks ----------------------------------------------------------------


@pytest.mark.parametrize("seed, shape", PHANTOM_CASES)
def test_upright_phantoms_are_plausible(seed, shape):
    masks, spacing = _phantom(seed, shape)
    check = check_anatomy(masks, spacing, "PA")
    assert check.flags == [] and check.plausible, check.reasons
    assert check.measurements["heart_level"] > MIN_HEART_LEVEL
    assert check.measurements["heart_side"] > MIN_HEART_SIDE


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("seed, shape", PHANTOM_CASES)
def test_rotated_mirrored_transposed_phantoms_are_flagged(seed, shape, name):
    masks, spacing = _phantom(seed, shape)
    fn, expected = TRANSFORMS[name]
    if name in ("rot90", "rot270", "transpose"):
        spacing = spacing[::-1]
    check = check_anatomy(_transform(masks, fn), spacing)
    assert check.flags == [expected], check.reasons


def test_view_position_lateral_is_not_frontal():
    masks, spacing = _phantom(1, (256, 256))
    for view in ("LL", "RL", "LATERAL", " lateral ", "Left Lateral", "RLO", "LLO"):
        assert is_non_frontal_view(view), view
        assert anatomy_flags(masks, spacing, view) == [NOT_FRONTAL_CHEST], view
    for view in ("PA", "AP", "", None, "RLD", "unknown"):
        assert not is_non_frontal_view(view), view
        assert anatomy_flags(masks, spacing, view) == [], view


def test_lateral_like_layout_one_lung_field():
    """A lateral film: one lung field (both lungs superimposed), the heart in
    front of its lower part."""
    rr, cc = np.mgrid[:300, :300]
    lungs = ((rr - 140) / 110.0) ** 2 + ((cc - 160) / 90.0) ** 2 <= 1.0
    heart = ((rr - 200) / 50.0) ** 2 + ((cc - 110) / 45.0) ** 2 <= 1.0
    lungs &= ~heart
    clavicles = (np.abs(rr - 40) < 6) & (cc > 90) & (cc < 200)
    check = check_anatomy({"heart": heart, "lungs": lungs, "clavicles": clavicles}, (1.0, 1.0))
    assert check.flags == [NOT_FRONTAL_CHEST]
    assert "one lung field" in check.reasons[0]


def test_two_fields_stacked_or_of_very_unequal_size():
    lungs = np.zeros((200, 200), bool)
    lungs[20:80, 40:160] = lungs[110:170, 40:160] = True  # stacked
    assert anatomy_flags({"lungs": lungs}, (1.0, 1.0)) == [NOT_FRONTAL_CHEST]
    lungs = np.zeros((200, 200), bool)
    lungs[20:180, 20:90] = True
    lungs[150:170, 120:130] = True  # a fragment beside one lung
    assert anatomy_flags({"lungs": lungs}, (1.0, 1.0)) == [NOT_FRONTAL_CHEST]


@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (1, 7), (3, 2), (16, 16), (97, 61), (512, 300)])
def test_blank_tiny_and_full_masks_are_flagged_without_error(shape):
    for fill in (False, True):
        masks = {name: np.full(shape, fill, bool) for name in ("heart", "lungs", "clavicles")}
        assert anatomy_flags(masks, (0.5, 0.5)) == [NOT_FRONTAL_CHEST]
    if shape[0] and shape[1]:
        one = np.zeros(shape, bool)
        one[shape[0] // 2, shape[1] // 2] = True
        assert anatomy_flags({"heart": one, "lungs": one, "clavicles": one}, (0.5, 0.5)) == [NOT_FRONTAL_CHEST]


@pytest.mark.parametrize("density", [0.05, 0.3, 0.41, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("sigma", [0, 3])
def test_noise_masks_are_not_frontal_chest(density, sigma):
    rng = np.random.default_rng(int(density * 100) + sigma)
    field = rng.random((256, 200))
    if sigma:
        field = ndimage.gaussian_filter(field, sigma)
    masks = {name: field >= np.quantile(field, 1 - density) for name in ("heart", "lungs", "clavicles")}
    assert anatomy_flags(masks, (1.0, 1.0)) == [NOT_FRONTAL_CHEST]


def test_child_sized_chest_is_plausible_absurd_spacing_is_not():
    masks, _ = _phantom(2, (256, 256))
    child = check_anatomy(masks, (0.45, 0.45))  # image 115 mm wide
    assert 70 < child.measurements["thoracic_width_mm"] < 110
    assert child.flags == [], child.reasons
    giant = check_anatomy(masks, (5.0, 5.0))  # the same masks with 5 mm pixels: a 1.2 m thorax
    assert giant.flags == [NOT_FRONTAL_CHEST]
    assert any("mm wide" in r for r in giant.reasons)
    masks, _ = _phantom(5, (512, 384))
    assert anatomy_flags(masks, (5.0, 5.0)) == [NOT_FRONTAL_CHEST]
    assert anatomy_flags(masks, (0.02, 0.02)) == [NOT_FRONTAL_CHEST]  # a 6 mm "thorax"


def test_heart_missing_or_misplaced_and_clavicles_low():
    masks, spacing = _phantom(1, (256, 256))
    no_heart = {**masks, "heart": np.zeros_like(masks["heart"])}
    assert anatomy_flags(no_heart, spacing) == [IMPLAUSIBLE_ANATOMY]
    # Heart moved onto the image-left lung (the patient's right).
    labelled, _ = ndimage.label(masks["lungs"], np.ones((3, 3)))
    right_lung_col = np.nonzero(labelled == labelled[np.nonzero(masks["lungs"])][0])[1].mean()
    shift = int(round(right_lung_col - np.nonzero(masks["heart"])[1].mean()))
    shifted = np.roll(masks["heart"], shift, axis=1)
    check = check_anatomy({**masks, "heart": shifted}, spacing)
    assert check.flags == [IMPLAUSIBLE_ANATOMY] and any("not between" in r for r in check.reasons)
    # Clavicles at the bottom of the lungs, heart and lungs upright.
    low = np.flipud(masks["clavicles"])
    assert anatomy_flags({**masks, "clavicles": low}, spacing) == [IMPLAUSIBLE_ANATOMY]
    # Clavicles missing (a prediction may miss them) or not predicted at all: fine.
    assert anatomy_flags({**masks, "clavicles": np.zeros_like(low)}, spacing) == []
    assert anatomy_flags({"heart": masks["heart"], "lungs": masks["lungs"]}, spacing) == []


@pytest.mark.parametrize("seed, shape", [c for c in PHANTOM_CASES if c[0] != 2])
def test_lungs_upside_down_or_mirrored_around_an_unmoved_heart(seed, shape):
    """What a network tends to output on an upside-down or mirrored film: the
    dark lung fields outlined as they are, the heart where hearts usually are."""
    masks, spacing = _phantom(seed, shape)
    upright = check_anatomy(masks, spacing)
    assert upright.measurements["lung_right_left_ratio"] > 1.2  # clearly asymmetric phantom lungs
    upside_down = check_anatomy({**masks, "lungs": np.flipud(masks["lungs"])}, spacing)
    assert upside_down.flags == [IMPLAUSIBLE_ANATOMY]
    assert any("upside down" in r for r in upside_down.reasons)
    assert upside_down.measurements["lung_uprightness"] == pytest.approx(-upright.measurements["lung_uprightness"])
    # Mirrored lungs with the heart left near the midline (the phantom-trained
    # test model's output on a mirrored film): flagged by the lungs.
    lungs = np.fliplr(masks["lungs"])
    lung_cols = np.flatnonzero(lungs.any(axis=0))
    heart_cols = np.flatnonzero(masks["heart"].any(axis=0))
    width = heart_cols[-1] - heart_cols[0] + 1
    target = (lung_cols[0] + lung_cols[-1]) / 2 + 0.025 * width  # side 0.05
    central = np.roll(masks["heart"], int(round(target - (heart_cols[0] + heart_cols[-1]) / 2)), axis=1)
    mirrored = check_anatomy({**masks, "lungs": lungs, "heart": central}, spacing)
    assert 0 < mirrored.measurements["heart_side"] < WEAK_HEART_SIDE
    assert mirrored.flags == [IMPLAUSIBLE_ANATOMY]
    assert mirrored.measurements["lung_right_left_ratio"] < MIN_LUNG_RIGHT_LEFT_RATIO
    assert any("right lung" in r for r in mirrored.reasons)
    # With the heart clearly on the patient's left, the same lungs are an
    # upright film with a small right lung (see the test below): no flag.
    assert check_anatomy({**masks, "lungs": lungs}, spacing).measurements["heart_side"] >= WEAK_HEART_SIDE


def test_lungs_joined_by_a_thin_bridge_still_two_fields():
    masks, spacing = _phantom(1, (256, 256))
    lungs = masks["lungs"].copy()
    rows = np.flatnonzero(lungs.any(axis=1))
    bridge_row = rows[len(rows) // 3]
    cols = np.flatnonzero(lungs[bridge_row])
    lungs[bridge_row:bridge_row + 2, cols.min():cols.max() + 1] = True  # a 2-row leak across the mediastinum
    assert ndimage.label(lungs, np.ones((3, 3)))[1] == 1
    check = check_anatomy({**masks, "lungs": lungs}, spacing)
    assert check.flags == [], check.reasons
    mirrored = check_anatomy(_transform({**masks, "lungs": lungs}, np.fliplr), spacing)
    assert mirrored.flags == [IMPLAUSIBLE_ANATOMY]


def test_bad_spacing_or_shapes_raise():
    masks, _ = _phantom(1, (128, 128))
    for spacing in ((0, 1), (1, -1), (float("nan"), 1)):
        with pytest.raises(ValueError):
            check_anatomy(masks, spacing)
    with pytest.raises(ValueError):
        check_anatomy({"lungs": masks["lungs"], "heart": masks["heart"][:-1]}, (1, 1))


def test_gate_ctr_withholds_the_ctr_and_its_reading():
    masks, spacing = _phantom(1, (256, 256))
    ctr = cardiothoracic_ratio(masks["heart"], masks["lungs"], spacing)
    assert math.isfinite(ctr.ctr)
    flags = [*qc_flags(masks, None, ctr), "cardiomegaly"]  # as if the CTR read > 0.5
    kept, kept_flags = gate_ctr(ctr, flags, check_anatomy(masks, spacing))
    assert kept is ctr and kept_flags == flags and kept_flags is not flags

    mirrored = _transform(masks, np.fliplr)
    ctr_m = cardiothoracic_ratio(mirrored["heart"], mirrored["lungs"], spacing)
    flags_m = ["missing_clavicles", "cardiomegaly", "implausible_ctr", "low_confidence"]
    gated, gated_flags = gate_ctr(ctr_m, flags_m, check_anatomy(mirrored, spacing))
    assert math.isnan(gated.ctr) and gated.heart_line is None and gated.thorax_line is None
    assert gated.heart_width_mm == ctr_m.heart_width_mm and gated.thoracic_width_mm == ctr_m.thoracic_width_mm
    assert gated_flags == ["missing_clavicles", "low_confidence", IMPLAUSIBLE_ANATOMY]
    assert "cardiomegaly" not in gated.flags and "implausible_ctr" not in gated.flags
    assert math.isfinite(ctr_m.ctr)  # the input is not modified
    upside_down_lateral = check_anatomy(_transform(masks, np.flipud), spacing, "LL")
    assert upside_down_lateral.flags == [NOT_FRONTAL_CHEST, IMPLAUSIBLE_ANATOMY]
    both, both_flags = gate_ctr(None, [IMPLAUSIBLE_ANATOMY], upside_down_lateral)
    assert both is None and both_flags == [IMPLAUSIBLE_ANATOMY, NOT_FRONTAL_CHEST]


# --- real anatomy: the SCR expert masks -------------------------------------------------


def test_scr_expert_masks_are_plausible_and_their_mirror_images_are_not(jsrt_root):
    """Calibration on real anatomy: none of the 124 SCR cases is flagged; each
    mirrored or upside-down (rotated by 180 degrees) copy is. Prints the measured ranges
    (run with -s) to show the margin to each threshold."""
    masks_root = jsrt_root / "masks"
    ids = sorted(p.stem for p in (masks_root / "heart").glob("*.gif"))
    assert ids, f"no SCR masks under {masks_root}"
    measured: dict[str, list[float]] = {}
    flagged: list[tuple[str, list[str]]] = []
    unflagged: list[tuple[str, str]] = []
    spacing = (0.35, 0.35)
    for case in ids:
        structures = {name: np.asarray(Image.open(masks_root / name / f"{case}.gif")) > 0
                      for name in ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle")}
        masks = _labels(structures)
        check = check_anatomy(masks, spacing, "PA")
        if check.flags:
            flagged.append((case, check.reasons))
        for key, value in check.measurements.items():
            measured.setdefault(key, []).append(value)
        for name in ("mirror", "rot180"):
            fn, expected = TRANSFORMS[name]
            if expected not in anatomy_flags(_transform(masks, fn), spacing):
                unflagged.append((case, name))
    print(f"\nSCR expert masks, {len(ids)} cases: measured min / 1st pct / median / max")
    for key, values in measured.items():
        v = np.asarray(values)
        print(f"  {key:24s} {v.min():8.3f} {np.percentile(v, 1):8.3f} {np.median(v):8.3f} {v.max():8.3f}")
    assert not flagged, flagged
    assert not unflagged, unflagged
    if len(ids) == 124:  # the full fold 1: the calibration quoted in plausibility.py
        assert min(measured["heart_side"]) > MIN_HEART_SIDE + 0.03
        assert min(measured["lung_right_left_ratio"]) > MIN_LUNG_RIGHT_LEFT_RATIO + 0.03
        assert min(measured["heart_level"]) > MIN_HEART_LEVEL + 0.09
        assert min(measured["lung_uprightness"]) > 0.4
        assert max(measured["clavicle_level"]) < 0.2


# --- end to end: medseg predict ---------------------------------------------------------


def _hand(shape: tuple[int, int]) -> np.ndarray:
    """A bright hand-like blob on a dark background: a palm and five fingers."""
    h, w = shape
    rr, cc = np.mgrid[:h, :w]
    hand = ((rr - 0.68 * h) / (0.2 * h)) ** 2 + ((cc - 0.5 * w) / (0.22 * w)) ** 2 <= 1
    for i, x in enumerate(np.linspace(0.32, 0.68, 4)):
        top = 0.12 * h + (0.08 * h if i in (0, 3) else 0)
        hand |= (np.abs(cc - x * w) < 0.045 * w) & (rr > top) & (rr < 0.6 * h)
    hand |= (np.abs(cc - 0.2 * w - (rr - 0.55 * h) * 0.5) < 0.05 * w) & (rr > 0.4 * h) & (rr < 0.72 * h)
    return ndimage.gaussian_filter(hand.astype(float), 2) * 0.7 + 0.1


def _write_transformed(source: Path, out: Path, fn, view: str | None = None) -> None:
    ds = pydicom.dcmread(source)
    pixels = np.ascontiguousarray(fn(ds.pixel_array)).astype(np.uint16)
    spacing = tuple(float(v) for v in ds.PixelSpacing)
    make_dicom(out, pixels, photometric=ds.PhotometricInterpretation, bits_stored=int(ds.BitsStored),
               pixel_spacing=spacing, extra_elements={"ViewPosition": view} if view else None)


def test_predict_flags_rotated_mirrored_lateral_and_non_chest_scans(model_and_scans, tmp_path):
    model, scans = model_and_scans
    inputs = tmp_path / "in"
    inputs.mkdir()
    originals = sorted(scans.glob("*.dcm"))
    expected_flag: dict[str, tuple[str, ...]] = {}
    for source in originals:
        case = source.stem
        (inputs / source.name).write_bytes(source.read_bytes())
        for name in ("rot90", "rot180", "mirror"):
            fn, _ = TRANSFORMS[name]
            _write_transformed(source, inputs / f"{case}_{name}.dcm", fn)
            expected_flag[f"{case}_{name}"] = ANATOMY_FLAGS
    # Upright pixels, but the DICOM says lateral.
    _write_transformed(originals[0], inputs / "LATERAL.dcm", lambda a: a, view="LL")
    expected_flag["LATERAL"] = (NOT_FRONTAL_CHEST,)
    gradient = np.linspace(0, 255, 160)[:, None] * np.linspace(0.3, 1.0, 128)[None, :]
    Image.fromarray(gradient.astype(np.uint8)).save(inputs / "GRADIENT.png")
    Image.fromarray((_hand((160, 128)) * 255).astype(np.uint8)).save(inputs / "HAND.png")
    expected_flag["GRADIENT"] = expected_flag["HAND"] = ANATOMY_FLAGS

    out = tmp_path / "out"
    proc = subprocess.run([*MEDSEG, "predict", str(inputs), "--model", str(model), "--out", str(out),
                           "--pixel-spacing", "1.4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""]).set_index("case_id")
    assert set(table.index) == {f.stem for f in originals} | set(expected_flag)

    def anatomy(case: str) -> list[str]:
        return [f for f in str(table.qc_flags[case]).split("|") if f in ANATOMY_FLAGS]

    def has_ctr_lines(case: str) -> bool:
        overlay = np.asarray(Image.open(out / case / "overlay.png"))
        yellow = (overlay == (255, 255, 0)).all(axis=-1)
        magenta = (overlay == (255, 0, 255)).all(axis=-1)
        return bool(yellow.any() or magenta.any())

    for source in originals:  # upright: plausible, with a CTR and its lines
        case = source.stem
        assert anatomy(case) == [], (case, table.qc_flags[case])
        assert math.isfinite(table.ctr[case]) and has_ctr_lines(case)
    for case, allowed in expected_flag.items():
        flags = anatomy(case)
        assert flags and set(flags) <= set(allowed), (case, table.qc_flags[case])
        assert math.isnan(table.ctr[case]), (case, table.ctr[case])
        assert not {"cardiomegaly", "implausible_ctr"} & set(str(table.qc_flags[case]).split("|"))
        assert not has_ctr_lines(case), case
        meta = (out / case / "prediction.json").read_text()
        assert '"ctr": NaN' in meta


def test_small_right_lung_with_the_heart_clearly_left_is_an_upright_film():
    """A right lung smaller than the left (effusion, collapse) on an upright
    film: the heart says which side is which, so no flag and a CTR. (The
    phantom's lungs swapped left for right, heart in place, are such a film.)"""
    masks, spacing = _phantom(1, (256, 256))
    check = check_anatomy({**masks, "lungs": np.fliplr(masks["lungs"])}, spacing)
    assert check.measurements["lung_right_left_ratio"] < MIN_LUNG_RIGHT_LEFT_RATIO
    assert check.measurements["heart_side"] >= WEAK_HEART_SIDE
    assert check.flags == []


# --- how the scan was read: polarity cue and hints in the reasons -----------------------


@pytest.mark.parametrize("seed, shape", PHANTOM_CASES)
def test_polarity_cue_tells_a_chest_film_from_its_inverse(seed, shape):
    """The middle of a frontal chest film (mediastinum, spine) is brighter
    than its sides (lungs); stored white-is-zero and read without --invert,
    darker. (On the 124 JSRT PNGs: 0.042-0.66 read with --invert, the
    negatives without; see LOOKS_INVERTED_BELOW.)"""
    from medseg.inference.plausibility import LOOKS_INVERTED_BELOW, middle_minus_sides

    image, _ = render_phantom(seed, shape)
    assert middle_minus_sides(image) > 0.05  # phantoms: 0.10-0.33
    assert middle_minus_sides(1.0 - image) < LOOKS_INVERTED_BELOW
    assert middle_minus_sides(np.full(shape, 0.3)) == 0.0  # constant: no cue
    assert middle_minus_sides(np.zeros((4, 4))) == 0.0  # tiny: no cue


def test_flagged_raster_reasons_suggest_invert_only_for_rasters():
    """A PNG / JPEG / TIFF flagged not_frontal_chest: its reasons name
    --invert, as a firm hint when the image looks inverted, else as a check
    together with --pixel-spacing. DICOM files carry their polarity: no
    hint. Unflagged scans: nothing."""
    from medseg.inference.plausibility import INVERT_HINT, reading_hints

    masks, spacing = _phantom(1, (256, 256))
    flagged = check_anatomy(_transform(masks, TRANSFORMS["rot90"][0]), spacing)
    assert flagged.flags == [NOT_FRONTAL_CHEST] and not flagged.size_reasons

    def hints(**kwargs):
        return reading_hints(flagged, spacing_mm=spacing, **kwargs)

    looks_inverted = hints(source_format="raster", spacing_source="given", polarity=-0.2)
    assert len(looks_inverted) == 1 and looks_inverted[0].startswith(INVERT_HINT)
    assert "predict it with --invert" in looks_inverted[0]
    after_invert = hints(source_format="raster", spacing_source="given", polarity=-0.2, inverted=True)
    assert "without --invert" in after_invert[0]
    no_cue = hints(source_format="raster", spacing_source="assumed", polarity=0.2)
    assert len(no_cue) == 1 and "--invert" in no_cue[0] and "--pixel-spacing" in no_cue[0]
    assert INVERT_HINT not in no_cue[0]
    assert hints(source_format="dicom", spacing_source="PixelSpacing", polarity=None) == []
    assert reading_hints(check_anatomy(masks, spacing), source_format="raster", spacing_source="assumed",
                         spacing_mm=spacing, polarity=-0.2) == []
