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

# The Media Storage SOP Class of a DICOMDIR (PS3.4 Annex F, PS3.10 8.6).
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"

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
            the file has no pixel spacing element at all (None: 1.0 mm
            assumed, spacing_source "assumed").

    Returns:
        IngestedImage with ``pixels`` float32 of shape (Rows, Columns) in
        modality units (or VOI output units when a window/VOI LUT was
        applied), ``spacing_mm`` = (row spacing, column spacing) in mm with
        ``spacing_source`` / ``spacing_plane`` saying where it came from and
        where it holds (see :func:`_spacing`), ``padding`` = bool (Rows,
        Columns) mask of Pixel Padding Value pixels or None, ``case_id`` =
        file stem and non-identifying metadata in ``extra`` (including
        ``spacing_note`` / ``padding_note`` when an element was ignored).

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

    # Padding is defined on the stored values, before the Modality LUT and
    # before any inversion (PS3.3 C.7.5.1.1.2): a mask of pixel positions
    # taken here stays right whatever the later steps do to the values.
    padding, padding_note = _padding_mask(ds, stored)

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

    spacing, spacing_source, spacing_plane, spacing_note = _spacing(ds, options)
    extra = _extra_metadata(ds, tsyntax, photometric, voi_note)
    # True for legacy ACR-NEMA style files that carry no file meta.
    extra["transfer_syntax_inferred"] = inferred
    if spacing_note:
        extra["spacing_note"] = spacing_note
    if padding is not None:
        extra["padding_pixels"] = int(padding.sum())
    if padding_note:
        extra["padding_note"] = padding_note

    return IngestedImage(
        pixels=pixels,
        spacing_mm=spacing,
        spacing_source=spacing_source,
        source=str(path),
        source_format="dicom",
        photometric=photometric_note,
        extra=extra,
        spacing_plane=spacing_plane,
        padding=padding,
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
    media = str(getattr(ds, "file_meta", None) and ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if media == MEDIA_STORAGE_DIRECTORY_STORAGE:
        raise InputError(path, "not an image: DICOMDIR, the directory of a DICOM file-set (give its folder: "
                               "the images in it are read and the DICOMDIR skipped)")
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


def is_image_sop_class(sop_class_uid: str) -> bool:
    """False for SOP classes known not to be images; True otherwise.

    Every image storage SOP class pydicom knows has "Image Storage" in its
    name; SR, RT Dose/Plan/Structure Set, Segmentation, presentation states,
    encapsulated PDF, waveforms, DICOMDIR etc. do not. Unknown (private)
    UIDs are given the benefit of the doubt: reading them says more.
    """
    uid = UID(str(sop_class_uid).strip())
    return not (uid.type == "SOP Class" and "Image Storage" not in uid.name)


def _check_single_grey_image(ds: Dataset, path: Path) -> str:
    """Refuse non-images, colour and multi-frame; return the photometric.

    Returns:
        "MONOCHROME1" or "MONOCHROME2".
    """
    sop = ds.get("SOPClassUID")
    if sop and not is_image_sop_class(str(sop)):
        raise InputError(path, f"not an image: {UID(str(sop)).name}")
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


# spacing_source values written by _spacing, with the plane each implies.
SPACING_SOURCES: dict[str, str] = {
    "PixelSpacing (GEOMETRY)": "patient",
    "PixelSpacing (FIDUCIAL)": "patient",
    "PixelSpacing": "patient or unknown (see _spacing)",
    "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor": "patient",
    "ImagerPixelSpacing x DistanceSourceToPatient / DistanceSourceToDetector": "patient",
    "ImagerPixelSpacing (detector plane)": "detector",
    "NominalScannedPixelSpacing (detector plane)": "detector",
    "given": "default",  # none in the file: the user's ReadOptions.pixel_spacing_mm
    "assumed": "default",  # none in the file, none given: DEFAULT_PIXEL_SPACING_MM
}

_CALIBRATION_TYPES = ("GEOMETRY", "FIDUCIAL")  # PS3.3 10.7.1.2, enumerated values


def _same_spacing(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Equal up to DS rounding (PS3.3 10.7.1.1 compares the values)."""
    return all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a, b))


def _number(ds: Dataset, keyword: str) -> tuple[float | None, str]:
    """(value, raw text) of a single-valued numeric element; value None when
    absent, empty or not a finite number (raw text then says what was there)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None, ""
    try:
        number = _first_value(value)
    except (TypeError, ValueError, IndexError):
        return None, str(value)
    return (number if math.isfinite(number) else None), str(value)


def _magnification(ds: Dataset) -> tuple[float | None, str, list[str]]:
    """Geometric magnification at the patient, SID / SOD, and its source.

    Estimated Radiographic Magnification Factor (0018,1114) first; else
    Distance Source to Detector (0018,1110) / Distance Source to Patient
    (0018,1111) (DX Positioning Module, PS3.3 C.8.11.5, and XRF Positioner
    Module, C.8.7.6: the factor is the ratio SID / SOD). A source cannot
    be nearer the detector than the patient, so factors below 1 (SID < SOD)
    and non-positive or non-finite values are rejected with a note.

    Returns:
        (factor or None, spacing_source for it, notes on rejected values).
    """
    notes: list[str] = []
    ermf, raw = _number(ds, "EstimatedRadiographicMagnificationFactor")
    if ermf is not None and ermf >= 1.0:
        return ermf, "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor", notes
    if raw:
        notes.append(f"Estimated Radiographic Magnification Factor {raw!r} ignored (needs a finite number >= 1)")
    sid, raw_sid = _number(ds, "DistanceSourceToDetector")
    sod, raw_sod = _number(ds, "DistanceSourceToPatient")
    if sid is not None and sod is not None and sod > 0 and sid >= sod:
        return sid / sod, "ImagerPixelSpacing x DistanceSourceToPatient / DistanceSourceToDetector", notes
    if raw_sid and raw_sod:
        notes.append(
            f"Distance Source to Detector {raw_sid!r} / Distance Source to Patient {raw_sod!r} ignored "
            "(both must be finite and > 0, with the detector no nearer than the patient)"
        )
    return None, "", notes


def _spacing(ds: Dataset, options: ReadOptions) -> tuple[tuple[float, float], str, str, str]:
    """Pixel spacing in mm at the patient where the file allows, and its provenance.

    The rule for projection radiographs (PS3.3 10.7.1.1-10.7.1.3, DX
    Detector C.8.11.4, CR Image C.8.1.2, DX Positioning C.8.11.5):

    1. Pixel Spacing (0028,0030), "physical distance in the Patient", when
       present and calibrated:

       - with Pixel Spacing Calibration Type (0028,0A02) GEOMETRY or
         FIDUCIAL -> "PixelSpacing (GEOMETRY)" / "(FIDUCIAL)", plane
         "patient";
       - without it, but different from Imager Pixel Spacing (0018,1164) /
         Nominal Scanned Pixel Spacing (0018,2010): 10.7.1.1 says the image
         has then been corrected or calibrated -> "PixelSpacing", "patient";
       - without either of those to compare with: 10.7.1.1 says it cannot
         be determined -> "PixelSpacing", "unknown";
       - equal to Imager Pixel Spacing without a calibration type: by
         10.7.1.1 not calibrated (a detector-plane value copied over), so
         it is handled as Imager Pixel Spacing alone, below (the
         magnification correction then still applies); noted.

    2. Imager Pixel Spacing (at the front plane of the detector, never
       corrected for magnification) divided by the magnification factor
       (:func:`_magnification`): "ImagerPixelSpacing /
       EstimatedRadiographicMagnificationFactor" or "ImagerPixelSpacing x
       DistanceSourceToPatient / DistanceSourceToDetector", plane "patient"
       (strictly, the plane of the isocentre / centre of the field of view).
    3. Imager Pixel Spacing as it is -> "ImagerPixelSpacing (detector
       plane)", "detector"; then Nominal Scanned Pixel Spacing (film
       digitiser pitch) -> "NominalScannedPixelSpacing (detector plane)".
    4. ``options.pixel_spacing_mm`` -> "given", "default"; when that is
       None, 1.0 mm -> "assumed", "default"
       (:meth:`~medseg.ingest.types.ReadOptions.fallback_spacing`).

    An unknown calibration type is ignored (noted); invalid spacings (not
    two finite numbers > 0) count as absent.

    Returns:
        ((row, column) spacing in mm, spacing_source (a key of
        :data:`SPACING_SOURCES`), plane ("patient", "detector", "unknown",
        "default"), note: "" or why an element present was not used).
    """
    notes: list[str] = []
    pixel = _spacing_from(ds, "PixelSpacing")
    imager = _spacing_from(ds, "ImagerPixelSpacing")
    scanned = _spacing_from(ds, "NominalScannedPixelSpacing")
    detector = imager if imager is not None else scanned

    if pixel is not None:
        calibration = str(ds.get("PixelSpacingCalibrationType", "") or "").strip().upper()
        if calibration in _CALIBRATION_TYPES:
            return pixel, f"PixelSpacing ({calibration})", "patient", ""
        if calibration:
            notes.append(f"unknown Pixel Spacing Calibration Type {calibration!r} ignored")
        if detector is None:
            return pixel, "PixelSpacing", "unknown", "; ".join(notes)
        if not _same_spacing(pixel, detector):
            return pixel, "PixelSpacing", "patient", "; ".join(notes)
        notes.append("Pixel Spacing equals the detector pixel spacing and has no calibration type: "
                     "not calibrated (PS3.3 10.7.1.1)")

    if imager is not None:
        factor, source, why = _magnification(ds)
        notes += why
        if factor is not None:
            return (imager[0] / factor, imager[1] / factor), source, "patient", "; ".join(notes)
        return imager, "ImagerPixelSpacing (detector plane)", "detector", "; ".join(notes)
    if scanned is not None:
        return scanned, "NominalScannedPixelSpacing (detector plane)", "detector", "; ".join(notes)
    default, source = options.fallback_spacing()
    return (default, default), source, "default", "; ".join(notes)


def _padding_value(ds: Dataset, keyword: str) -> int | None:
    """A Pixel Padding element as a stored pixel value (US or SS by Pixel
    Representation; raw bytes when pydicom left the ambiguous VR open)."""
    value = ds.get(keyword)
    if value is None or value == "" or value == b"":
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if isinstance(value, (bytes, bytearray)):
        little = ds.original_encoding[1] is not False
        return int.from_bytes(bytes(value[:2]), "little" if little else "big", signed=signed)
    try:
        number = int(_first_value(value))
    except (TypeError, ValueError, IndexError):
        return None
    bits = int(ds.get("BitsAllocated", 16))
    if signed and number >= 1 << (bits - 1):
        number -= 1 << bits  # read as US, meant as SS
    return number


def _padding_mask(ds: Dataset, stored: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Which pixels are padding, from the stored values (PS3.3 C.7.5.1.1.2).

    Pixel Padding Value (0028,0120) alone marks the pixels equal to it; with
    Pixel Padding Range Limit (0028,0121) every stored value between the two
    (inclusive, in either order: MONOCHROME1 puts the value above the limit)
    is padding. Both are stored pixel values, before the Modality LUT.

    Returns:
        (bool (Rows, Columns) mask, True = padding, or None when the file
        declares no padding or no pixel matches; note: "" or why the
        elements were ignored, e.g. when every pixel would be padding).
    """
    value = _padding_value(ds, "PixelPaddingValue")
    if value is None:
        return None, ""
    limit = _padding_value(ds, "PixelPaddingRangeLimit")
    if limit is None:
        mask = stored == value
        what = f"Pixel Padding Value {value}"
    else:
        lo, hi = min(value, limit), max(value, limit)
        mask = (stored >= lo) & (stored <= hi)
        what = f"Pixel Padding Value/Range Limit {value}/{limit}"
    if not mask.any():
        return None, ""
    if mask.all():
        return None, f"{what} ignored: it matches every pixel"
    return mask, ""


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
