"""JSRT ``.IMG``: headerless 2048x2048 big-endian uint16, 12 bits used.

JSRT stores "white is zero" (high value = high optical density, so bone is
dark); the reader inverts to display polarity. Pixel size 0.175 mm: the
pitch at which the films were digitised, so it holds at the film (detector)
plane and includes the geometric magnification of the chest; the images are
read with spacing_plane "detector".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.ingest.types import IngestedImage

JSRT_SHAPE = (2048, 2048)
JSRT_BITS = 12
JSRT_SPACING_MM = 0.175
JSRT_BYTES = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2


def read_jsrt(path: str | Path) -> IngestedImage:
    """Read a JSRT ``.IMG`` file.

    Returns:
        float32 (2048, 2048) in display polarity, values 0..4095, spacing
        (0.175, 0.175) mm.

    Raises:
        InputError: wrong file size or values beyond 12 bits.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from err
    if size != JSRT_BYTES:
        raise InputError(
            path,
            f"not a JSRT .IMG: expected {JSRT_BYTES} bytes "
            f"({JSRT_SHAPE[0]}x{JSRT_SHAPE[1]} 16-bit), found {size}",
        )
    stored = np.fromfile(path, dtype=">u2").reshape(JSRT_SHAPE)
    max_value = (1 << JSRT_BITS) - 1
    if int(stored.max()) > max_value:
        raise InputError(
            path, f"not a JSRT .IMG: values up to {int(stored.max())}, but JSRT uses 12 bits (0..{max_value})"
        )
    pixels = (max_value - stored.astype(np.float32)).astype(np.float32)
    return IngestedImage(
        pixels=pixels,
        spacing_mm=(JSRT_SPACING_MM, JSRT_SPACING_MM),
        spacing_source="JSRT",
        source=str(path),
        source_format="jsrt",
        photometric="white-is-zero (inverted)",
        extra={"bits_stored": JSRT_BITS},
        spacing_plane="detector",
    )
