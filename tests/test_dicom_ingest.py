"""Tests for medseg.ingest.dicom.read_dicom.

Synthetic files come from tests/dicom_factory.py; one real legacy CR file
(ACR-NEMA style, MONOCHROME1, no preamble) comes from the shared data folder
when it is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

from conftest import shared_data_dir
from dicom_factory import (
    COMPRESSED_SYNTAXES,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    make_color,
    make_dicom,
    make_multiframe,
    make_sr,
    synthetic_image,
)
from requirements_switch import import_or_skip_or_fail, skip_or_fail
from medseg.errors import InputError
from medseg.ingest import load_image
from medseg.ingest.dicom import read_dicom
from medseg.ingest.types import ReadOptions

OPTS = ReadOptions()


def _shared_cr_path() -> Path:
    """The real CR file: $MEDSEG_SHARED_DATA/dicom/... or <repo>/../shared/data/..."""
    return shared_data_dir() / "dicom" / "CR-MONO1-10-chest.dcm"


@pytest.fixture(scope="module")
def real_cr() -> Path:
    path = _shared_cr_path()
    if not path.is_file():
        skip_or_fail(f"shared CR file not available at {path}")
    return path


# --------------------------------------------------------------------------
# Real legacy CR file
# --------------------------------------------------------------------------


def test_real_cr_reads_as_display_polarity(real_cr: Path) -> None:
    result = read_dicom(real_cr, ReadOptions(pixel_spacing_mm=0.35))

    assert result.pixels.shape == (440, 440)
    assert result.pixels.dtype == np.float32
    assert result.spacing_mm == (0.35, 0.35)
    assert result.spacing_source == "given"  # by the caller: the file has none
    assert result.source_format == "dicom"
    assert result.photometric == "MONOCHROME1 (inverted)"
    assert Path(result.source).name == "CR-MONO1-10-chest.dcm"
    assert result.extra["transfer_syntax"] == ImplicitVRLittleEndian
    assert result.extra["transfer_syntax_inferred"] is True
    assert result.extra["bits_stored"] == 10
    assert result.extra["modality"] == "CR"
    assert result.extra["voi"].startswith("window")  # the file has 550/1024

    # Polarity: the mediastinum / spine column in the middle of a PA chest
    # film must be brighter than the lung fields on either side. Stored
    # MONOCHROME1 values are the other way round.
    px = result.pixels
    value_range = float(px.max() - px.min())
    spine = px[60:250, 205:235].mean()
    right_lung = px[80:200, 70:140].mean()  # image left
    left_lung = px[80:200, 290:360].mean()  # image right
    assert spine - right_lung > 0.15 * value_range
    assert spine - left_lung > 0.15 * value_range


def test_real_cr_leaks_no_patient_fields(real_cr: Path) -> None:
    ds = pydicom.dcmread(real_cr, force=True)
    identifying = [
        str(ds.get(k, "")).strip()
        for k in ("PatientName", "PatientID", "PatientBirthDate")
    ]
    identifying = [v for v in identifying if len(v) >= 3]
    assert identifying, "expected the real file to carry a patient name"
    text = repr(read_dicom(real_cr, OPTS))
    for value in identifying:
        assert value not in text


# --------------------------------------------------------------------------
# Grayscale pipeline on synthetic files
# --------------------------------------------------------------------------


def test_monochrome2_is_stored_values(tmp_path: Path) -> None:
    stored = synthetic_image(40, 30)
    result = read_dicom(make_dicom(tmp_path / "m2.dcm", stored), OPTS)
    assert result.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(result.pixels, stored.astype(np.float32))


def test_monochrome1_is_inverted_monochrome2(tmp_path: Path) -> None:
    stored = synthetic_image(40, 30)
    m1 = read_dicom(make_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"), OPTS)
    m2 = read_dicom(make_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2"), OPTS)
    assert m1.photometric == "MONOCHROME1 (inverted)"
    lo, hi = float(stored.min()), float(stored.max())
    np.testing.assert_array_equal(m1.pixels, (lo + hi) - m2.pixels)
    # The brightest stored pixel is the darkest displayed one.
    assert m1.pixels.flat[np.argmax(stored)] == m1.pixels.min()


def test_rescale_slope_intercept_applied(tmp_path: Path) -> None:
    stored = synthetic_image(20, 20)
    path = make_dicom(tmp_path / "rescale.dcm", stored, rescale=(2.0, -1024.0))
    result = read_dicom(path, OPTS)
    np.testing.assert_allclose(result.pixels, stored * 2.0 - 1024.0)


def test_modality_lut_sequence_applied(tmp_path: Path) -> None:
    stored = synthetic_image(20, 20, bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    # LUT Data is US-or-OW; say US so pydicom can write the list.
    item.add_new("LUTData", "US", [4095 - i for i in range(4096)])  # reversing LUT
    path = make_dicom(
        tmp_path / "mlut.dcm", stored, extra_elements={"ModalityLUTSequence": [item]}
    )
    result = read_dicom(path, OPTS)
    np.testing.assert_array_equal(result.pixels, 4095.0 - stored)


def test_window_applied_and_can_be_disabled(tmp_path: Path) -> None:
    stored = synthetic_image(64, 48, bits_stored=12)
    path = make_dicom(tmp_path / "win.dcm", stored, window=(2048, 1024))

    windowed = read_dicom(path, OPTS).pixels
    # Linear window (PS3.3 C.11.2.1.2): below the window -> 0, above -> 4095.
    assert np.all(windowed[stored <= 1535] == 0.0)
    assert np.all(windowed[stored > 2560] == 4095.0)
    inside = (stored > 1536) & (stored < 2560)
    assert inside.any()
    assert np.all(np.diff(windowed[inside][np.argsort(stored[inside])]) >= 0)
    assert not np.array_equal(windowed, stored.astype(np.float32))

    raw = read_dicom(path, ReadOptions(apply_voi=False))
    np.testing.assert_array_equal(raw.pixels, stored.astype(np.float32))
    assert raw.extra["voi"].startswith("not applied")


@pytest.mark.parametrize("bits_stored", [10, 12, 16])
def test_bits_stored(tmp_path: Path, bits_stored: int) -> None:
    stored = synthetic_image(32, 24, bits_stored=bits_stored)
    assert int(stored.max()) == 2**bits_stored - 1  # uses the full range
    path = make_dicom(tmp_path / f"b{bits_stored}.dcm", stored, bits_stored=bits_stored)
    result = read_dicom(path, OPTS)
    np.testing.assert_array_equal(result.pixels, stored.astype(np.float32))
    assert result.extra["bits_stored"] == bits_stored


def test_signed_pixel_representation(tmp_path: Path) -> None:
    stored = synthetic_image(32, 24, bits_stored=12, signed=True)
    assert stored.min() < 0
    result = read_dicom(make_dicom(tmp_path / "signed.dcm", stored, bits_stored=12), OPTS)
    np.testing.assert_array_equal(result.pixels, stored.astype(np.float32))
    assert result.extra["pixel_representation"] == 1


def test_non_square_keeps_shape_and_orientation(tmp_path: Path) -> None:
    stored = synthetic_image(300, 200)
    result = read_dicom(make_dicom(tmp_path / "tall.dcm", stored), OPTS)
    assert result.shape == (300, 200)
    np.testing.assert_array_equal(result.pixels, stored.astype(np.float32))


def test_pixel_spacing_wins_over_imager_pixel_spacing(tmp_path: Path) -> None:
    path = make_dicom(
        tmp_path / "both.dcm",
        synthetic_image(8, 8),
        pixel_spacing=(0.143, 0.15),
        imager_pixel_spacing=(0.2, 0.25),
    )
    result = read_dicom(path, OPTS)
    assert result.spacing_mm == pytest.approx((0.143, 0.15))
    assert result.spacing_source == "PixelSpacing"


def test_imager_pixel_spacing_used_without_pixel_spacing(tmp_path: Path) -> None:
    path = make_dicom(
        tmp_path / "imager.dcm",
        synthetic_image(8, 8),
        pixel_spacing=None,
        imager_pixel_spacing=(0.2, 0.25),
    )
    result = read_dicom(path, OPTS)
    assert result.spacing_mm == pytest.approx((0.2, 0.25))
    # No magnification factor: at the detector (tests/test_spacing.py has the rest).
    assert result.spacing_source == "ImagerPixelSpacing (detector plane)"
    assert result.spacing_plane == "detector"


def test_default_spacing_without_spacing_elements(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "none.dcm", synthetic_image(8, 8), pixel_spacing=None)
    result = read_dicom(path, ReadOptions(pixel_spacing_mm=0.7))
    assert result.spacing_mm == (0.7, 0.7)
    assert result.spacing_source == "given"
    assumed = read_dicom(path, ReadOptions())
    assert (assumed.spacing_mm, assumed.spacing_source) == ((1.0, 1.0), "assumed")


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_file_without_preamble_or_file_meta(tmp_path: Path, syntax: str) -> None:
    stored = synthetic_image(30, 20)
    path = make_dicom(tmp_path / "IM0001", stored, transfer_syntax=syntax, preamble=False)
    raw = path.read_bytes()
    assert raw[128:132] != b"DICM" and b"\x02\x00\x10\x00" not in raw[:200]
    result = read_dicom(path, OPTS)
    np.testing.assert_array_equal(result.pixels, stored.astype(np.float32))
    assert result.extra["transfer_syntax"] == syntax
    assert result.extra["transfer_syntax_inferred"] is True
    assert Path(result.source).name == "IM0001"


def test_load_image_dispatches_extensionless_file_to_dicom(tmp_path: Path) -> None:
    stored = synthetic_image(16, 12)
    result = load_image(make_dicom(tmp_path / "IM0002", stored))
    assert result.source_format == "dicom"
    np.testing.assert_array_equal(result.pixels, stored.astype(np.float32))


# --------------------------------------------------------------------------
# Compressed transfer syntaxes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", COMPRESSED_SYNTAXES, ids=lambda uid: uid.keyword)
def test_compressed_matches_uncompressed(tmp_path: Path, syntax) -> None:
    if syntax in (JPEGLossless, JPEGLosslessSV1):
        import_or_skip_or_fail("imagecodecs")  # the factory's JPEG Lossless encoder
    stored = synthetic_image(60, 44, bits_stored=12)
    plain = read_dicom(make_dicom(tmp_path / "plain.dcm", stored), OPTS)
    packed = read_dicom(
        make_dicom(tmp_path / "packed.dcm", stored, transfer_syntax=syntax), OPTS
    )
    assert packed.extra["transfer_syntax"] == syntax
    np.testing.assert_array_equal(packed.pixels, plain.pixels)


def test_missing_decoder_names_the_package(tmp_path: Path, monkeypatch) -> None:
    path = make_dicom(
        tmp_path / "j2k.dcm", synthetic_image(64, 64), transfer_syntax=JPEG2000Lossless
    )

    class NoPlugins:
        is_available = False

    monkeypatch.setattr("medseg.ingest.dicom.get_decoder", lambda uid: NoPlugins())
    with pytest.raises(InputError) as info:
        read_dicom(path, OPTS)
    assert "pylibjpeg-openjpeg" in str(info.value)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def _text_file(path: Path) -> Path:
    path.write_text("patient notes\nthis is not an image\n" * 20)
    return path


def _truncated_file(path: Path) -> Path:
    full = make_dicom(path, synthetic_image(64, 64))
    data = full.read_bytes()
    full.write_bytes(data[:-1000])
    return full


def _truncated_compressed_file(path: Path) -> Path:
    full = make_dicom(path, synthetic_image(64, 64), transfer_syntax=RLELossless)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return full


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_text_file, ["not a DICOM file"]),
        (_truncated_file, ["truncated"]),
        (_truncated_compressed_file, ["truncated"]),
        (make_sr, ["not an image", "SR"]),
        (make_color, ["colour", "RGB"]),
        (make_multiframe, ["multi-frame", "3 frames"]),
    ],
    ids=["text", "truncated", "truncated-rle", "sr", "colour", "multiframe"],
)
def test_refusals(tmp_path: Path, make, words: list[str]) -> None:
    path = make(tmp_path / "bad.dcm")
    with pytest.raises(InputError) as info:
        read_dicom(path, OPTS)
    message = str(info.value)
    assert message.startswith(str(path))
    for word in words:
        assert word in message
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe", PATIENT_BIRTH_DATE):
        assert secret not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_dicom(tmp_path / "absent.dcm", OPTS)


# --------------------------------------------------------------------------
# Privacy and metadata
# --------------------------------------------------------------------------


def test_no_patient_fields_in_result(tmp_path: Path) -> None:
    path = make_dicom(
        tmp_path / "IM0003",
        synthetic_image(16, 16),
        window=(2000, 1000),
        patient_name="Smith^Alice^Marie",
        patient_id="MRN-0077341",
    )
    result = read_dicom(path, OPTS)
    text = repr(result) + repr(result.extra)
    for secret in ("Smith", "Alice", "MRN-0077341", PATIENT_BIRTH_DATE):
        assert secret not in text
    assert not any("patient" in key.lower() for key in result.extra)
    ds = pydicom.dcmread(path)
    from medseg.ingest.inputs import collect_inputs

    assert [f.case_id for f in collect_inputs([path]).files] == ["IM0003"]
    assert [f.case_id for f in collect_inputs([path], "sop_instance_uid").files] == [ds.SOPInstanceUID]
    assert result.extra["sop_instance_uid"] == ds.SOPInstanceUID
    assert result.extra["study_instance_uid"] == ds.StudyInstanceUID
    assert result.extra["series_instance_uid"] == ds.SeriesInstanceUID
    assert result.extra["view_position"] == "PA"
    assert result.extra["photometric_interpretation"] == "MONOCHROME2"
