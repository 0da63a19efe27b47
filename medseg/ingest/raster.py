"""PNG / JPEG / TIFF radiographs (8 or 16 bit), masks and label images read
with Pillow.

These formats carry no polarity or spacing, so both come from ReadOptions
(the shared JSRT PNGs, for example, are white-is-zero at 0.35 mm).

Orientation: a file with an EXIF Orientation tag (JPEG, PNG eXIf chunk, TIFF
Orientation tag, XMP ``tiff:Orientation``) is shown upright by every viewer,
so it is read upright here too: the stored pixels are turned / mirrored as
the tag says (``PIL.ImageOps.exif_transpose``) and the tag value is recorded
(:attr:`RasterPixels.exif_orientation`; for radiographs
``IngestedImage.extra["exif_orientation"]`` and a note in
``IngestedImage.photometric``). Masks and label images get the same
treatment: they are drawn and checked in a viewer, so a mask tagged
Orientation 6 belongs to the image as the viewer shows it.

Palettes: a palette ("P") radiograph or mask is read through its palette
colours, i.e. as a viewer shows it (a grey palette is a greyscale picture).
A palette *label image* is read by index: the index is the label value and
the palette only a display aid (often grey 50*i, or arbitrary colours).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from medseg.errors import InputError
from medseg.ingest.types import IngestedImage, ReadOptions

RasterKind = Literal["radiograph", "mask", "label image"]
RASTER_KINDS: tuple[str, ...] = ("radiograph", "mask", "label image")

# EXIF Orientation value -> what reading applies to the stored pixels so that
# they come out as a viewer shows them (EXIF 2.3, TIFF 6.0 tag 274).
EXIF_ORIENTATIONS: dict[int, str] = {
    1: "upright as stored",
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "transposed (mirrored about the main diagonal)",
    6: "rotated 90 degrees clockwise",
    7: "transversed (mirrored about the anti-diagonal)",
    8: "rotated 90 degrees counter-clockwise",
}

# Modes read through a colour conversion (and refused unless grey). "P"/"PA"
# are in it for radiographs and masks only; label images read them by index.
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB")

_COLOUR_PROBLEM: dict[str, str] = {
    "radiograph": "colour image (mode {mode}): radiographs must be greyscale",
    "mask": "colour image (mode {mode}): masks must be greyscale, 0 outside the structure and 255 (or 1) inside",
    "label image": (
        "colour label image (mode {mode}): a label image must hold one integer value per structure "
        "(greyscale or palette indices, e.g. 0 background, 1 heart, 2 left lung), mapped to structures "
        "by the label values (--label-values); colour-coded labels cannot be read"
    ),
}


@dataclass(frozen=True)
class RasterPixels:
    """One raster file's pixels as :func:`read_raster_pixels` returns them.

    Attributes:
        array: (H, W) upright (EXIF orientation applied), values as stored:
            uint8, uint16 (16-bit PNG / TIFF), int32 or float32 (32-bit TIFF);
            mode "1" becomes uint8 0/255; label images in palette mode hold
            the palette indices.
        bits: 8, 16 or 32.
        mode: the Pillow mode of the file ("L", "I;16", "P", "RGB", ...).
        exif_orientation: the file's EXIF Orientation value (1..8, applied),
            or None when it has none (or an invalid one, which viewers
            ignore too).
    """

    array: np.ndarray
    bits: int
    mode: str
    exif_orientation: int | None


def orientation_note(orientation: int | None) -> str:
    """Human-readable note for an applied EXIF orientation, "" for none / 1.

    E.g. ``"EXIF orientation 6 applied (rotated 90 degrees clockwise)"``.
    """
    if orientation is None or orientation == 1:
        return ""
    return f"EXIF orientation {orientation} applied ({EXIF_ORIENTATIONS[orientation]})"


def _exif_orientation(img: Image.Image) -> int | None:
    """The Orientation tag (1..8) of an opened, not yet loaded image.

    Read before loading: Pillow applies a TIFF's orientation itself when
    loading and then deletes the tag.
    """
    try:
        value = img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block has no usable orientation; viewers skip it too
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    return value if value in EXIF_ORIENTATIONS else None


def read_raster_pixels(path: str | Path, what: RasterKind = "radiograph") -> RasterPixels:
    """Read a single-channel raster upright, as a viewer shows it.

    Args:
        path: PNG / JPEG / TIFF / GIF / BMP file.
        what: what the file holds: "radiograph" or "mask" (palette images
            read through their palette colours) or "label image" (palette
            images read by index). Also names the file's role in errors.

    Returns:
        :class:`RasterPixels`: (H, W) array upright, bit depth, mode, and the
        EXIF orientation applied.

    Raises:
        InputError: unreadable, colour (palette colours that are not grey
            count as colour except for label images), or multi-page files.
        ValueError: ``what`` is not one of :data:`RASTER_KINDS`.
    """
    if what not in RASTER_KINDS:
        raise ValueError(f"what must be one of {RASTER_KINDS}, got {what!r}")
    path = Path(path)
    try:
        # Opened from a file object, not by path: Pillow (13.0) memory-maps an
        # uncompressed TIFF opened by path and then lays out one with
        # Orientation 5-8 at the turned size, scrambling its pixels.
        with open(path, "rb") as fh, Image.open(fh) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(path, f"multi-frame image ({img.n_frames} frames): one {what} per file is expected")
            mode = img.mode
            orientation = _exif_orientation(img)
            img.load()
            if orientation not in (None, 1):
                # A TIFF is already upright after load() (Pillow applies its
                # tag and drops it), so this is then a no-op.
                ImageOps.exif_transpose(img, in_place=True)
            if what == "label image" and mode in ("P", "PA"):
                array = np.asarray(img)
                if array.ndim == 3:  # PA: (index, alpha)
                    array = array[..., 0]
                return RasterPixels(array.copy(), 8, mode, orientation)
            if mode in _COLOUR_MODES:
                rgb = np.asarray(img.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise InputError(path, _COLOUR_PROBLEM[what].format(mode=mode))
                return RasterPixels(rgb[..., 0].copy(), 8, mode, orientation)
            array = np.asarray(img)
    except InputError:
        raise
    except UnidentifiedImageError as err:  # its text is Pillow's file object's repr
        raise InputError(path, f"unreadable image: not an image file Pillow can decode "
                               f"(PNG, JPEG, TIFF, GIF, BMP) despite its name") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(path, f"unreadable image: {err}") from err
    if array.ndim != 2:
        raise InputError(path, f"expected a 2-D greyscale {what}, got shape {array.shape}")
    bits = {1: 8, 2: 16, 4: 32}.get(array.dtype.itemsize, 8)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return RasterPixels(array, bits, mode, orientation)


def read_grayscale_raster(path: str | Path, what: RasterKind = "radiograph") -> tuple[np.ndarray, int]:
    """Read a single-channel raster upright (see :func:`read_raster_pixels`).

    Returns:
        (array (H, W) upright, values as stored, bit depth: 8, 16 or 32).

    Raises:
        InputError: unreadable, colour, or multi-page files.
    """
    pixels = read_raster_pixels(path, what)
    return pixels.array, pixels.bits


def read_raster(path: str | Path, options: ReadOptions) -> IngestedImage:
    """Read a PNG / JPEG / TIFF radiograph.

    Returns:
        float32 (H, W) upright (EXIF orientation applied) in display polarity
        (inverted when ``options.invert``), spacing
        ``options.pixel_spacing_mm`` on both axes (spacing_source "given"),
        or 1.0 mm when that is None (spacing_source "assumed": the file has
        no spacing and none was given; see
        :meth:`ReadOptions.fallback_spacing`). ``extra`` holds "bits" and,
        for a file with an EXIF Orientation tag, "exif_orientation" (1..8);
        an orientation other than 1 is also noted in ``photometric``, e.g.
        "black-is-zero; EXIF orientation 6 applied (rotated 90 degrees
        clockwise)".

    Raises:
        InputError: see :func:`read_raster_pixels`.
    """
    path = Path(path)
    raster = read_raster_pixels(path, "radiograph")
    bits = raster.bits
    pixels = raster.array.astype(np.float32)
    if options.invert:
        # Invert over the format's full range so the result does not depend on
        # the image's content.
        max_value = float((1 << bits) - 1) if bits < 32 else float(pixels.max())
        pixels = max_value - pixels
    spacing, spacing_source = options.fallback_spacing()
    photometric = "white-is-zero (inverted)" if options.invert else "black-is-zero"
    extra: dict = {"bits": bits}
    if raster.exif_orientation is not None:
        extra["exif_orientation"] = raster.exif_orientation
    note = orientation_note(raster.exif_orientation)
    if note:
        # photometric is what the manifest and `medseg ingest` report about
        # how the pixels were read: a turned image must show there.
        photometric = f"{photometric}; {note}"
    return IngestedImage(
        pixels=pixels,
        spacing_mm=(spacing, spacing),
        spacing_source=spacing_source,
        source=str(path),
        source_format="raster",
        photometric=photometric,
        extra=extra,
    )
