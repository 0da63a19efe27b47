"""Read any supported radiograph or mask into a common form.

``load_image`` dispatches on the file: JSRT ``.IMG`` (headerless), PNG / JPEG /
TIFF, and everything else is tried as DICOM (DICOM files often have no
extension, and legacy ACR-NEMA files have no preamble).
"""

from __future__ import annotations

from pathlib import Path

from medseg.ingest.types import IngestedImage, ReadOptions

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp"}
JSRT_SUFFIXES = {".img"}


def image_format(path: str | Path) -> str:
    """Format read for ``path``: "jsrt", "raster" or "dicom"."""
    suffix = Path(path).suffix.lower()
    if suffix in JSRT_SUFFIXES:
        return "jsrt"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    return "dicom"


def load_image(path: str | Path, options: ReadOptions | None = None) -> IngestedImage:
    """Read one radiograph.

    Args:
        path: a DICOM file (any extension or none), a JSRT ``.IMG``, or a
            PNG / JPEG / TIFF.
        options: polarity and spacing for formats without metadata.

    Returns:
        The image in display polarity (bone bright) with spacing in mm.

    Raises:
        medseg.errors.InputError: naming the file and the problem (a file
            whose name says it is no image, e.g. ``notes.txt`` or
            ``Thumbs.db``, and that does not read as DICOM either, is
            refused as "not an image").
    """
    options = options or ReadOptions()
    from medseg.errors import InputError

    try:
        if Path(path).stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes): incomplete copy or download?")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError:
        pass  # the reader names the problem (not a file, no permission)
    fmt = image_format(path)
    if fmt == "jsrt":
        from medseg.ingest.jsrt import read_jsrt

        return read_jsrt(path)
    if fmt == "raster":
        from medseg.ingest.raster import read_raster

        return read_raster(path, options)
    from medseg.ingest.dicom import read_dicom

    try:
        return read_dicom(path, options)
    except InputError as err:
        from medseg.ingest.inputs import non_image_name_reason

        reason = non_image_name_reason(Path(path).name)
        if reason is None or err.problem.startswith("not an image"):
            raise
        raise InputError(path, f"not an image: {reason}; medseg reads DICOM (any extension or none), JSRT .IMG "
                               f"and PNG / JPEG / TIFF ({err.problem})") from err


__all__ = ["IngestedImage", "ReadOptions", "image_format", "load_image"]
