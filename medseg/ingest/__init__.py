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
        medseg.errors.InputError: naming the file and the problem.
    """
    options = options or ReadOptions()
    from medseg.errors import InputError

    try:
        if Path(path).stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes): incomplete copy or download?")
    except OSError:
        pass  # the reader names the problem (missing, not a file)
    fmt = image_format(path)
    if fmt == "jsrt":
        from medseg.ingest.jsrt import read_jsrt

        return read_jsrt(path)
    if fmt == "raster":
        from medseg.ingest.raster import read_raster

        return read_raster(path, options)
    from medseg.ingest.dicom import read_dicom

    return read_dicom(path, options)


__all__ = ["IngestedImage", "ReadOptions", "image_format", "load_image"]
