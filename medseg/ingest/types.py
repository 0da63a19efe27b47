"""The common result of reading any supported radiograph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class IngestedImage:
    """A radiograph read from disk, in display polarity.

    Attributes:
        pixels: float32 array of shape (H, W). "Black is zero": bone and
            mediastinum are bright, air is dark (DICOM MONOCHROME2 sense).
            Modality LUT (and VOI LUT / window where the file has one) applied.
        spacing_mm: (row spacing, column spacing) in millimetres.
        spacing_source: where the spacing came from, e.g. "PixelSpacing",
            "ImagerPixelSpacing", "JSRT", "config", "default".
        source: path of the file read.
        source_format: "dicom", "jsrt", or "raster".
        photometric: photometric handling applied, e.g. "MONOCHROME1 (inverted)",
            "MONOCHROME2", "white-is-zero (inverted)".
        case_id: identifier safe to use in output names and logs. Never holds
            patient-identifying fields.
        extra: further non-identifying metadata (e.g. DICOM UIDs for SEG
            references, bits stored, transfer syntax).
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float]
    spacing_source: str
    source: str
    source_format: str
    photometric: str
    case_id: str
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """Original (rows, columns)."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


@dataclass(frozen=True)
class ReadOptions:
    """How to read formats that do not carry their own metadata.

    Attributes:
        invert: for PNG/JPEG/TIFF: True when the file is stored white-is-zero
            (bone dark), as the shared JSRT PNGs are.
        pixel_spacing_mm: spacing for formats without one (PNG/JPEG/TIFF) and
            the fallback for DICOM files that lack PixelSpacing and
            ImagerPixelSpacing.
        apply_voi: apply the DICOM VOI LUT / window when the file has one.
    """

    invert: bool = False
    pixel_spacing_mm: float = 1.0
    apply_voi: bool = True
