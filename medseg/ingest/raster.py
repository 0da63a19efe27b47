"""PNG / JPEG / TIFF radiographs (8 or 16 bit) read with Pillow.

These formats carry no polarity or spacing, so both come from ReadOptions
(the shared JSRT PNGs, for example, are white-is-zero at 0.35 mm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg.errors import InputError
from medseg.ingest.types import IngestedImage, ReadOptions


def read_grayscale_raster(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a single-channel raster.

    Returns:
        (array (H, W) as stored, bit depth: 8, 16 or 32).

    Raises:
        InputError: unreadable, colour, or multi-page files.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(path, f"multi-frame image ({img.n_frames} frames): one radiograph per file is expected")
            mode = img.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(img.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise InputError(path, f"colour image (mode {mode}): radiographs must be greyscale")
                return rgb[..., 0].copy(), 8
            array = np.asarray(img)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(path, f"unreadable image: {err}") from err
    if array.ndim != 2:
        raise InputError(path, f"expected a 2-D greyscale image, got shape {array.shape}")
    bits = {1: 8, 2: 16, 4: 32}.get(array.dtype.itemsize, 8)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return array, bits


def read_raster(path: str | Path, options: ReadOptions) -> IngestedImage:
    """Read a PNG / JPEG / TIFF radiograph.

    Returns:
        float32 (H, W) in display polarity (inverted when ``options.invert``),
        spacing ``options.pixel_spacing_mm`` on both axes.
    """
    path = Path(path)
    stored, bits = read_grayscale_raster(path)
    pixels = stored.astype(np.float32)
    if options.invert:
        # Invert over the format's full range so the result does not depend on
        # the image's content.
        max_value = float((1 << bits) - 1) if bits < 32 else float(pixels.max())
        pixels = max_value - pixels
    spacing = float(options.pixel_spacing_mm)
    return IngestedImage(
        pixels=pixels,
        spacing_mm=(spacing, spacing),
        spacing_source="config",
        source=str(path),
        source_format="raster",
        photometric="white-is-zero (inverted)" if options.invert else "black-is-zero",
        case_id=path.stem,
        extra={"bits": bits},
    )
