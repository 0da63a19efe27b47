"""Ground-truth masks: SCR layout and label images.

SCR layout: ``<masks_root>/<structure>/<case_id>.gif`` (also .png), values
0/255, one binary mask per structure; structures may overlap.
Label images: ``<masks_root>/<case_id>.png`` or ``.nii.gz`` holding integer
values, mapped to structures by a ``{value: structure}`` table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.ingest.raster import read_grayscale_raster

SCR_MASK_SUFFIXES = (".gif", ".png")
LABEL_IMAGE_SUFFIXES = (".png", ".nii.gz", ".nii", ".tif", ".tiff")


def find_mask_file(folder: Path, case_id: str, suffixes: Sequence[str]) -> Path | None:
    """First ``folder/<case_id><suffix>`` that exists, else None."""
    for suffix in suffixes:
        candidate = folder / f"{case_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_scr_masks(
    masks_root: str | Path, case_id: str, structures: Sequence[str], image_path: str | Path
) -> tuple[dict[str, np.ndarray], Path]:
    """Read one case's SCR-layout masks.

    Args:
        masks_root: folder holding one sub-folder per structure.
        case_id: file stem shared by the image and its masks.
        structures: structure folder names to read.
        image_path: the image these masks belong to (named in errors).

    Returns:
        ({structure: bool (Hm, Wm)}, masks_root).

    Raises:
        InputError: a structure's mask is missing, unreadable, not binary, or
            the structures' sizes differ.
    """
    masks_root = Path(masks_root)
    masks: dict[str, np.ndarray] = {}
    for name in structures:
        mask_file = find_mask_file(masks_root / name, case_id, SCR_MASK_SUFFIXES)
        if mask_file is None:
            raise InputError(
                image_path,
                f"image without its mask: no '{name}' mask at {masks_root / name / (case_id + '.gif')}",
            )
        array, _ = read_grayscale_raster(mask_file)
        masks[name] = binary_mask(array, mask_file)
    shapes = {name: m.shape for name, m in masks.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(image_path, f"its masks differ in size: {shapes}")
    return masks, masks_root


def binary_mask(array: np.ndarray, path: Path) -> np.ndarray:
    """0/255 (or 0/1) array -> bool; anything else is refused."""
    # bincount is O(n); np.unique sorts.
    counts = np.bincount(array.ravel(), minlength=2) if array.dtype == np.uint8 else None
    values = np.flatnonzero(counts) if counts is not None else np.unique(array)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        raise InputError(path, f"not a binary mask: values {values[:8].tolist()}")
    return array > 0


def read_label_image(
    masks_root: str | Path,
    case_id: str,
    label_values: Mapping[int, str],
    image_path: str | Path,
) -> tuple[dict[str, np.ndarray], Path]:
    """Read one case's integer label image and split it into structures.

    Returns:
        ({structure: bool (Hm, Wm)} for every structure in ``label_values``,
        the label file).
    """
    masks_root = Path(masks_root)
    label_file = find_mask_file(masks_root, case_id, LABEL_IMAGE_SUFFIXES)
    if label_file is None:
        raise InputError(image_path, f"image without its mask: no label image {case_id}.png/.nii.gz in {masks_root}")
    if label_file.name.endswith((".nii", ".nii.gz")):
        from medseg.nifti import load_nifti_2d

        try:
            array, _ = load_nifti_2d(label_file)
        except Exception as err:  # nibabel raises several types for bad files
            raise InputError(label_file, f"unreadable NIfTI label image: {err}") from err
    else:
        array, _ = read_grayscale_raster(label_file)
    array = np.asarray(array)
    masks = {name: array == int(value) for value, name in label_values.items()}
    return masks, label_file


def check_mask_geometry(image_path: str | Path, image_shape: tuple[int, int], mask_shape: tuple[int, int]) -> None:
    """Accept masks of the image's size or a whole-number scaling of it.

    SCR masks are 1024x1024 while JSRT .IMG files are 2048x2048: same field of
    view, factor 2. Any other mismatch means the mask belongs to another image.
    """
    if tuple(mask_shape) == tuple(image_shape):
        return
    big, small = (image_shape, mask_shape) if image_shape[0] >= mask_shape[0] else (mask_shape, image_shape)
    factors = {big[0] / small[0], big[1] / small[1]}
    if len(factors) == 1:
        factor = factors.pop()
        if factor == int(factor):
            return
    raise InputError(
        image_path,
        f"mask size {mask_shape[0]}x{mask_shape[1]} does not match image size "
        f"{image_shape[0]}x{image_shape[1]} (nor a whole-number scaling of it)",
    )
