"""Read a single-frame greyscale DICOM radiograph with pydicom.

Handles DICOM Part 10 files and legacy ACR-NEMA style files that have no
128-byte preamble and no file meta information (for these the transfer syntax
is inferred from the encoding pydicom detected while parsing). Compressed
pixel data (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) is decoded through
pydicom's pixel decoders backed by the pylibjpeg plugins / pyjpegls; nothing
here decodes pixels by hand.

Privacy: only the elements named in this module are read. Patient elements
(Patient's Name, Patient ID, birth date, ...) are never accessed, so they
cannot leak into the result, into warnings or into error messages.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medseg.errors import InputError
from medseg.ingest.types import IngestedImage, ReadOptions

# Which packages to install when pydicom has no working decoder for a
# transfer syntax, keyed by Transfer Syntax UID.
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG Lossless P14
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg)",  # JPEG-LS
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg and pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.202": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg and pylibjpeg-rle",  # RLE Lossless
}

# Elements whose presence shows that a force-read file really is DICOM: a
# text or random binary file "parses" under force=True into junk tags only.
_IMAGE_EVIDENCE = ("SOPClassUID", "Modality", "Rows", "Columns", "PixelData")


def read_dicom(path: str | Path, options: ReadOptions) -> IngestedImage:
    """Read one single-frame greyscale DICOM radiograph.

    Processing order follows the DICOM grayscale pipeline: stored values ->
    Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) -> VOI LUT
    or window (only when the file has one and ``options.apply_voi``) ->
    polarity. MONOCHROME1 images are inverted (``lo + hi - value``, with
    lo/hi the array's min/max) so the result is always display polarity:
    bone and mediastinum bright, air dark.

    Args:
        path: the DICOM file; any extension or none, with or without the
            128-byte preamble and file meta information.
        options: ``apply_voi`` and the fallback ``pixel_spacing_mm`` used when
            the file has neither Pixel Spacing nor Imager Pixel Spacing.

    Returns:
        IngestedImage with ``pixels`` float32 of shape (Rows, Columns) in
        modality units (or VOI output units when a window/VOI LUT was
        applied), ``spacing_mm`` = (row spacing, column spacing) in mm,
        ``case_id`` = file stem and non-identifying metadata in ``extra``.

    Raises:
        InputError: the file is missing, not DICOM, corrupt or truncated,
            not an image (SR, RT, SEG, presentation state, ... or no Pixel
            Data), colour, multi-frame, or needs a decoder that is not
            installed.
    """
    path = Path(path)
    ds = read_dataset(path)
    photometric = _check_single_grey_image(ds, path)
    tsyntax, inferred = ensure_transfer_syntax(ds, path)
    stored = _decode_pixels(ds, tsyntax, path)

    values, voi_note = _apply_luts(stored, ds, options.apply_voi)
    pixels = np.asarray(values, dtype=np.float32)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: minimum value is white. Mirror within the image's own
        # range so bone becomes bright without changing the value range.
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (lo + hi) - pixels
        photometric_note = "MONOCHROME1 (inverted)"
    else:
        photometric_note = "MONOCHROME2"
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)

    spacing, spacing_source = _spacing(ds, options)
    extra = _extra_metadata(ds, tsyntax, photometric, voi_note)
    # True for legacy ACR-NEMA style files that carry no file meta.
    extra["transfer_syntax_inferred"] = inferred

    return IngestedImage(
        pixels=pixels,
        spacing_mm=spacing,
        spacing_source=spacing_source,
        source=str(path),
        source_format="dicom",
        photometric=photometric_note,
        case_id=path.stem,
        extra=extra,
    )


def read_dataset(path: Path) -> Dataset:
    """Parse ``path``; retry without the Part 10 checks for ACR-NEMA files."""
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    # pydicom warns about non-conformant values in old files (e.g. dates
    # written as 1995.07.20); those are not problems for segmentation. Its
    # warnings are recorded, not shown: a truncated file only shows up as an
    # "End of file reached" warning (and an empty dataset).
    forced = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                # No "DICM" marker: may be a legacy file without preamble.
                forced = True
                ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # pydicom raises many types on bad input
            raise InputError(
                path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"
            ) from exc
    if any("End of file" in str(w.message) for w in caught):
        raise InputError(
            path,
            "truncated DICOM file: it ends inside a data element (incomplete "
            "copy or download?)",
        )
    if not any(keyword in ds for keyword in _IMAGE_EVIDENCE):
        if forced:
            raise InputError(
                path,
                "not a DICOM file: no DICOM preamble and no recognisable DICOM "
                "image elements",
            )
        raise InputError(
            path, "corrupt DICOM file: no recognisable data elements after the header"
        )
    return ds


def _sop_class_name(ds: Dataset) -> str:
    """Human-readable SOP Class name, or "" when the file has none."""
    sop = ds.get("SOPClassUID")
    if not sop:
        return ""
    return UID(str(sop)).name


def _check_single_grey_image(ds: Dataset, path: Path) -> str:
    """Refuse non-images, colour and multi-frame; return the photometric.

    Returns:
        "MONOCHROME1" or "MONOCHROME2".
    """
    sop = ds.get("SOPClassUID")
    if sop:
        uid = UID(str(sop))
        # Every image storage SOP class pydicom knows has "Image Storage" in
        # its name; SR, RT Dose/Plan/Structure Set, Segmentation, presentation
        # states, encapsulated PDF, waveforms etc. do not.
        if uid.type == "SOP Class" and "Image Storage" not in uid.name:
            raise InputError(path, f"not an image: {uid.name}")
    if "PixelData" not in ds:
        what = _sop_class_name(ds) or "unknown SOP class"
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError(
                path, f"not an image: float pixel data is not supported ({what})"
            )
        raise InputError(
            path,
            f"not an image: {what} has no Pixel Data element (or the file is "
            "truncated before it)",
        )

    try:
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"corrupt image header: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric and samples == 1:
        # Some ACR-NEMA files omit it; greyscale with black = 0 is the norm.
        photometric = "MONOCHROME2"
        ds.PhotometricInterpretation = photometric
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            path,
            f"colour image not supported (Samples per Pixel {samples}, "
            f"Photometric Interpretation {photometric or 'missing'}); expected "
            "a greyscale MONOCHROME1 or MONOCHROME2 radiograph",
        )
    if frames > 1:
        raise InputError(
            path,
            f"multi-frame image ({frames} frames) not supported; expected a "
            "single radiograph",
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if keyword not in ds:
            raise InputError(path, f"corrupt image header: {keyword} missing")
    return photometric


def ensure_transfer_syntax(ds: Dataset, path: Path) -> tuple[UID, bool]:
    """Return (transfer syntax, inferred?), deriving it without file meta.

    pydicom needs (0002,0010) Transfer Syntax UID to decode pixel data. Legacy
    files lack it; the encoding pydicom detected while parsing (implicit or
    explicit VR, byte order) then identifies the native transfer syntax.
    """
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        return UID(str(tsyntax)), False

    if ds["PixelData"].is_undefined_length:
        # Encapsulated (compressed) data: the codec cannot be guessed.
        raise InputError(
            path,
            "compressed (encapsulated) pixel data but no Transfer Syntax UID "
            "in the file meta information; cannot tell which codec to use",
        )
    is_implicit, is_little = ds.original_encoding
    if is_implicit and is_little:
        tsyntax = ImplicitVRLittleEndian
    elif is_implicit is False and is_little:
        tsyntax = ExplicitVRLittleEndian
    elif is_implicit is False and is_little is False:
        tsyntax = ExplicitVRBigEndian
    else:
        raise InputError(
            path,
            "cannot determine the transfer syntax (no file meta information "
            f"and unsupported encoding implicit={is_implicit}, "
            f"little_endian={is_little})",
        )
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    return tsyntax, True


def _decode_pixels(ds: Dataset, tsyntax: UID, path: Path) -> np.ndarray:
    """Decode the stored values to an integer array of shape (Rows, Columns)."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise InputError(
            path,
            f"unsupported transfer syntax {tsyntax.name} ({tsyntax}) for pixel data",
        ) from None
    if not decoder.is_available:
        package = _DECODER_PACKAGES.get(str(tsyntax), "a pydicom pixel decoder plugin")
        raise InputError(
            path,
            f"cannot decode {tsyntax.name} pixel data: no decoder installed; "
            f"install {package}",
        )

    if not tsyntax.is_encapsulated:
        # pydicom reads a short value without complaint; check before numpy
        # gets a buffer of the wrong size.
        expected = get_expected_length(ds, "bytes")
        actual = len(ds.PixelData)
        if actual < expected:
            raise InputError(
                path,
                f"truncated or corrupt: Pixel Data has {actual} bytes but "
                f"{expected} are needed for {ds.Rows}x{ds.Columns} pixels at "
                f"{ds.BitsAllocated} bits allocated",
            )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # decoder / numpy errors on damaged data
        raise InputError(
            path,
            f"cannot decode {tsyntax.name} pixel data, file may be truncated or "
            f"corrupt ({type(exc).__name__}: {exc})",
        ) from exc
    expected_shape = (int(ds.Rows), int(ds.Columns))
    if arr.shape != expected_shape:
        raise InputError(
            path,
            f"corrupt pixel data: decoded shape {arr.shape}, header says "
            f"{expected_shape}",
        )
    return arr


def _apply_luts(
    stored: np.ndarray, ds: Dataset, apply_voi: bool
) -> tuple[np.ndarray, str]:
    """Apply Modality LUT, then VOI LUT / window when wanted and present.

    Returns:
        (values, voi_note): values of shape (Rows, Columns); voi_note says
        what VOI step was done ("none", "window C/W", "VOI LUT", "skipped").
    """
    values = apply_modality_lut(stored, ds)

    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return values, "none"
    if not apply_voi:
        return values, "not applied (apply_voi=False)"
    try:
        with warnings.catch_warnings():
            # pydicom warns when a VOI LUT meets float (rescaled) input; the
            # LUT indexing still uses the integer values.
            warnings.simplefilter("ignore")
            windowed = apply_voi_lut(values, ds)
    except (ValueError, NotImplementedError, IndexError, TypeError) as exc:
        # A bad window should not make a readable image unusable.
        return values, f"skipped (invalid VOI: {exc})"
    if has_lut:
        return windowed, "VOI LUT"
    center = _first_value(ds.get("WindowCenter"))
    width = _first_value(ds.get("WindowWidth"))
    return windowed, f"window {center:g}/{width:g}"


def _first_value(value: Any) -> float:
    """First value of a possibly multi-valued DS element, as float."""
    if isinstance(value, MultiValue):
        value = value[0]
    return float(value)


def _spacing_from(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """(row, column) spacing in mm from a 2-valued DS element, if usable."""
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return None
    return (row, col)


def _spacing(ds: Dataset, options: ReadOptions) -> tuple[tuple[float, float], str]:
    """Pixel spacing in mm and where it came from.

    Pixel Spacing (calibrated to the patient) wins over Imager Pixel Spacing
    (at the detector, includes geometric magnification); without either the
    caller's default applies.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _spacing_from(ds, keyword)
        if spacing is not None:
            return spacing, keyword
    default = float(options.pixel_spacing_mm)
    return (default, default), "default"


def _extra_metadata(
    ds: Dataset, tsyntax: UID, photometric: str, voi_note: str
) -> dict[str, Any]:
    """Non-identifying metadata only: UIDs, modality and pixel encoding."""
    extra: dict[str, Any] = {}
    for key, keyword in (
        ("study_instance_uid", "StudyInstanceUID"),
        ("series_instance_uid", "SeriesInstanceUID"),
        ("sop_instance_uid", "SOPInstanceUID"),
        ("sop_class_uid", "SOPClassUID"),
        ("modality", "Modality"),
        ("view_position", "ViewPosition"),
    ):
        value = ds.get(keyword)
        if value:
            extra[key] = str(value).strip()
    if "sop_class_uid" in extra:
        extra["sop_class_name"] = UID(extra["sop_class_uid"]).name
    extra["bits_stored"] = int(ds.BitsStored)
    extra["pixel_representation"] = int(ds.get("PixelRepresentation", 0))
    extra["transfer_syntax"] = str(tsyntax)
    extra["transfer_syntax_name"] = tsyntax.name
    extra["photometric_interpretation"] = photometric
    extra["voi"] = voi_note
    return extra


__all__ = ["read_dicom"]
