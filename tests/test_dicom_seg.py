"""DICOM SEG export: round trip of overlapping masks and references to the source."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from conftest import shared_data_dir
from dicom_factory import PATIENT_ID, make_dicom, make_legacy_without_type2, synthetic_image
from requirements_switch import skip_or_fail
from medseg.errors import InputError
from medseg.inference.dicom_seg import read_dicom_seg, series_description, write_dicom_seg

ROWS, COLS = 300, 200  # non-square, so a transpose would show
LEGACY_NAME = "CR-MONO1-10-chest.dcm"


def _legacy_cr() -> Path:
    path = shared_data_dir() / "dicom" / LEGACY_NAME
    if not path.is_file():
        skip_or_fail(f"legacy CR not present at {path}")
    return path


def _masks(rows: int, cols: int) -> dict[str, np.ndarray]:
    """Heart, lungs and clavicles; the clavicles overlap both lungs."""
    heart = np.zeros((rows, cols), dtype=bool)
    lungs = np.zeros((rows, cols), dtype=bool)
    clavicles = np.zeros((rows, cols), dtype=bool)
    r, c = rows // 10, cols // 10
    lungs[2 * r : 8 * r, 1 * c : 4 * c] = True
    lungs[2 * r : 8 * r, 6 * c : 9 * c] = True
    heart[5 * r : 8 * r, 3 * c : 7 * c] = True  # overlaps the lungs too
    clavicles[int(1.5 * r) : int(2.5 * r), 1 * c : 9 * c] = True
    clavicles[0, 0] = True  # a corner pixel: catches flips
    assert (clavicles & lungs).any() and (heart & lungs).any()
    return {"heart": heart, "lungs": lungs, "clavicles": clavicles}


def _check_seg(
    seg_path: Path, source: pydicom.Dataset, masks: dict[str, np.ndarray]
) -> pydicom.Dataset:
    """Assertions shared by the synthetic and the legacy source."""
    assert not [p for p in seg_path.parent.iterdir() if p.name.startswith(".tmp-")]
    back = read_dicom_seg(seg_path)
    assert list(back) == list(masks)
    for label, mask in masks.items():
        assert back[label].dtype == bool and back[label].shape == mask.shape
        np.testing.assert_array_equal(back[label], mask, err_msg=label)

    seg = pydicom.dcmread(seg_path)  # a Part 10 file: no force needed
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SOPInstanceUID != source.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert int(seg.NumberOfFrames) == 3  # one frame per segment: overlaps kept
    ref_series = seg.ReferencedSeriesSequence
    assert len(ref_series) == 1
    assert ref_series[0].SeriesInstanceUID == source.SeriesInstanceUID
    ref_instance = ref_series[0].ReferencedInstanceSequence[0]
    assert ref_instance.ReferencedSOPInstanceUID == source.SOPInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert seg.Manufacturer == "medseg" and seg.DeviceSerialNumber == "0"
    assert seg.ManufacturerModelName == "unet-test"
    assert "medseg" in str(seg.SoftwareVersions)
    assert int(seg.SeriesNumber) > 0 and int(seg.InstanceNumber) == 1

    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["heart", "lungs", "clavicles"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments] == [
        "80891009",  # Heart
        "39607008",  # Lung
        "51299004",  # Clavicle
    ]
    for s in segments:
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "medseg" and algo.AlgorithmVersion == "1.2.3"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI

    # highdicom sees the same references.
    hseg = hd.seg.segread(seg_path)
    assert hseg.get_source_image_uids() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    ]
    return seg


def _write(source: Path, masks: dict[str, np.ndarray], out: Path) -> Path:
    return write_dicom_seg(source, masks, out, model_name="unet-test", model_version="1.2.3")


def test_seg_round_trip_synthetic(tmp_path):
    src_path = make_dicom(tmp_path / "src.dcm", synthetic_image(ROWS, COLS))
    masks = _masks(ROWS, COLS)
    out = _write(src_path, masks, tmp_path / "out" / "seg.dcm")
    assert out == tmp_path / "out" / "seg.dcm"
    source = pydicom.dcmread(src_path)
    seg = _check_seg(out, source, masks)
    assert seg.PatientID == PATIENT_ID  # the SEG belongs to the same patient


def test_the_same_masks_are_the_same_instance_and_others_are_not(tmp_path):
    """A SEG's UIDs derive from source, model and masks: the same result
    written twice is one instance (a PACS holding it is not sent a copy
    under a new UID); one pixel more, or another model version, is another."""
    src_path = make_dicom(tmp_path / "src.dcm", synthetic_image(ROWS, COLS))
    masks = _masks(ROWS, COLS)

    def uids(name: str, masks=masks, version="1.2.3", variant="") -> tuple[str, str]:
        ds = pydicom.dcmread(write_dicom_seg(src_path, masks, tmp_path / name / "seg.dcm", model_name="unet-test",
                                             model_version=version, variant=variant), stop_before_pixels=True)
        return ds.SeriesInstanceUID, ds.SOPInstanceUID

    first = uids("a")
    assert uids("b") == first
    changed = {label: mask.copy() for label, mask in masks.items()}
    label = next(iter(changed))
    changed[label][0, 0] = not changed[label][0, 0]
    assert uids("c", masks=changed)[1] != first[1]
    assert uids("d", version="1.2.4")[1] != first[1]
    ds = pydicom.dcmread(tmp_path / "a" / "seg.dcm", stop_before_pixels=True)
    assert ds.SeriesDescription == "unet-test segmentation (research use)" and ds.SeriesNumber == 900
    # A result of non-default settings (TTA, a threshold) is told apart in a
    # viewer (fresh-user trials: both had one description and number), even
    # when its masks are the same.
    tta = uids("e", variant="TTA, threshold 0.45")
    assert tta[0] != first[0] and tta[1] != first[1]
    ds = pydicom.dcmread(tmp_path / "e" / "seg.dcm", stop_before_pixels=True)
    assert ds.SeriesDescription == "unet-test TTA, threshold 0.45 (research use)" and ds.SeriesNumber == 902
    long = series_description("models:/medseg-chest-xray-unet-ensemble@champion", "TTA, threshold 0.45, raw masks")
    assert long == "models:/medseg-che TTA, threshold 0.45, raw masks (research use)" and len(long) == 64
    assert series_description("m" * 80, "v" * 80).endswith(" (research use)")
    # Fourth trial: cut mid-name, double space, an unclosed bracket.
    assert series_description("jsrt-cpu (shipped with medseg)", "TTA, threshold 0.45, raw masks") == \
        "jsrt-cpu TTA, threshold 0.45, raw masks (research use)"


def test_seg_from_legacy_file_without_type2_attributes(tmp_path):
    """No preamble, no file meta, no Patient ID / Study Date: filled in empty."""
    src_path, ds = make_legacy_without_type2(tmp_path / "legacy.dcm", ROWS, COLS)
    digest = hashlib.sha256(src_path.read_bytes()).hexdigest()

    masks = _masks(ROWS, COLS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _write(src_path, masks, tmp_path / "seg.dcm")
    assert not [w for w in caught if "Solitaryname" in str(w.message)]  # no name in logs
    seg = _check_seg(out, pydicom.dcmread(src_path, force=True), masks)
    assert seg.PatientID == "" and seg.StudyDate == "" and seg.PatientBirthDate == ""
    assert seg.PatientName == "Solitaryname"  # copied as is
    assert hashlib.sha256(src_path.read_bytes()).hexdigest() == digest  # source untouched


def test_seg_from_real_legacy_cr(tmp_path):
    path = _legacy_cr()
    source = pydicom.dcmread(path, force=True)
    masks = _masks(int(source.Rows), int(source.Columns))
    out = _write(path, masks, tmp_path / "cr-seg.dcm")
    seg = _check_seg(out, source, masks)
    assert (seg.Rows, seg.Columns) == (440, 440)
    assert seg.PatientID == "" and seg.StudyDate == ""  # not invented


def test_empty_mask_is_kept(tmp_path):
    src_path = make_dicom(tmp_path / "src.dcm", synthetic_image(ROWS, COLS))
    masks = _masks(ROWS, COLS)
    masks["heart"] = np.zeros((ROWS, COLS), dtype=bool)
    out = _write(src_path, masks, tmp_path / "seg.dcm")
    back = read_dicom_seg(out)
    assert list(back) == ["heart", "lungs", "clavicles"] and not back["heart"].any()
    np.testing.assert_array_equal(back["lungs"], masks["lungs"])


def test_bad_inputs(tmp_path):
    src_path = make_dicom(tmp_path / "src.dcm", synthetic_image(ROWS, COLS))
    with pytest.raises(ValueError, match="shape"):
        _write(src_path, {"heart": np.zeros((COLS, ROWS), dtype=bool)}, tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="structures_info"):
        _write(src_path, {"spleen": np.zeros((ROWS, COLS), dtype=bool)}, tmp_path / "b.dcm")
    with pytest.raises(InputError):
        _write(tmp_path / "missing.dcm", _masks(ROWS, COLS), tmp_path / "c.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.dcm"]


def test_structures_info_override(tmp_path):
    src_path = make_dicom(tmp_path / "src.dcm", synthetic_image(ROWS, COLS))
    mask = _masks(ROWS, COLS)["heart"]
    out = write_dicom_seg(
        src_path,
        {"cardiac": mask},
        tmp_path / "seg.dcm",
        model_name="m",
        model_version="0",
        structures_info={"cardiac": ("AnatomicalStructure", "Heart")},
    )
    seg = pydicom.dcmread(out)
    assert seg.SegmentSequence[0].SegmentLabel == "cardiac"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"
    np.testing.assert_array_equal(read_dicom_seg(out)["cardiac"], mask)


def test_memoised_iod_lookup_answers_as_highdicom():
    """The cache put on highdicom's ``is_attribute_in_iod`` (issue 14) gives
    the function's own answers, lists as exclusions included, and is what
    highdicom's modules call."""
    import highdicom.base
    from highdicom import _standard_utils

    import medseg.inference.dicom_seg  # noqa: F401 - installs the cache

    cached = _standard_utils.is_attribute_in_iod
    original = cached.__wrapped__
    assert highdicom.base.is_attribute_in_iod is cached
    seg, cr = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.1"
    for args in [("ContentDate", seg), ("NumberOfFrames", seg), ("NumberOfFrames", cr), ("PixelData", cr),
                 ("SegmentSequence", cr), ("PixelData", cr, ["IconImageSequence"])]:
        assert cached(*args) == original(*args), args
        assert cached(*args) == original(*args), args  # the cached answer too
    assert cached.cache_info().hits >= 6
