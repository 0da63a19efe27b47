"""Millimetres at the patient, not at the detector (issue 9, part 2).

DICOM files are written with pydicom (tests/dicom_factory.py). The rule
under test (medseg.ingest.dicom._spacing, PS3.3 10.7.1.1-10.7.1.3):
calibrated Pixel Spacing, else Imager Pixel Spacing / magnification factor
(Estimated Radiographic Magnification Factor, else SID / SOD), else Imager
Pixel Spacing at the detector plane, else the configured default. Also:
Pixel Padding Value / Range Limit pixels are left out of the intensity
percentiles (PS3.3 C.7.5.1.1.2), and the results table, evaluation and
report say which millimetres are not at the patient.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation

from dicom_factory import make_dicom, synthetic_image
from medseg.evaluation.evaluate import (
    evaluate_predictions,
    spacing_note,
    spacing_provenance,
    summarise,
    write_evaluation,
)
from medseg.inference.ctr import cardiothoracic_ratio
from medseg.ingest import load_image
from medseg.ingest.dicom import SPACING_SOURCES, read_dicom
from medseg.ingest.types import SPACING_PLANES, IngestedImage, ReadOptions, plane_of_source
from medseg.nifti import save_nifti_2d
from medseg.phantoms.anatomy import render_phantom
from medseg.preprocessing.intensity import normalise_intensity
from medseg.preprocessing.preprocess import canonical_image
from medseg.structures import DEFAULT_LABELS, SCR_STRUCTURES, label_masks

OPTS = ReadOptions(pixel_spacing_mm=1.0)
ERMF_SOURCE = "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
SID_SOURCE = "ImagerPixelSpacing x DistanceSourceToPatient / DistanceSourceToDetector"
DETECTOR_SOURCE = "ImagerPixelSpacing (detector plane)"
MEDSEG = [sys.executable, "-m", "medseg"]


def _dx(path: Path, pixels: np.ndarray | None = None, *, pixel_spacing=None, imager=(0.84, 0.84),
        **elements) -> Path:
    """A DX (for presentation) file; ``elements`` are extra DICOM keywords."""
    return make_dicom(
        path,
        synthetic_image(16, 12) if pixels is None else pixels,
        pixel_spacing=pixel_spacing,
        imager_pixel_spacing=imager,
        modality="DX",
        sop_class=DigitalXRayImageStorageForPresentation,
        extra_elements=elements,
    )


def _read(path: Path, options: ReadOptions = OPTS) -> IngestedImage:
    image = read_dicom(path, options)
    assert image.spacing_source in SPACING_SOURCES
    assert image.spacing_plane in SPACING_PLANES
    return image


# --------------------------------------------------------------------------- the spacing rule


def test_magnification_factor_corrects_imager_pixel_spacing(tmp_path):
    image = _read(_dx(tmp_path / "ermf.dcm", EstimatedRadiographicMagnificationFactor="1.2"))
    assert image.spacing_mm == pytest.approx((0.7, 0.7))
    assert (image.spacing_source, image.spacing_plane) == (ERMF_SOURCE, "patient")


def test_source_distances_correct_imager_pixel_spacing(tmp_path):
    image = _read(_dx(tmp_path / "sid.dcm", DistanceSourceToDetector="1800", DistanceSourceToPatient="1500"))
    assert image.spacing_mm == pytest.approx((0.7, 0.7))
    assert (image.spacing_source, image.spacing_plane) == (SID_SOURCE, "patient")


def test_magnification_factor_before_distances_and_per_axis(tmp_path):
    # ERMF 1.2 is used, not 1800 / 1000 = 1.8; row and column corrected alike.
    image = _read(_dx(tmp_path / "both.dcm", imager=(0.84, 0.96), EstimatedRadiographicMagnificationFactor="1.2",
                      DistanceSourceToDetector="1800", DistanceSourceToPatient="1000"))
    assert image.spacing_mm == pytest.approx((0.7, 0.8))
    assert image.spacing_source == ERMF_SOURCE


@pytest.mark.parametrize("calibration", ["GEOMETRY", "FIDUCIAL"])
def test_calibrated_pixel_spacing_wins(tmp_path, calibration):
    image = _read(_dx(tmp_path / "cal.dcm", pixel_spacing=(0.65, 0.66), PixelSpacingCalibrationType=calibration,
                      PixelSpacingCalibrationDescription="test", EstimatedRadiographicMagnificationFactor="1.2"))
    assert image.spacing_mm == pytest.approx((0.65, 0.66))
    assert (image.spacing_source, image.spacing_plane) == (f"PixelSpacing ({calibration})", "patient")


def test_calibration_type_trusted_even_when_equal_to_imager_spacing(tmp_path):
    image = _read(_dx(tmp_path / "geo.dcm", pixel_spacing=(0.84, 0.84), PixelSpacingCalibrationType="GEOMETRY",
                      EstimatedRadiographicMagnificationFactor="1.2"))
    assert image.spacing_mm == pytest.approx((0.84, 0.84))
    assert image.spacing_plane == "patient"


def test_pixel_spacing_different_from_imager_spacing_is_calibrated(tmp_path):
    # PS3.3 10.7.1.1: different values mean corrected or calibrated.
    image = _read(_dx(tmp_path / "diff.dcm", pixel_spacing=(0.7, 0.7), EstimatedRadiographicMagnificationFactor="1.5"))
    assert image.spacing_mm == pytest.approx((0.7, 0.7))
    assert (image.spacing_source, image.spacing_plane) == ("PixelSpacing", "patient")


def test_pixel_spacing_alone_has_unknown_plane(tmp_path):
    # PS3.3 10.7.1.1: no calibration type and nothing to compare with.
    image = _read(make_dicom(tmp_path / "ps.dcm", synthetic_image(8, 8), pixel_spacing=(0.2, 0.2)))
    assert image.spacing_mm == pytest.approx((0.2, 0.2))
    assert (image.spacing_source, image.spacing_plane) == ("PixelSpacing", "unknown")


def test_pixel_spacing_equal_to_imager_spacing_is_not_calibrated(tmp_path):
    # PS3.3 10.7.1.1: equal values without a calibration type = not corrected,
    # so the magnification factor still applies ...
    corrected = _read(_dx(tmp_path / "eq.dcm", pixel_spacing=(0.84, 0.84),
                          EstimatedRadiographicMagnificationFactor="1.2"))
    assert corrected.spacing_mm == pytest.approx((0.7, 0.7))
    assert (corrected.spacing_source, corrected.spacing_plane) == (ERMF_SOURCE, "patient")
    assert "not calibrated" in corrected.extra["spacing_note"]
    # ... and without one the millimetres are at the detector.
    plain = _read(_dx(tmp_path / "eq2.dcm", pixel_spacing=(0.84, 0.84)))
    assert plain.spacing_mm == pytest.approx((0.84, 0.84))
    assert (plain.spacing_source, plain.spacing_plane) == (DETECTOR_SOURCE, "detector")


def test_unknown_calibration_type_is_ignored_with_a_note(tmp_path):
    image = _read(_dx(tmp_path / "foo.dcm", pixel_spacing=(0.84, 0.84), PixelSpacingCalibrationType="GUESS"))
    assert (image.spacing_source, image.spacing_plane) == (DETECTOR_SOURCE, "detector")
    assert "GUESS" in image.extra["spacing_note"]


def test_imager_pixel_spacing_alone_is_detector_plane(tmp_path):
    image = _read(_dx(tmp_path / "ips.dcm"))
    assert image.spacing_mm == pytest.approx((0.84, 0.84))
    assert (image.spacing_source, image.spacing_plane) == (DETECTOR_SOURCE, "detector")
    assert "spacing_note" not in image.extra


def test_nominal_scanned_pixel_spacing_is_detector_plane(tmp_path):
    path = make_dicom(tmp_path / "sc.dcm", synthetic_image(8, 8), pixel_spacing=None,
                      extra_elements={"NominalScannedPixelSpacing": ["0.175", "0.175"]})
    image = _read(path)
    assert image.spacing_mm == pytest.approx((0.175, 0.175))
    assert (image.spacing_source, image.spacing_plane) == ("NominalScannedPixelSpacing (detector plane)", "detector")


def test_no_spacing_gives_the_configured_default(tmp_path):
    image = _read(_dx(tmp_path / "none.dcm", imager=None), ReadOptions(pixel_spacing_mm=0.5))
    assert image.spacing_mm == (0.5, 0.5)
    assert (image.spacing_source, image.spacing_plane) == ("given", "default")


def test_spacing_source_tells_file_given_and_assumed_apart(tmp_path):
    """Where a scan's millimetres come from: the file's metadata, the user
    (--pixel-spacing / ReadOptions.pixel_spacing_mm) or nobody (1.0 mm
    assumed). Before, a PNG said "config" whether or not a spacing was given,
    and a DICOM file without spacing "default" either way."""
    png = tmp_path / "x.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(png)
    bare = _dx(tmp_path / "none.dcm", imager=None)
    with_spacing = _dx(tmp_path / "dx.dcm")
    for path in (png, bare):
        assumed = load_image(path, ReadOptions())
        assert (assumed.spacing_mm, assumed.spacing_source, assumed.spacing_plane) == ((1.0, 1.0), "assumed",
                                                                                       "default"), path
        given = load_image(path, ReadOptions(pixel_spacing_mm=0.35))
        assert (given.spacing_mm, given.spacing_source, given.spacing_plane) == ((0.35, 0.35), "given",
                                                                                 "default"), path
    for options in (ReadOptions(), ReadOptions(pixel_spacing_mm=0.35)):  # the file's own wins either way
        image = load_image(with_spacing, options)
        assert (image.spacing_mm, image.spacing_source) == ((0.84, 0.84), DETECTOR_SOURCE)
    assert {"given", "assumed"} <= set(SPACING_SOURCES)
    # prediction.json files of earlier versions keep their plane.
    assert {plane_of_source(s) for s in ("given", "assumed", "config", "default")} == {"default"}


def test_ingest_warns_once_when_the_spacing_was_assumed(tmp_path, capsys, caplog):
    """`medseg ingest` of two PNGs without --pixel-spacing: one warning for
    the batch naming how many and what to give; none with --pixel-spacing."""
    import logging

    from medseg.cli import main

    for name in ("a.png", "b.png"):
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / name)
    with caplog.at_level(logging.INFO, logger="medseg"):
        assert main(["ingest", str(tmp_path)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["spacing_source"] for r in records] == ["assumed", "assumed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "2 of 2 inputs had no pixel spacing" in warnings[0] and "1.0 mm was assumed" in warnings[0]
    assert "--pixel-spacing MM" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medseg"):
        assert main(["ingest", str(tmp_path), "--pixel-spacing", "0.35"]) == 0
    assert [json.loads(line)["spacing_source"] for line in capsys.readouterr().out.splitlines()] == ["given"] * 2
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_size_flag_of_an_assumed_spacing_says_so():
    """A chest film of 0.175 mm pixels read at the assumed 1.0 mm: its
    thorax is 6 times too wide, so it is flagged not_frontal_chest, and the
    reasons say the spacing was assumed and how to give it. From the file's
    metadata, no such hint; given by the user, a hint to check it."""
    from medseg.inference.plausibility import NOT_FRONTAL_CHEST, check_anatomy, reading_hints

    _, structures = render_phantom(3, (1536, 1280))  # 1280 px: 224 mm at 0.175 mm, 1280 mm at 1.0 mm
    masks = label_masks(structures, DEFAULT_LABELS)
    assert check_anatomy(masks, (0.175, 0.175)).flags == []
    check = check_anatomy(masks, (1.0, 1.0))
    assert check.flags == [NOT_FRONTAL_CHEST] and check.size_reasons
    assert all("mm" in r for r in check.size_reasons)
    assumed = reading_hints(check, source_format="raster", spacing_source="assumed", spacing_mm=(1.0, 1.0),
                            polarity=0.2)
    assert any("pixel spacing assumed" in h and "--pixel-spacing MM" in h for h in assumed), assumed
    given = reading_hints(check, source_format="raster", spacing_source="given", spacing_mm=(1.0, 1.0),
                          polarity=0.2)
    assert any("as given" in h for h in given) and not any("assumed" in h for h in given), given
    from_file = reading_hints(check, source_format="dicom", spacing_source=DETECTOR_SOURCE, spacing_mm=(1.0, 1.0))
    assert from_file == []
    assert reading_hints(check_anatomy(masks, (0.175, 0.175)), source_format="raster", spacing_source="assumed",
                         spacing_mm=(0.175, 0.175)) == []  # no flag, no hint


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("ermf", ["0.8", "0", "-1.2", "nan", "inf"])
def test_invalid_magnification_factor_falls_back_to_detector_plane(tmp_path, ermf):
    image = _read(_dx(tmp_path / "bad.dcm", EstimatedRadiographicMagnificationFactor=ermf))
    assert image.spacing_mm == pytest.approx((0.84, 0.84))
    assert (image.spacing_source, image.spacing_plane) == (DETECTOR_SOURCE, "detector")
    assert "Estimated Radiographic Magnification Factor" in image.extra["spacing_note"]


def test_invalid_magnification_factor_then_distances(tmp_path):
    image = _read(_dx(tmp_path / "bad.dcm", EstimatedRadiographicMagnificationFactor="0.5",
                      DistanceSourceToDetector="1800", DistanceSourceToPatient="1500"))
    assert image.spacing_mm == pytest.approx((0.7, 0.7))
    assert image.spacing_source == SID_SOURCE
    assert "0.5" in image.extra["spacing_note"]


@pytest.mark.parametrize("sid, sod", [("1000", "1500"), ("1800", "0"), ("-1800", "-1500")])
def test_impossible_distances_fall_back_to_detector_plane(tmp_path, sid, sod):
    image = _read(_dx(tmp_path / "bad.dcm", DistanceSourceToDetector=sid, DistanceSourceToPatient=sod))
    assert image.spacing_mm == pytest.approx((0.84, 0.84))
    assert image.spacing_plane == "detector"
    assert "Distance Source to Detector" in image.extra["spacing_note"]


def test_one_distance_alone_is_not_enough(tmp_path):
    image = _read(_dx(tmp_path / "sid.dcm", DistanceSourceToDetector="1800"))
    assert image.spacing_mm == pytest.approx((0.84, 0.84))
    assert image.spacing_plane == "detector"


def test_planes_of_other_readers(tmp_path):
    # Raster files use the configured spacing; JSRT's is the film digitiser's.
    png = tmp_path / "x.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(png)
    raster = load_image(png, ReadOptions(pixel_spacing_mm=0.35))
    assert raster.spacing_plane == "default"
    jsrt = IngestedImage(np.zeros((4, 4), np.float32), (0.175, 0.175), "JSRT", "x.IMG", "jsrt", "", "x")
    assert jsrt.spacing_plane == "detector"
    assert plane_of_source(ERMF_SOURCE) == plane_of_source(SID_SOURCE) == "patient"
    assert plane_of_source("PixelSpacing (FIDUCIAL)") == "patient"
    assert plane_of_source(DETECTOR_SOURCE) == "detector"
    assert plane_of_source("PixelSpacing") == "unknown"
    with pytest.raises(ValueError, match="spacing_plane"):
        IngestedImage(np.zeros((4, 4), np.float32), (1.0, 1.0), "x", "x", "x", "", "x", spacing_plane="film")


# --------------------------------------------------------------------------- mm widths and areas


def _phantom(seed: int = 3, shape=(160, 128)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    image, structures = render_phantom(seed, shape)
    stored = np.round(image * 4095).astype(np.uint16)
    return stored, label_masks(structures, DEFAULT_LABELS)


def test_mm_widths_and_areas_of_a_magnified_dx(tmp_path):
    """The issue's case: 0.84 mm detector pixels, magnification 1.2. Widths
    must come out in 0.7 mm pixels (not 20 % larger) and areas in 0.49 mm²
    pixels (not 44 % larger)."""
    stored, masks = _phantom()
    heart, lungs = masks["heart"], masks["lungs"]
    # Expected widths in pixels, by the definitions of medseg.inference.ctr:
    # heart: overall column extent; thorax: widest single lung row.
    heart_cols = np.flatnonzero(heart.any(axis=0))
    heart_px = int(heart_cols[-1] - heart_cols[0] + 1)
    thorax_px = max(int(np.flatnonzero(r)[-1] - np.flatnonzero(r)[0] + 1) for r in lungs if r.any())
    files = {
        "ermf": _dx(tmp_path / "ermf.dcm", stored, EstimatedRadiographicMagnificationFactor="1.2"),
        "distances": _dx(tmp_path / "sid.dcm", stored, DistanceSourceToDetector="1800",
                         DistanceSourceToPatient="1500"),
    }
    for name, path in files.items():
        image = read_dicom(path, OPTS)
        assert image.shape == heart.shape
        ctr = cardiothoracic_ratio(heart, lungs, image.spacing_mm)
        assert ctr.heart_width_mm == pytest.approx(heart_px * 0.7), name
        assert ctr.thoracic_width_mm == pytest.approx(thorax_px * 0.7), name
        area = lungs.sum() * image.spacing_mm[0] * image.spacing_mm[1]
        assert area == pytest.approx(int(lungs.sum()) * 0.49), name

    detector = read_dicom(_dx(tmp_path / "det.dcm", stored), OPTS)
    at_detector = cardiothoracic_ratio(heart, lungs, detector.spacing_mm)
    at_patient = cardiothoracic_ratio(heart, lungs, read_dicom(files["ermf"], OPTS).spacing_mm)
    assert at_detector.heart_width_mm / at_patient.heart_width_mm == pytest.approx(1.2)
    assert at_detector.ctr == pytest.approx(at_patient.ctr)  # a ratio: unchanged
    assert detector.spacing_mm[0] * detector.spacing_mm[1] / 0.49 == pytest.approx(1.44)


@pytest.mark.slow
def test_predict_reports_patient_plane_millimetres(model_and_scans, tmp_path):
    """``medseg predict`` on the same pixels as a magnified DX (ERMF 1.2) and
    as a bare detector-plane DX: results.csv has the spacing, its source and
    plane, and areas / widths in 0.7 mm resp. 0.84 mm pixels.
    ``model_and_scans`` (conftest.py): the shared phantom-trained model."""
    checkpoint, _ = model_and_scans
    stored, _ = _phantom(seed=11)
    scans = tmp_path / "scans"
    _dx(scans / "MAGNIFIED.dcm", stored, EstimatedRadiographicMagnificationFactor="1.2")
    _dx(scans / "DETECTOR.dcm", stored)
    out = tmp_path / "out"
    proc = subprocess.run([*MEDSEG, "predict", str(scans), "--model", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv").set_index("case_id")
    expected = {"MAGNIFIED": (0.7, ERMF_SOURCE, "patient"), "DETECTOR": (0.84, DETECTOR_SOURCE, "detector")}
    for case, (spacing, source, plane) in expected.items():
        row = table.loc[case]
        assert row.spacing_row_mm == pytest.approx(spacing) and row.spacing_col_mm == pytest.approx(spacing)
        assert (row.spacing_source, row.spacing_plane) == (source, plane)
        masks = {}
        for label in DEFAULT_LABELS:
            with Image.open(out / case / "masks" / f"{label}.png") as png:
                masks[label] = np.asarray(png) > 0
            # results.csv gives areas to 0.1 mm².
            assert row[f"area_mm2_{label}"] == pytest.approx(int(masks[label].sum()) * spacing**2, abs=0.05), label
        ctr = cardiothoracic_ratio(masks["heart"], masks["lungs"], (spacing, spacing))
        for column, value in (("heart_width_mm", ctr.heart_width_mm), ("thoracic_width_mm", ctr.thoracic_width_mm)):
            if math.isnan(value):
                assert math.isnan(row[column])
            else:
                assert row[column] == pytest.approx(value, abs=0.05)  # to 0.1 mm
        meta = json.loads((out / case / "prediction.json").read_text())
        assert meta["spacing_plane"] == plane and meta["spacing_mm"] == pytest.approx([spacing, spacing])
    # Same pixels, same masks: the detector-plane areas are 1.2² = 1.44 x larger.
    lungs = table["area_mm2_lungs"]
    assert lungs["MAGNIFIED"] > 0
    assert lungs["DETECTOR"] / lungs["MAGNIFIED"] == pytest.approx(1.44, rel=1e-3)  # of areas rounded to 0.1 mm²
    heart = table["heart_width_mm"]
    assert heart["DETECTOR"] / heart["MAGNIFIED"] == pytest.approx(1.2, rel=2e-3)  # of widths rounded to 0.1 mm


# --------------------------------------------------------------------------- pixel padding


def _padded(anatomy: np.ndarray, border: int, value) -> np.ndarray:
    """``anatomy`` inside a ``border``-pixel frame of ``value`` (a number or an array)."""
    h, w = anatomy.shape
    out = np.empty((h + 2 * border, w + 2 * border), dtype=anatomy.dtype)
    out[...] = value
    out[border:border + h, border:border + w] = anatomy
    return out


def _anatomy() -> np.ndarray:
    """Stored values 200..4000: never equal to the padding values used."""
    stored, _ = _phantom(seed=7, shape=(64, 48))
    return (200 + np.round(stored.astype(np.float64) * (3800 / 4095))).astype(np.uint16)


def _inner(array: np.ndarray, border: int) -> np.ndarray:
    return array[border:-border, border:-border]


def test_padding_value_left_out_of_the_percentiles(tmp_path):
    anatomy, border = _anatomy(), 12  # border: ~55 % of the pixels
    expected = normalise_intensity(anatomy.astype(np.float32))
    image = read_dicom(make_dicom(tmp_path / "pad.dcm", _padded(anatomy, border, 0),
                                  extra_elements={"PixelPaddingValue": 0}), OPTS)
    assert image.padding is not None and image.padding.dtype == bool and image.padding.shape == image.shape
    assert image.padding.sum() == image.pixels.size - anatomy.size
    assert not _inner(image.padding, border).any()
    assert image.extra["padding_pixels"] == image.pixels.size - anatomy.size

    _, normalised, _ = canonical_image(image, 64)
    np.testing.assert_allclose(_inner(normalised, border), expected, atol=1e-6)
    assert not normalised[image.padding].any()
    # Without the mask the border drags the lower percentile down to 0.
    unmasked = normalise_intensity(image.pixels)
    assert not np.allclose(_inner(unmasked, border), expected, atol=1e-3)


def test_padding_range_limit(tmp_path):
    anatomy, border = _anatomy(), 10
    noise = np.random.default_rng(0).integers(0, 151, size=_padded(anatomy, border, 0).shape).astype(np.uint16)
    stored = _padded(anatomy, border, 0)
    frame = np.ones(stored.shape, dtype=bool)
    frame[border:-border, border:-border] = False
    stored[frame] = noise[frame]  # background noise 0..150, all padding
    image = read_dicom(make_dicom(tmp_path / "range.dcm", stored,
                                  extra_elements={"PixelPaddingValue": 0, "PixelPaddingRangeLimit": 150}), OPTS)
    np.testing.assert_array_equal(image.padding, frame)
    _, normalised, _ = canonical_image(image, 64)
    np.testing.assert_allclose(_inner(normalised, border), normalise_intensity(anatomy.astype(np.float32)),
                               atol=1e-6)
    assert not normalised[frame].any()


def test_padding_in_monochrome1_and_with_rescale(tmp_path):
    """Padding is matched on stored values: before the Modality LUT and
    whatever the MONOCHROME1 inversion does to the values."""
    anatomy, border = _anatomy(), 8
    expected = normalise_intensity(anatomy.astype(np.float32))
    # MONOCHROME1: bright = low stored value; pad with the maximum (black),
    # the range limit below the value as PS3.3 C.7.5.1.1.2 asks for MONO1.
    mono1 = _padded((4095 - anatomy).astype(np.uint16), border, 4095)
    image = read_dicom(make_dicom(tmp_path / "m1.dcm", mono1, photometric="MONOCHROME1",
                                  extra_elements={"PixelPaddingValue": 4095, "PixelPaddingRangeLimit": 4000}), OPTS)
    assert image.photometric == "MONOCHROME1 (inverted)"
    assert not _inner(image.padding, border).any() and image.padding.sum() == mono1.size - anatomy.size
    _, normalised, _ = canonical_image(image, 64)
    np.testing.assert_allclose(_inner(normalised, border), expected, atol=1e-6)
    assert not normalised[image.padding].any()
    # Rescale intercept -1024: padding stored 0 is -1024 after the Modality
    # LUT; it must still be found by its stored value.
    rescaled = read_dicom(make_dicom(tmp_path / "rs.dcm", _padded(anatomy, border, 0), rescale=(1.0, -1024.0),
                                     extra_elements={"PixelPaddingValue": 0}), OPTS)
    assert rescaled.padding.sum() == mono1.size - anatomy.size
    np.testing.assert_allclose(_inner(canonical_image(rescaled, 64)[1], border), expected, atol=1e-6)


def test_padding_absent_or_matching_nothing_gives_no_mask(tmp_path):
    anatomy = _anatomy()
    assert read_dicom(make_dicom(tmp_path / "a.dcm", anatomy), OPTS).padding is None
    unused = read_dicom(make_dicom(tmp_path / "b.dcm", anatomy, extra_elements={"PixelPaddingValue": 0}), OPTS)
    assert unused.padding is None
    everything = read_dicom(make_dicom(tmp_path / "c.dcm", np.full((8, 8), 5, np.uint16),
                                       extra_elements={"PixelPaddingValue": 5}), OPTS)
    assert everything.padding is None and "every pixel" in everything.extra["padding_note"]


def test_normalise_intensity_valid_mask():
    pixels = np.arange(100, dtype=np.float32).reshape(10, 10)
    valid = np.zeros((10, 10), dtype=bool)
    valid[2:8, 2:8] = True
    out = normalise_intensity(pixels, 0.0, 100.0, valid=valid)
    inner = pixels[2:8, 2:8]
    np.testing.assert_allclose(out[2:8, 2:8], (inner - inner.min()) / (inner.max() - inner.min()), atol=1e-6)
    assert not out[~valid].any()
    assert not normalise_intensity(pixels, valid=np.zeros((10, 10), bool)).any()
    with pytest.raises(ValueError, match="valid mask"):
        normalise_intensity(pixels, valid=np.ones((3, 3), bool))


# --------------------------------------------------------------------------- evaluation


def _prediction(pred_dir: Path, case_id: str, masks: dict[str, np.ndarray], spacing: float, source: str,
                plane: str | None) -> None:
    case = pred_dir / case_id
    case.mkdir(parents=True)
    names = list(masks)
    save_nifti_2d(case / "labels.nii.gz", np.stack([masks[n] for n in names], axis=-1).astype(np.uint8),
                  (spacing, spacing))
    meta = {"case_id": case_id, "labels": names, "source": f"/data/{case_id}.dcm", "spacing_mm": [spacing, spacing],
            "spacing_source": source, "original_shape": list(next(iter(masks.values())).shape)}
    if plane is not None:
        meta["spacing_plane"] = plane
    (case / "prediction.json").write_text(json.dumps(meta))


def test_evaluation_says_which_millimetres_are_not_at_the_patient(tmp_path):
    _, structures = render_phantom(2, (48, 48))
    truth_root, pred_dir = tmp_path / "truth", tmp_path / "pred"
    for name in SCR_STRUCTURES:
        (truth_root / name).mkdir(parents=True)
    cases = {
        "PATIENT": (0.7, ERMF_SOURCE, "patient"),
        "DETECTOR": (0.84, DETECTOR_SOURCE, "detector"),
        "LEGACY": (0.84, DETECTOR_SOURCE, None),  # prediction.json from before spacing_plane
        "DEFAULT": (1.0, "default", "default"),
    }
    for case_id, (spacing, source, plane) in cases.items():
        for name in SCR_STRUCTURES:
            Image.fromarray(structures[name].astype(np.uint8) * 255).save(truth_root / name / f"{case_id}.gif")
        _prediction(pred_dir, case_id, label_masks(structures, DEFAULT_LABELS), spacing, source, plane)

    provenance = spacing_provenance(pred_dir).set_index("case_id")
    assert provenance.loc["LEGACY", "spacing_plane"] == "detector"
    note = spacing_note(provenance.reset_index())
    assert note == ("HD95/ASSD in mm: 2 of 4 cases use detector-plane spacing (magnification not corrected: "
                    "distances too large by the magnification factor, typically 5-20 %); 1 uses the configured "
                    "default spacing (1 mm), not read from the image.")

    table, problems = evaluate_predictions(pred_dir, truth_root, DEFAULT_LABELS)
    assert not problems
    summary = summarise(table)
    out = tmp_path / "eval"
    write_evaluation(out, table, summary, problems, pred_dir=pred_dir, truth_root=truth_root)
    assert note in (out / "summary.txt").read_text()
    written = pd.read_csv(out / "summary.csv", index_col="label")
    for label in DEFAULT_LABELS:
        counts = written.loc[label, ["n_spacing_patient", "n_spacing_detector", "n_spacing_unknown",
                                     "n_spacing_default"]].tolist()
        assert counts == [1, 2, 0, 1]
    per_case = pd.read_csv(out / "cases.csv")
    assert len(per_case) == len(table)
    assert dict(zip(per_case.case_id, per_case.spacing_plane)) == {
        "PATIENT": "patient", "DETECTOR": "detector", "LEGACY": "detector", "DEFAULT": "default"}
    # Without the prediction folder the files are as before.
    plain = tmp_path / "plain"
    write_evaluation(plain, table, summary, problems)
    assert "HD95/ASSD in mm" not in (plain / "summary.txt").read_text()
    assert "n_spacing_detector" not in pd.read_csv(plain / "summary.csv").columns


def test_spacing_note_all_patient_plane():
    provenance = pd.DataFrame({"case_id": ["a", "b"], "spacing_source": [ERMF_SOURCE, "PixelSpacing (GEOMETRY)"],
                               "spacing_plane": ["patient", "patient"], "spacing_row_mm": [0.7, 0.6],
                               "spacing_col_mm": [0.7, 0.6]})
    assert spacing_note(provenance) == ("HD95/ASSD in mm: all 2 cases at the patient plane "
                                        "(spacing calibrated or magnification-corrected).")
    assert spacing_note(provenance.iloc[:0]) == ""
