"""2-D images as NIfTI with the pixel spacing in the affine.

Convention: a (rows, columns) array is stored transposed, so NIfTI axis i runs
along the columns (x) and axis j along the rows (y), as MONAI's readers expect;
the affine's diagonal holds (column spacing, row spacing, 1) in millimetres.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import atomic_path


def save_nifti_2d(path: str | Path, array: np.ndarray, spacing_mm: tuple[float, float],
                  description: str = "") -> None:
    """Write ``array`` (H, W) or (H, W, C) atomically.

    NIfTI's axes are x (columns), y (rows), z, t, then a vector axis, so the
    file's shape is (W, H) or (W, H, 1, 1, C) with intent "vector" (NIfTI-1
    intent code 1007); :func:`load_nifti_2d` gives back (H, W[, C]).

    Args:
        array: (H, W) or (H, W, C); channels go to NIfTI's 5th (vector) axis.
        spacing_mm: (row spacing, column spacing).
        description: the header's ``descrip`` (at most 80 bytes, e.g. the
            channels' label names); longer text is cut.
    """
    array = np.asarray(array)
    data = np.swapaxes(array, 0, 1)
    if data.ndim == 3:
        data = data[:, :, np.newaxis, np.newaxis, :]  # x, y, z=1, t=1, channel
    affine = np.diag([float(spacing_mm[1]), float(spacing_mm[0]), 1.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    if data.ndim == 5:
        img.header.set_intent("vector")
    if description:
        img.header["descrip"] = description.encode("utf-8")[:80]
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def load_nifti_2d(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Read what :func:`save_nifti_2d` wrote.

    Returns:
        (array (H, W) or (H, W, C), (row spacing, column spacing) in mm).
    """
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 5:
        data = data[:, :, 0, 0, :]
    elif data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    zooms = img.header.get_zooms()
    return np.swapaxes(data, 0, 1), (float(zooms[1]), float(zooms[0]))
