"""Write and read the cardiothoracic ratio of one radiograph as a DICOM SR.

What is written: a Comprehensive SR document (SOP Class
1.2.840.10008.5.1.4.1.1.88.33) whose content is a TID 1500 "Measurement
Report" holding one TID 1501 "Measurement and Qualitative Evaluation Group"
(image-level: no region of interest) with

* the cardiothoracic ratio (unit UCUM ``1``, "no units"),
* the transverse cardiac diameter (heart width, UCUM ``mm``),
* the maximal internal thoracic diameter (thoracic width, UCUM ``mm``),
* one qualitative evaluation per QC flag,

a Tracking Identifier and Tracking UID, the model as Algorithm Identification
(TID 4019), and a "Source of Measurement" IMAGE reference to the source
radiograph. The observation context names the model as a device observer
(TID 1004); there is no person observer. The document is marked COMPLETE,
UNVERIFIED and PRELIMINARY: machine output no one has signed.

A measurement that is nan (not measurable, see
:class:`medseg.inference.ctr.CtrResult`) is left out; the report stays valid
(TID 1501 makes every measurement optional). The QC flags (e.g.
"missing_heart") say why.

References: the source radiograph is referenced from the measurement group
and, with the DICOM SEG written beside it (if given), listed in the Current
Requested Procedure Evidence Sequence, so a PACS links the SR to both.

Comprehensive SR rather than Comprehensive 3D SR: the content has no 3D
spatial coordinates (a projection radiograph has none), and Comprehensive SR
is understood by more archives and viewers. No Image Library (TID 1600, an
optional part of TID 1500) is written: highdicom builds it from Patient
Orientation and Pixel Spacing, which legacy radiographs often lack.

Codes (:data:`CODES`, :data:`QC_FLAG_CODES`):

* Procedure reported: SNOMED CT 399208008 "Plain chest X-ray" (the
  procedure concept "Plain X-ray of chest"; not in pydicom's code dictionary,
  checked against independent public uses of the code).
* Finding sites: SNOMED CT 80891009 "Heart" and 816094009 "Thorax", from
  pydicom's code dictionary (``codes.SCT``).
* Units: UCUM ``1`` "no units" and ``mm`` (``codes.UCUM``).
* Report title, observer, tracking and group concepts: DCM codes that
  highdicom's templates write (e.g. DCM 126000 "Imaging Measurement Report").
* Private coding scheme ``99MEDSEG`` (designator "99" + name, the private
  convention of PS3.16 section 8.2; it is declared in the Coding Scheme
  Identification Sequence) for concepts without a standard code found:
  the cardiothoracic ratio (pydicom's dictionary has only LOINC 59076-0
  "Cardiothoracic Area Ratio", an area ratio, not the diameter ratio), the
  two widths (LOINC 11864-6 "Transverse Thoracic Diameter" exists but is a
  fetal ultrasound biometry concept, CID 12005/12279), the concept name
  "Quality control flag" and one value per medseg QC flag. A flag without an
  entry in :data:`QC_FLAG_CODES` gets code value = the flag text (highdicom
  puts a value over 16 characters into Long Code Value). The code meaning of
  every flag is the flag text; :func:`read_ctr_report` reads it back from
  there.

Sources: the source radiograph is read as :mod:`medseg.inference.dicom_seg`
reads it (legacy ACR-NEMA files included; missing type-2 patient/study
attributes are added empty, nothing is invented), and the SR copies its
patient and study. highdicom warns about one-component patient names by
quoting the name; that warning is suppressed so the name never reaches logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem  # not re-exported by hd.sr
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import medseg
from medseg.atomic import atomic_path
from medseg.errors import InputError
from medseg.inference.ctr import CtrResult
from medseg.inference.dicom_seg import RESEARCH_USE, _read_source, no_person_name_warnings, result_uids

PRIVATE_SCHEME = "99MEDSEG"

# Concepts of the report: standard where one was found, else 99MEDSEG.
CODES: dict[str, Code] = {
    # SNOMED CT "Plain X-ray of chest (procedure)".
    "procedure_reported": Code("399208008", "SCT", "Plain chest X-ray"),
    "cardiothoracic_ratio": Code("CTR", PRIVATE_SCHEME, "Cardiothoracic ratio"),
    "heart_width": Code("HEARTWIDTH", PRIVATE_SCHEME, "Transverse cardiac diameter"),
    "thoracic_width": Code("THORAXWIDTH", PRIVATE_SCHEME, "Maximal internal thoracic diameter"),
    "qc_flag": Code("QCFLAG", PRIVATE_SCHEME, "Quality control flag"),
    "heart": codes.SCT.Heart,  # 80891009
    "thorax": codes.SCT.Thorax,  # 816094009
    "no_units": codes.UCUM.NoUnits,  # "1"
    "mm": codes.UCUM.Millimeter,  # "mm"
}

# QC flag text -> 99MEDSEG code (meaning = the flag text). Code values fit
# the 16 characters of Code Value.
QC_FLAG_CODES: dict[str, Code] = {
    flag: Code(value, PRIVATE_SCHEME, flag)
    for flag, value in {
        "cardiomegaly": "QC-CARDIOMEGALY",
        "implausible_ctr": "QC-IMPLAUS-CTR",
        "low_confidence": "QC-LOW-CONF",
        "lungs_not_two_components": "QC-LUNGS-NOT-2",
        "not_frontal_chest": "QC-NOT-FRONTAL",
        "implausible_anatomy": "QC-IMPLAUS-ANAT",
        "missing_heart": "QC-MISS-HEART",
        "missing_lungs": "QC-MISS-LUNGS",
        "missing_clavicles": "QC-MISS-CLAV",
        "missing_left_lung": "QC-MISS-L-LUNG",
        "missing_right_lung": "QC-MISS-R-LUNG",
        "missing_left_clavicle": "QC-MISS-L-CLAV",
        "missing_right_clavicle": "QC-MISS-R-CLAV",
    }.items()
}

SERIES_DESCRIPTION = f"medseg CTR report ({RESEARCH_USE})"
_MANUFACTURER = "medseg"
_DEVICE_SERIAL = "0"
_TRACKING_IDENTIFIER = "medseg CTR measurements"
# Filled into Code Meaning (LO): at most 64 characters.
_MAX_FLAG_LENGTH = 64


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _flag_code(flag: str) -> hd.sr.CodedConcept:
    code = QC_FLAG_CODES.get(flag) or Code(flag, PRIVATE_SCHEME, flag)
    return _concept(code)


def _check_flags(flags: Sequence[str]) -> list[str]:
    """The flags once each, in their order; ValueError on a bad flag."""
    if isinstance(flags, str):
        raise ValueError("flags must be a sequence of flag strings, not one string")
    out: list[str] = []
    for flag in flags:
        if not isinstance(flag, str) or not flag.strip() or len(flag) > _MAX_FLAG_LENGTH \
                or "\\" in flag:
            raise ValueError(
                f"QC flag {flag!r} is not a non-empty string of at most "
                f"{_MAX_FLAG_LENGTH} characters without backslashes"
            )
        if flag not in out:
            out.append(flag)
    return out


def _measurement_value(name: str, value: float) -> float | None:
    """``value`` as a float, None if nan; ValueError if infinite or negative."""
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be a finite value >= 0 or nan, got {value}")
    return value


def _measurements(ctr: CtrResult | None) -> list[hd.sr.Measurement]:
    if ctr is None:
        return []
    rows = (
        ("ctr", ctr.ctr, CODES["cardiothoracic_ratio"], CODES["no_units"], None),
        ("heart_width_mm", ctr.heart_width_mm, CODES["heart_width"], CODES["mm"], CODES["heart"]),
        ("thoracic_width_mm", ctr.thoracic_width_mm, CODES["thoracic_width"], CODES["mm"],
         CODES["thorax"]),
    )
    out = []
    for field, raw, name, unit, site in rows:
        value = _measurement_value(field, raw)
        if value is None:
            continue  # not measurable: left out (the QC flags say why)
        out.append(
            hd.sr.Measurement(
                name=_concept(name),
                value=value,
                unit=_concept(unit),
                finding_sites=[hd.sr.FindingSite(_concept(site))] if site is not None else None,
            )
        )
    return out


def _read_seg(seg: Path, src: Dataset) -> Dataset:
    """The SEG's header, checked to belong to ``src``.

    Raises:
        medseg.errors.InputError: not a readable DICOM file.
        ValueError: not a SEG, another study, or derived from another image.
    """
    try:
        ds = pydicom.dcmread(seg, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise InputError(seg, f"cannot read the DICOM SEG ({type(exc).__name__})") from None
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            raise ValueError(f"{seg}: the SEG has no {keyword}")
    if str(ds.SOPClassUID) not in hd.seg.SOP_CLASS_UIDS:
        raise ValueError(f"{seg}: SOP Class {ds.SOPClassUID} is not a DICOM Segmentation")
    if ds.StudyInstanceUID != src.StudyInstanceUID:
        raise ValueError(f"{seg}: the SEG belongs to another study than the source image")
    referenced = {
        instance.ReferencedSOPInstanceUID
        for series in ds.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
        if "ReferencedSOPInstanceUID" in instance
    }
    if referenced and src.SOPInstanceUID not in referenced:
        raise ValueError(f"{seg}: the SEG was not derived from the source image")
    return ds


def _content_key(ctr: CtrResult | None) -> tuple:
    """The measurements as they are written (for :func:`result_uids`)."""
    if ctr is None:
        return ()
    return tuple(repr(float(value)) for value in (ctr.ctr, ctr.heart_width_mm, ctr.thoracic_width_mm))


def write_ctr_report(
    source: str | Path,
    seg: str | Path | None,
    ctr: CtrResult | None,
    flags: Sequence[str],
    out_path: str | Path,
    *,
    model_name: str,
    model_version: str,
    series_number: int | None = None,
    instance_number: int = 1,
    variant: str = "",
) -> Path:
    """Write the CTR measurements of one radiograph as a DICOM SR (TID 1500).

    Args:
        source: the radiograph the measurements were made on (Part 10 or
            legacy ACR-NEMA). Its patient and study are copied, its SOP
            Instance referenced from the measurement group and listed as
            evidence; the file is not modified.
        seg: the DICOM SEG of the same prediction (e.g. from
            :func:`medseg.inference.dicom_seg.write_dicom_seg`), listed as
            evidence beside the source; None for no SEG.
        ctr: the measurements: ``ctr`` (dimensionless, heart width / thoracic
            width), ``heart_width_mm`` and ``thoracic_width_mm`` (mm). A nan
            value is not measurable and left out; None leaves all out.
        flags: QC flags (e.g. "cardiomegaly", "missing_heart"), one
            qualitative evaluation each, in this order, duplicates dropped.
        out_path: SR file to write (atomically: temp name, then rename).
        model_name: the device observer's name and model name, the
            algorithm name and Manufacturer's Model Name.
        model_version: the algorithm version.
        series_number, instance_number: of the new SR series / instance
            (Series Number default: 901, with a ``variant`` 903).
        variant: the non-default settings the measurements came from (as
            for :func:`medseg.inference.dicom_seg.write_dicom_seg`; 30
            characters of it): in the Series Description, and Series
            Number 903.

    Returns:
        ``Path(out_path)``.

    Raises:
        medseg.errors.InputError: the source or the SEG is not a readable
            DICOM file.
        ValueError: a measurement is infinite or negative; a flag is empty,
            longer than 64 characters or holds a backslash; the SEG is not a
            Segmentation, belongs to another study or was derived from
            another image.
    """
    source = Path(source)
    out_path = Path(out_path)
    flag_list = _check_flags(flags)
    measurements = _measurements(ctr)
    src = _read_source(source)
    evidence = [src]
    if seg is not None:
        evidence.append(_read_seg(Path(seg), src))
    # Same report of the same image and model -> same UIDs (result_uids).
    description = (f"medseg CTR report, {variant[:30]} ({RESEARCH_USE})" if variant else SERIES_DESCRIPTION)
    if series_number is None:
        series_number = 903 if variant else 901
    series_uid, sop_uid = result_uids(
        "SR", src.SOPInstanceUID, model_name, model_version,
        [str(ds.SOPInstanceUID) for ds in evidence[1:]], _content_key(ctr), flag_list, description,
    )

    qc_name = _concept(CODES["qc_flag"])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_uid, "tracking"]), identifier=_TRACKING_IDENTIFIER
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=str(model_name)[:64], version=str(model_version)[:64]
        ),
        measurements=measurements or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=qc_name, value=_flag_code(flag)) for flag in flag_list
        ] or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same UID for every report of one model version.
            uid=generate_uid(entropy_srcs=["medseg device observer", str(model_name),
                                           str(model_version)]),
            name=str(model_name)[:64],
            manufacturer_name=_MANUFACTURER,
            model_name=str(model_name)[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept(CODES["procedure_reported"]),
        imaging_measurements=[group],
    )

    with no_person_name_warnings():
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=report,
            series_instance_uid=series_uid,
            series_number=int(series_number),
            sop_instance_uid=sop_uid,
            instance_number=int(instance_number),
            manufacturer=_MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=description,
            manufacturer_model_name=str(model_name)[:64],
            software_versions=f"medseg {medseg.__version__}",
            device_serial_number=_DEVICE_SERIAL,
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    designator=PRIVATE_SCHEME,
                    name="medseg private codes",
                    responsible_organization="medseg",
                )
            ],
        )
    with atomic_path(out_path) as tmp:
        sr.save_as(tmp)
    return out_path


def read_ctr_report(path: str | Path) -> dict:
    """Read back an SR written by :func:`write_ctr_report`.

    Args:
        path: the SR file.

    Returns:
        {"ctr": float (dimensionless), "heart_width_mm": float (mm),
        "thoracic_width_mm": float (mm) - nan where the report has no such
        measurement; "qc_flags": [flag text, in report order];
        "source_sop_instance_uid": the measured image's SOP Instance UID;
        "referenced_seg_sop_instance_uid": the SEG listed as evidence, or
        None}.

    Raises:
        ValueError: not an SR (Enhanced, Comprehensive or Comprehensive 3D)
            with one TID 1500 image measurement group
            referencing one image, or a measurement in an unexpected unit.
    """
    try:
        sr = hd.sr.srread(path)
    except (RuntimeError, AttributeError, KeyError, InvalidDicomError) as exc:  # not an SR
        raise ValueError(f"{path}: not a DICOM SR that highdicom reads ({exc})") from None
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError(f"{path}: not a TID 1500 Measurement Report")
    groups = report.get_image_measurement_groups()
    if len(groups) != 1:
        raise ValueError(f"{path}: expected one image measurement group, found {len(groups)}")
    group = groups[0]

    def value(code_key: str, unit_key: str) -> float:
        found = group.get_measurements(name=_concept(CODES[code_key]))
        if not found:
            return float("nan")
        if len(found) > 1:
            raise ValueError(f"{path}: {CODES[code_key].meaning!r} measured {len(found)} times")
        if found[0].unit != _concept(CODES[unit_key]):
            raise ValueError(
                f"{path}: {CODES[code_key].meaning!r} in unit {found[0].unit.value!r}, "
                f"expected {CODES[unit_key].value!r}"
            )
        return float(found[0].value)

    sources = group.source_images
    if len(sources) != 1:
        raise ValueError(f"{path}: expected one source image, found {len(sources)}")
    source_uid = str(sources[0].referenced_sop_instance_uid)
    segs = [
        str(instance_uid)
        for _, _, instance_uid, class_uid in sr.get_evidence()
        if str(class_uid) in hd.seg.SOP_CLASS_UIDS and str(instance_uid) != source_uid
    ]
    return {
        "ctr": value("cardiothoracic_ratio", "no_units"),
        "heart_width_mm": value("heart_width", "mm"),
        "thoracic_width_mm": value("thoracic_width", "mm"),
        "qc_flags": [
            str(evaluation.value.meaning)
            for evaluation in group.get_qualitative_evaluations(name=_concept(CODES["qc_flag"]))
        ],
        "source_sop_instance_uid": source_uid,
        "referenced_seg_sop_instance_uid": segs[0] if segs else None,
    }


__all__ = ["CODES", "QC_FLAG_CODES", "read_ctr_report", "write_ctr_report"]
