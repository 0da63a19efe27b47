"""Write small synthetic DICOM files for tests, with pydicom.

Every helper writes a real file and returns its path. Files carry a fake
patient name and ID (``PATIENT_NAME`` / ``PATIENT_ID``) so tests can check
that readers never leak them.

Compression: RLE, JPEG-LS and JPEG 2000 use pydicom's ``Dataset.compress``;
JPEG Lossless (process 14 and SV1), which pydicom cannot encode, is encoded
with imagecodecs and encapsulated with ``pydicom.encaps.encapsulate``. Each
compressed file is decoded back with pydicom and compared to the input, so a
test never runs on a file that does not hold the intended pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "SECRET-ID-42"
PATIENT_BIRTH_DATE = "19700101"

# Transfer syntaxes whose pixel data the factory can write.
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMPRESSED_SYNTAXES = (
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
)


def synthetic_image(
    rows: int = 64, cols: int = 48, bits_stored: int = 12, signed: bool = False
) -> np.ndarray:
    """A deterministic image that uses the whole ``bits_stored`` range.

    A left-to-right ramp plus a bright vertical band in the middle and a
    little seeded noise, so compression is not trivial and orientation
    errors (transposes, flips) would change the values.

    Returns:
        uint16 (or int16 when ``signed``) array of shape (rows, cols).
    """
    rng = np.random.default_rng(1234)
    if signed:
        lo, hi = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lo, hi = 0, 2**bits_stored - 1
    ramp = np.linspace(0.0, 1.0, cols)[None, :] * np.linspace(0.5, 1.0, rows)[:, None]
    img = ramp * 0.8
    img[:, cols * 2 // 5 : cols * 3 // 5] += 0.15
    img += rng.uniform(0.0, 0.05, size=(rows, cols))
    img[0, 0] = 0.0  # make sure both range ends occur
    img[-1, -1] = 1.0
    values = np.round(lo + np.clip(img, 0.0, 1.0) * (hi - lo))
    return values.astype(np.int16 if signed else np.uint16)




def _base_dataset(
    sop_class: str,
    modality: str,
    patient_name: str,
    patient_id: str,
) -> Dataset:
    """Patient / study / series / instance elements common to all files."""
    ds = Dataset()
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.StudyDate = "20240102"
    ds.InstitutionName = "Test Hospital"
    return ds


def _write(
    ds: Dataset,
    path: Path,
    transfer_syntax: str,
    preamble: bool,
) -> Path:
    """Write ``ds`` as Part 10 (preamble + file meta) or as a bare dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tsyntax = UID(transfer_syntax)
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = tsyntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        ds.save_as(path, enforce_file_format=True)
    else:
        # Legacy ACR-NEMA style: no preamble, no "DICM", no group 0002.
        if tsyntax.is_encapsulated:
            raise ValueError("a file without file meta cannot hold compressed pixel data")
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        pydicom.dcmwrite(
            path,
            ds,
            implicit_vr=tsyntax.is_implicit_VR,
            little_endian=tsyntax.is_little_endian,
        )
    return path


def _compress(ds: Dataset, arr: np.ndarray, transfer_syntax: UID) -> None:
    """Replace the native Pixel Data in ``ds`` by ``transfer_syntax`` data."""
    if transfer_syntax in (JPEGLossless, JPEGLosslessSV1):
        import imagecodecs

        # JPEG lossless codes the stored bit pattern, unsigned.
        bits = int(ds.BitsStored)
        unsigned = (arr.astype(np.int32) & ((1 << bits) - 1)).astype(np.uint16)
        if transfer_syntax == JPEGLosslessSV1:
            # SV1 = process 14 with predictor (selection value) 1.
            frame = imagecodecs.jpeg8_encode(
                unsigned, lossless=True, predictor=1, bitspersample=bits
            )
        else:
            # imagecodecs' ljpeg uses predictor 6: process 14, not SV1.
            frame = imagecodecs.ljpeg_encode(unsigned, bitspersample=bits)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, arr, generate_instance_uid=False)


def make_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_spacing: tuple[float, float] | None = (0.2, 0.2),
    imager_pixel_spacing: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    modality: str = "CR",
    sop_class: str = ComputedRadiographyImageStorage,
    preamble: bool = True,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    extra_elements: dict[str, Any] | None = None,
) -> Path:
    """Write a single-frame greyscale DICOM image.

    Args:
        path: file to write.
        pixels: stored values, uint16 (unsigned, PixelRepresentation 0) or
            int16 (signed, PixelRepresentation 1), shape (rows, cols); values
            must fit in ``bits_stored`` bits. uint8 gives Bits Allocated 8.
        photometric: "MONOCHROME1" or "MONOCHROME2".
        bits_stored: Bits Stored (High Bit = bits_stored - 1).
        transfer_syntax: a native syntax or one of ``COMPRESSED_SYNTAXES``
            (JPEG 2000 needs at least 32x32 pixels with the default
            encoder settings).
        pixel_spacing, imager_pixel_spacing: (row, col) mm, or None to omit.
        rescale: (Rescale Slope, Rescale Intercept), or None to omit.
        window: (Window Center, Window Width), or None to omit.
        modality, sop_class: Modality and SOP Class UID.
        preamble: False writes a legacy file: no preamble, no file meta
            (native transfer syntaxes only).
        patient_name, patient_id: written to the file; readers must not leak
            them.
        extra_elements: further elements by keyword, set last (so they can
            override anything above, e.g. {"NumberOfFrames": 2}).

    Returns:
        ``Path(path)``.
    """
    arr = np.ascontiguousarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {arr.shape}")
    tsyntax = UID(transfer_syntax)
    ds = _base_dataset(sop_class, modality, patient_name, patient_id)
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_pixel_spacing]
    if rescale is not None:
        ds.RescaleSlope = f"{rescale[0]:g}"
        ds.RescaleIntercept = f"{rescale[1]:g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    ds.ViewPosition = "PA"

    if tsyntax.is_encapsulated:
        _compress(ds, arr, tsyntax)
        # Prove the file holds the intended pixels before a test relies on it.
        decoded = ds.pixel_array
        if not np.array_equal(decoded, arr):
            raise AssertionError(f"{tsyntax.name} round trip changed the pixels")
    for keyword, value in (extra_elements or {}).items():
        setattr(ds, keyword, value)
    return _write(ds, Path(path), tsyntax, preamble)


def make_sr(
    path: str | Path, *, patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID
) -> Path:
    """Write a Basic Text SR document (no Pixel Data)."""
    ds = _base_dataset(BasicTextSRStorage, "SR", patient_name, patient_id)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "No acute cardiopulmonary abnormality."
    ds.ContentSequence = [item]
    return _write(ds, Path(path), ExplicitVRLittleEndian, preamble=True)


def make_legacy_without_type2(path: str | Path, rows: int, cols: int,
                              patient_name: str = "Solitaryname") -> tuple[Path, Dataset]:
    """A legacy ACR-NEMA-style MONOCHROME1 file (no preamble, no file meta,
    implicit VR) without Patient ID, Birth Date, Sex and Study Date, and with
    a one-component Patient's Name (highdicom quotes such a name in a
    warning). Returns (path, the dataset as written)."""
    path = make_dicom(Path(path), synthetic_image(rows, cols), photometric="MONOCHROME1",
                      transfer_syntax=ImplicitVRLittleEndian, preamble=False)
    ds = pydicom.dcmread(path, force=True)
    for keyword in ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
        delattr(ds, keyword)
    ds.PatientName = patient_name
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path, ds


def make_color(path: str | Path, rows: int = 32, cols: int = 40) -> Path:
    """Write an 8-bit RGB Secondary Capture image of shape (rows, cols, 3)."""
    ds = _base_dataset(SecondaryCaptureImageStorage, "OT", PATIENT_NAME, PATIENT_ID)
    rgb = np.zeros((rows, cols, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, cols, dtype=np.uint8)[None, :]
    rgb[..., 1] = 128
    ds.set_pixel_data(rgb, "RGB", 8, generate_instance_uid=False)
    return _write(ds, Path(path), ExplicitVRLittleEndian, preamble=True)


def make_multiframe(
    path: str | Path, frames: int = 3, rows: int = 32, cols: int = 40
) -> Path:
    """Write a greyscale image with ``frames`` frames, shape (frames, rows, cols)."""
    ds = _base_dataset(ComputedRadiographyImageStorage, "CR", PATIENT_NAME, PATIENT_ID)
    base = synthetic_image(rows, cols).astype(np.int32)
    stack = np.stack([np.minimum(base + i, 4095) for i in range(frames)]).astype(np.uint16)
    ds.set_pixel_data(stack, "MONOCHROME2", 12, generate_instance_uid=False)
    return _write(ds, Path(path), ExplicitVRLittleEndian, preamble=True)


__all__ = [
    "COMPRESSED_SYNTAXES",
    "NATIVE_SYNTAXES",
    "PATIENT_BIRTH_DATE",
    "PATIENT_ID",
    "PATIENT_NAME",
    "make_color",
    "make_dicom",
    "make_multiframe",
    "make_sr",
    "synthetic_image",
]
