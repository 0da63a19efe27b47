"""Aspect-preserving resize + centred pad to a square, and its exact inverse.

Every preprocessed image records this geometry in the manifest, so that a
prediction at the training size maps back onto the original image.
Coordinates are pixel-centre based: pixel (r, c) covers [r, r+1) x [c, c+1)
and its centre is (r + 0.5, c + 0.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import Resize


@dataclass(frozen=True)
class ResizePadGeometry:
    """How an original (rows, cols) image sits in the preprocessed square.

    Attributes:
        original_shape: (H, W) of the source image, pixels.
        resized_shape: (h, w) after the aspect-preserving resize, pixels.
        pad_top, pad_left: zero padding before the resized image, pixels.
        size: side of the square output, pixels.
        original_spacing_mm: (row, col) spacing of the source image.
    """

    original_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    pad_top: int
    pad_left: int
    size: int
    original_spacing_mm: tuple[float, float]

    @classmethod
    def fit(cls, original_shape: tuple[int, int], spacing_mm: tuple[float, float], size: int) -> ResizePadGeometry:
        """Largest resize that fits ``size`` x ``size`` with square output pixels.

        Anisotropic input spacing is made isotropic: the physical extent, not
        the pixel count, keeps its aspect ratio.
        """
        rows, cols = int(original_shape[0]), int(original_shape[1])
        extent = (rows * float(spacing_mm[0]), cols * float(spacing_mm[1]))
        out_spacing = max(extent) / size
        resized = (
            min(size, max(1, round(extent[0] / out_spacing))),
            min(size, max(1, round(extent[1] / out_spacing))),
        )
        return cls(
            original_shape=(rows, cols),
            resized_shape=resized,
            pad_top=(size - resized[0]) // 2,
            pad_left=(size - resized[1]) // 2,
            size=int(size),
            original_spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1])),
        )

    @property
    def scale(self) -> tuple[float, float]:
        """(row, col) factor from original to preprocessed pixels."""
        return (
            self.resized_shape[0] / self.original_shape[0],
            self.resized_shape[1] / self.original_shape[1],
        )

    @property
    def preprocessed_spacing_mm(self) -> tuple[float, float]:
        """(row, col) spacing of preprocessed pixels (equal up to rounding)."""
        return (
            self.original_spacing_mm[0] / self.scale[0],
            self.original_spacing_mm[1] / self.scale[1],
        )

    def to_preprocessed(self, points_rc: np.ndarray) -> np.ndarray:
        """Map continuous (row, col) points, shape (N, 2), original -> preprocessed."""
        points = np.asarray(points_rc, dtype=np.float64)
        scale = np.array(self.scale)
        return points * scale + np.array([self.pad_top, self.pad_left])

    def to_original(self, points_rc: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_preprocessed`, shape (N, 2)."""
        points = np.asarray(points_rc, dtype=np.float64)
        scale = np.array(self.scale)
        return (points - np.array([self.pad_top, self.pad_left])) / scale

    def as_record(self) -> dict[str, float | int]:
        """Flat fields for the manifest."""
        record = asdict(self)
        rows, cols = record.pop("original_shape")
        rrows, rcols = record.pop("resized_shape")
        srow, scol = record.pop("original_spacing_mm")
        return {
            "original_rows": rows,
            "original_cols": cols,
            "spacing_row_mm": srow,
            "spacing_col_mm": scol,
            "resized_rows": rrows,
            "resized_cols": rcols,
            **record,
        }

    @classmethod
    def from_record(cls, record: dict) -> ResizePadGeometry:
        """Inverse of :meth:`as_record` (e.g. a manifest row)."""
        return cls(
            original_shape=(int(record["original_rows"]), int(record["original_cols"])),
            resized_shape=(int(record["resized_rows"]), int(record["resized_cols"])),
            pad_top=int(record["pad_top"]),
            pad_left=int(record["pad_left"]),
            size=int(record["size"]),
            original_spacing_mm=(float(record["spacing_row_mm"]), float(record["spacing_col_mm"])),
        )


def resize_channels(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize (C, H, W) float data to (C, *shape).

    Shrinking uses area averaging (no aliasing); enlarging uses bilinear
    interpolation, both through MONAI's Resize.
    """
    array = np.asarray(array, dtype=np.float32)
    if tuple(array.shape[1:]) == tuple(shape):
        return array.copy()
    shrinking = shape[0] * shape[1] < array.shape[1] * array.shape[2]
    resize = Resize(spatial_size=tuple(shape), mode="area" if shrinking else "bilinear",
                    align_corners=None if shrinking else False)
    out = resize(torch.from_numpy(np.ascontiguousarray(array)))
    return np.asarray(out, dtype=np.float32)


def to_preprocessed(array: np.ndarray, geometry: ResizePadGeometry, fill: float = 0.0) -> np.ndarray:
    """Resize and pad (C, H', W') data into the (C, size, size) square.

    ``H', W'`` may differ from the original shape by a whole-number factor
    (e.g. 1024 masks for a 2048 image): the data covers the same field of view.
    """
    resized = resize_channels(array, geometry.resized_shape)
    out = np.full((array.shape[0], geometry.size, geometry.size), fill, dtype=np.float32)
    top, left = geometry.pad_top, geometry.pad_left
    out[:, top : top + geometry.resized_shape[0], left : left + geometry.resized_shape[1]] = resized
    return out


def to_original(array: np.ndarray, geometry: ResizePadGeometry) -> np.ndarray:
    """Crop the padding from (C, size, size) data and resize to (C, H, W) original."""
    top, left = geometry.pad_top, geometry.pad_left
    cropped = np.asarray(array, dtype=np.float32)[
        :, top : top + geometry.resized_shape[0], left : left + geometry.resized_shape[1]
    ]
    return resize_channels(cropped, geometry.original_shape)
