"""The common result of reading any supported radiograph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Where a pixel spacing holds (IngestedImage.spacing_plane).
SPACING_PLANES: tuple[str, ...] = ("patient", "detector", "unknown", "default")

# The spacing used for a file that carries none (PNG / JPEG / TIFF, a DICOM
# file without any pixel spacing element) when none was given either.
DEFAULT_PIXEL_SPACING_MM = 1.0

# spacing_source of a spacing that did not come from the file:
# SPACING_GIVEN: given by the user (``--pixel-spacing``, ``read.pixel_spacing_mm``,
# ``ReadOptions(pixel_spacing_mm=...)``); SPACING_ASSUMED: nobody gave one,
# DEFAULT_PIXEL_SPACING_MM was assumed.
SPACING_GIVEN = "given"
SPACING_ASSUMED = "assumed"

# Planes of the spacing sources that do not say it themselves: "given" and
# "assumed" (and "config" / "default", their names in files written by
# earlier versions) are the fallback, no measurement behind it; JSRT's
# 0.175 mm is the pitch at which the films were digitised, i.e. at the film
# (detector) plane, not corrected for magnification.
_PLANE_OF_SOURCE: dict[str, str] = {SPACING_GIVEN: "default", SPACING_ASSUMED: "default", "config": "default",
                                    "default": "default", "JSRT": "detector"}


def plane_of_source(spacing_source: str) -> str:
    """The spacing plane implied by a ``spacing_source`` string.

    Used for readers that set no plane and for older prediction.json files
    written before the plane was recorded. DICOM sources are classified by
    the suffixes :mod:`medseg.ingest.dicom` writes ("(detector plane)", the
    magnification corrections, the calibration types).

    Returns:
        One of :data:`SPACING_PLANES`; "unknown" for anything unrecognised.
    """
    source = str(spacing_source or "").strip()
    if source in _PLANE_OF_SOURCE:
        return _PLANE_OF_SOURCE[source]
    if source.endswith("(detector plane)"):
        return "detector"
    if source.startswith("ImagerPixelSpacing") or source.startswith("PixelSpacing ("):
        # Magnification-corrected Imager Pixel Spacing, or a calibrated
        # Pixel Spacing (GEOMETRY / FIDUCIAL).
        return "patient"
    return "unknown"


@dataclass
class IngestedImage:
    """A radiograph read from disk, in display polarity.

    It carries no case ID: what a scan is called depends on the other inputs
    of the run (``medseg.ingest.inputs``), not on the file alone.

    Attributes:
        pixels: float32 array of shape (H, W). "Black is zero": bone and
            mediastinum are bright, air is dark (DICOM MONOCHROME2 sense).
            Modality LUT (and VOI LUT / window where the file has one) applied.
        spacing_mm: (row spacing, column spacing) in millimetres.
        spacing_source: where the spacing came from: from the file's
            metadata, e.g. "PixelSpacing", "ImagerPixelSpacing /
            EstimatedRadiographicMagnificationFactor", "ImagerPixelSpacing
            (detector plane)" (the DICOM values are listed in
            :mod:`medseg.ingest.dicom`, ``SPACING_SOURCES``), "JSRT" (the
            format's fixed pitch); or not from the file: "given"
            (:data:`SPACING_GIVEN`, ``ReadOptions.pixel_spacing_mm`` as the
            user set it) or "assumed" (:data:`SPACING_ASSUMED`, nobody gave
            one: :data:`DEFAULT_PIXEL_SPACING_MM`). Files written by earlier
            versions say "config" for "given" and "default" for either.
        source: path of the file read.
        source_format: "dicom", "jsrt", or "raster".
        photometric: photometric handling applied, e.g. "MONOCHROME1 (inverted)",
            "MONOCHROME2", "white-is-zero (inverted)".
        extra: further non-identifying metadata (e.g. DICOM UIDs for SEG
            references, bits stored, transfer syntax).
        spacing_plane: where ``spacing_mm`` holds, one of
            :data:`SPACING_PLANES`: "patient" (calibrated or corrected for
            geometric magnification), "detector" (pixel pitch at the
            detector / film: objects in the patient look larger by the
            magnification factor, typically 5-20 % in width on a PA chest
            film), "unknown" (the file does not say) or "default" (the
            configured fallback, no measurement behind it). Left empty, it is
            derived from ``spacing_source`` by :func:`plane_of_source`.
        padding: bool (H, W), True where a pixel is padding (DICOM Pixel
            Padding Value / Range Limit), to be left out of intensity
            statistics; None when the file declares no padding.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float]
    spacing_source: str
    source: str
    source_format: str
    photometric: str
    extra: dict = field(default_factory=dict)
    spacing_plane: str = ""
    padding: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.spacing_plane:
            self.spacing_plane = plane_of_source(self.spacing_source)
        if self.spacing_plane not in SPACING_PLANES:
            raise ValueError(f"spacing_plane must be one of {SPACING_PLANES}, got {self.spacing_plane!r}")
        if self.padding is not None:
            self.padding = np.asarray(self.padding, dtype=bool)
            if self.padding.shape != self.pixels.shape:
                raise ValueError(f"padding mask {self.padding.shape} does not match pixels {self.pixels.shape}")

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
            the fallback for DICOM files that lack Pixel Spacing, Imager
            Pixel Spacing and Nominal Scanned Pixel Spacing (reported with
            spacing_source "given" and spacing_plane "default"); None when
            the user gave none: :data:`DEFAULT_PIXEL_SPACING_MM` is then
            assumed (spacing_source "assumed").
        apply_voi: apply the DICOM VOI LUT / window when the file has one.
    """

    invert: bool = False
    pixel_spacing_mm: float | None = None
    apply_voi: bool = True

    def fallback_spacing(self) -> tuple[float, str]:
        """The spacing for a file that has none of its own, and its spacing_source.

        Returns:
            (``pixel_spacing_mm``, "given") when it was set, else
            (:data:`DEFAULT_PIXEL_SPACING_MM`, "assumed").
        """
        if self.pixel_spacing_mm is None:
            return DEFAULT_PIXEL_SPACING_MM, SPACING_ASSUMED
        return float(self.pixel_spacing_mm), SPACING_GIVEN


def assumed_spacing_warning(count: int, total: int) -> str:
    """The batch's one warning about inputs read with the assumed spacing.

    Args:
        count: inputs whose spacing_source is "assumed" (> 0).
        total: inputs read.

    Returns:
        A sentence naming how many, the millimetres assumed and how to set
        the true spacing.
    """
    return (f"{count} of {total} input{'s' if total != 1 else ''} had no pixel spacing (PNG / JPEG / TIFF carry "
            "none; DICOM without Pixel Spacing, Imager Pixel Spacing or Nominal Scanned Pixel Spacing) and none "
            f"was given: {DEFAULT_PIXEL_SPACING_MM:.1f} mm was assumed (spacing_source 'assumed'), so their sizes in "
            "mm are wrong unless that is their true spacing, and a chest film digitised at 0.1-0.4 mm is then "
            "flagged not_frontal_chest; `--pixel-spacing MM` (read.pixel_spacing_mm in a workflow config) sets it")
