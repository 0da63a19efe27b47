"""DICOM SR export of the CTR: TID 1500 content, references, round trip."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage

from dicom_factory import make_dicom, make_legacy_without_type2, synthetic_image
from medseg.errors import InputError
from medseg.inference.ctr import CtrResult
from medseg.inference.dicom_seg import write_dicom_seg
from medseg.inference.dicom_sr import CODES, QC_FLAG_CODES, read_ctr_report, write_ctr_report
from medseg.phantoms.write import write_phantom_dataset

SHAPE = (128, 96)  # (rows, cols) of the phantom radiographs
MODEL = dict(model_name="unet-test", model_version="1.2.3")


def _ctr(ctr: float, heart: float, thorax: float, flags: list[str] | None = None) -> CtrResult:
    return CtrResult(ctr, heart, thorax, None, None, list(flags or []))


def _heart_mask(rows: int, cols: int) -> np.ndarray:
    mask = np.zeros((rows, cols), dtype=bool)
    mask[rows // 3 : 2 * rows // 3, cols // 4 : 3 * cols // 4] = True
    return mask


@pytest.fixture
def case(tmp_path) -> tuple[Path, Path]:
    """(phantom source radiograph, SEG written from it)."""
    ids = write_phantom_dataset(tmp_path / "phantoms", n=1, seed=7, shape=SHAPE)
    source = tmp_path / "phantoms" / "images" / f"{ids[0]}.dcm"
    seg = write_dicom_seg(source, {"heart": _heart_mask(*SHAPE)}, tmp_path / "seg.dcm", **MODEL)
    return source, seg


def _dsrdump_ok(path: Path) -> None:
    """DCMTK's SR reader, where installed, parses the file without complaint."""
    if shutil.which("dsrdump") is None:
        return
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert "Imaging Measurement Report" in result.stdout


def test_round_trip_references_and_codes(case, tmp_path):
    source_path, seg_path = case
    flags = ["cardiomegaly", "low_confidence"]
    values = _ctr(0.5234567891, 123.4567891, 235.8765432)
    out = write_ctr_report(source_path, seg_path, values, flags, tmp_path / "out" / "sr.dcm", **MODEL)
    assert out == tmp_path / "out" / "sr.dcm"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]

    source = pydicom.dcmread(source_path)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    ds = pydicom.dcmread(out)  # a Part 10 file: no force needed
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    assert ds.file_meta.MediaStorageSOPClassUID == ComprehensiveSRStorage
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
    assert ds.PatientBirthDate == source.PatientBirthDate and ds.StudyDate == source.StudyDate
    assert ds.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert ds.SOPInstanceUID not in (source.SOPInstanceUID, seg.SOPInstanceUID)
    assert ds.SeriesDescription == "medseg CTR report (research use)" and int(ds.SeriesNumber) == 901
    assert ds.Manufacturer == "medseg" and ds.ManufacturerModelName == "unet-test"
    assert ds.ContentDate and ds.ContentTime
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence] == ["99MEDSEG"]

    # Evidence: the source image and the SEG, in the SR's own study.
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    assert [item.StudyInstanceUID for item in evidence] == [source.StudyInstanceUID]
    listed = {
        (series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID, sop.ReferencedSOPClassUID)
        for series in evidence[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert listed == {
        (source.SeriesInstanceUID, source.SOPInstanceUID, source.SOPClassUID),
        (seg.SeriesInstanceUID, seg.SOPInstanceUID, seg.SOPClassUID),
    }

    # highdicom reads it as a TID 1500 report with one image-level group.
    sr = hd.sr.srread(out)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    procedure = [
        item.value for item in report[0].ContentSequence
        if item.name == hd.sr.CodedConcept("121058", "DCM", "Procedure reported")
    ]
    assert [(c.value, c.scheme_designator) for c in procedure] == [("399208008", "SCT")]
    observers = report.get_observer_contexts()
    assert len(observers) == 1 and observers[0].observer_type == hd.sr.CodedConcept("121007", "DCM", "Device")
    groups = report.get_image_measurement_groups(referenced_sop_instance_uid=source.SOPInstanceUID)
    assert len(groups) == 1
    group = groups[0]
    assert [img.referenced_sop_instance_uid for img in group.source_images] == [source.SOPInstanceUID]
    measured = {(m.name.meaning, m.unit.value): m.value for m in group.get_measurements()}
    assert set(measured) == {
        ("Cardiothoracic ratio", "1"),
        ("Transverse cardiac diameter", "mm"),
        ("Maximal internal thoracic diameter", "mm"),
    }
    heart = group.get_measurements(name=hd.sr.CodedConcept.from_code(CODES["heart_width"]))[0]
    assert [site.value.value for site in heart.finding_sites] == ["80891009"]  # SCT Heart
    evaluations = group.get_qualitative_evaluations()
    assert [(e.name.value, e.value.value, e.value.scheme_designator) for e in evaluations] == [
        ("QCFLAG", "QC-CARDIOMEGALY", "99MEDSEG"),
        ("QCFLAG", "QC-LOW-CONF", "99MEDSEG"),
    ]

    back = read_ctr_report(out)
    assert back["ctr"] == pytest.approx(values.ctr, abs=1e-6)
    assert back["heart_width_mm"] == pytest.approx(values.heart_width_mm, abs=1e-6)
    assert back["thoracic_width_mm"] == pytest.approx(values.thoracic_width_mm, abs=1e-6)
    assert back["qc_flags"] == flags
    assert back["source_sop_instance_uid"] == source.SOPInstanceUID
    assert back["referenced_seg_sop_instance_uid"] == seg.SOPInstanceUID
    _dsrdump_ok(out)


def test_nan_measurements_are_left_out(case, tmp_path):
    source_path, seg_path = case
    out = write_ctr_report(
        source_path, seg_path, _ctr(float("nan"), float("nan"), 240.0),
        ["missing_heart"], tmp_path / "sr.dcm", **MODEL,
    )
    group = hd.sr.srread(out).content.get_image_measurement_groups()[0]
    assert [m.name.meaning for m in group.get_measurements()] == ["Maximal internal thoracic diameter"]
    back = read_ctr_report(out)
    assert math.isnan(back["ctr"]) and math.isnan(back["heart_width_mm"])
    assert back["thoracic_width_mm"] == pytest.approx(240.0, abs=1e-6)
    assert back["qc_flags"] == ["missing_heart"]
    assert "nan" not in pydicom.dcmread(out).to_json().lower()  # no NaN written anywhere
    _dsrdump_ok(out)


def test_no_seg_no_ctr_no_flags(case, tmp_path):
    source_path, _ = case
    out = write_ctr_report(source_path, None, None, [], tmp_path / "sr.dcm", **MODEL)
    ds = pydicom.dcmread(out)
    sops = [
        sop.ReferencedSOPInstanceUID
        for series in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    source = pydicom.dcmread(source_path)
    assert sops == [source.SOPInstanceUID]
    group = hd.sr.srread(out).content.get_image_measurement_groups()[0]
    assert group.get_measurements() == [] and group.get_qualitative_evaluations() == []
    back = read_ctr_report(out)
    assert all(math.isnan(back[k]) for k in ("ctr", "heart_width_mm", "thoracic_width_mm"))
    assert back["qc_flags"] == [] and back["referenced_seg_sop_instance_uid"] is None
    assert back["source_sop_instance_uid"] == source.SOPInstanceUID


def test_flags_deduplicated_and_unknown_flag_kept(case, tmp_path):
    source_path, seg_path = case
    flags = ["not_frontal_chest", "a_future_flag_longer_than_16", "not_frontal_chest"]
    out = write_ctr_report(source_path, seg_path, _ctr(0.45, 100.0, 222.2), flags,
                           tmp_path / "sr.dcm", **MODEL)
    assert read_ctr_report(out)["qc_flags"] == ["not_frontal_chest", "a_future_flag_longer_than_16"]
    group = hd.sr.srread(out).content.get_image_measurement_groups()[0]
    assert [e.value.value for e in group.get_qualitative_evaluations()] == [
        QC_FLAG_CODES["not_frontal_chest"].value, "a_future_flag_longer_than_16",
    ]
    _dsrdump_ok(out)


def test_legacy_source_and_patient_name_stays_out_of_logs(tmp_path, caplog):
    """No preamble, no file meta, no Patient ID / Study Date: filled in empty,
    and highdicom's warning that quotes a one-component name is suppressed."""
    rows, cols = 60, 40
    src_path, ds = make_legacy_without_type2(tmp_path / "legacy.dcm", rows, cols)
    digest = hashlib.sha256(src_path.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match="Solitaryname"):  # what is being suppressed
        hd.valuerep.check_person_name("Solitaryname")

    seg_path = write_dicom_seg(src_path, {"heart": _heart_mask(rows, cols)}, tmp_path / "seg.dcm", **MODEL)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_ctr_report(src_path, seg_path, _ctr(0.61, 18.3, 30.0), ["cardiomegaly"],
                               tmp_path / "sr.dcm", **MODEL)
    assert not [w for w in caught if "Solitaryname" in str(w.message)]
    assert "Solitaryname" not in caplog.text

    sr = pydicom.dcmread(out)
    assert sr.PatientID == "" and sr.StudyDate == "" and sr.PatientBirthDate == ""  # not invented
    assert sr.PatientName == "Solitaryname"  # copied as is
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    back = read_ctr_report(out)
    assert back["source_sop_instance_uid"] == ds.SOPInstanceUID
    assert back["referenced_seg_sop_instance_uid"] == pydicom.dcmread(seg_path).SOPInstanceUID
    assert back["ctr"] == pytest.approx(0.61, abs=1e-6) and back["qc_flags"] == ["cardiomegaly"]
    assert hashlib.sha256(src_path.read_bytes()).hexdigest() == digest  # source untouched


def test_bad_inputs_write_nothing(case, tmp_path):
    source_path, seg_path = case
    out_dir = tmp_path / "bad"
    # A SEG of another study (and image) is refused.
    other = make_dicom(tmp_path / "other.dcm", synthetic_image(*SHAPE))
    other_seg = write_dicom_seg(other, {"heart": _heart_mask(*SHAPE)}, tmp_path / "other-seg.dcm", **MODEL)
    with pytest.raises(ValueError, match="another study"):
        write_ctr_report(source_path, other_seg, None, [], out_dir / "a.dcm", **MODEL)
    # The source image is not a SEG.
    with pytest.raises(ValueError, match="not a DICOM Segmentation"):
        write_ctr_report(source_path, source_path, None, [], out_dir / "b.dcm", **MODEL)
    with pytest.raises(ValueError, match="ctr"):
        write_ctr_report(source_path, seg_path, _ctr(float("inf"), 1.0, 2.0), [], out_dir / "c.dcm", **MODEL)
    with pytest.raises(ValueError, match="heart_width_mm"):
        write_ctr_report(source_path, seg_path, _ctr(0.5, -1.0, 2.0), [], out_dir / "d.dcm", **MODEL)
    with pytest.raises(ValueError, match="QC flag"):
        write_ctr_report(source_path, seg_path, None, [""], out_dir / "e.dcm", **MODEL)
    with pytest.raises(ValueError, match="sequence"):
        write_ctr_report(source_path, seg_path, None, "cardiomegaly", out_dir / "f.dcm", **MODEL)
    with pytest.raises(InputError):
        write_ctr_report(tmp_path / "missing.dcm", None, None, [], out_dir / "g.dcm", **MODEL)
    with pytest.raises(InputError):
        write_ctr_report(source_path, tmp_path / "missing-seg.dcm", None, [], out_dir / "h.dcm", **MODEL)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_read_refuses_a_non_tid1500_file(case):
    source_path, _ = case
    with pytest.raises(ValueError, match="not a DICOM SR"):
        read_ctr_report(source_path)  # an image, not an SR


def test_the_same_report_is_the_same_instance_and_another_is_not(case, tmp_path):
    """UIDs derive from source, model and content: writing the same report
    again (another output folder, a rerun) gives the same SOP Instance UID,
    which a PACS then holds already; other measurements or flags, another
    model version: other UIDs."""
    source_path, seg_path = case
    values = _ctr(0.52, 123.4, 235.8)

    def uids(name: str, ctr=values, flags=("cardiomegaly",), **model) -> tuple[str, str]:
        ds = pydicom.dcmread(write_ctr_report(source_path, seg_path, ctr, list(flags), tmp_path / name / "sr.dcm",
                                              **{**MODEL, **model}))
        return ds.SeriesInstanceUID, ds.SOPInstanceUID

    first = uids("a")
    assert uids("b") == first
    assert uids("c", ctr=_ctr(0.53, 123.4, 235.8))[1] != first[1]
    assert uids("d", flags=())[1] != first[1]
    assert uids("e", model_version="1.2.4")[1] != first[1]
    assert len(set(first)) == 2 and all(pydicom.uid.UID(uid).is_valid for uid in first)
    # Test-time augmentation's report is told apart in a viewer.
    assert uids("f", variant="TTA")[1] != first[1]
    plain, tta = (pydicom.dcmread(tmp_path / name / "sr.dcm", stop_before_pixels=True) for name in ("a", "f"))
    assert (plain.SeriesDescription, plain.SeriesNumber) == ("medseg CTR report (research use)", 901)
    assert (tta.SeriesDescription, tta.SeriesNumber) == ("medseg CTR report, TTA (research use)", 903)
