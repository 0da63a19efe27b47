"""Ground-truth masks: SCR layout and label images.

SCR layout: ``<masks_root>/<structure>/<case_id>.gif`` (also .png), values
0/255, one binary mask per structure; structures may overlap.
Label images: ``<masks_root>/<case_id>.png`` or ``.nii.gz`` holding integer
values, mapped to structures by a ``{value: structure}`` table. A palette
("P") PNG label image is read by index (its palette is only for display);
a colour (RGB) one is refused.

PNG / GIF / TIFF masks and label images are read upright: an EXIF
Orientation tag is applied as for radiographs (see
:mod:`medseg.ingest.raster`), since the mask was drawn and checked as a
viewer shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.ingest.raster import read_grayscale_raster

log = logging.getLogger(__name__)

SCR_MASK_SUFFIXES = (".gif", ".png")
LABEL_IMAGE_SUFFIXES = (".png", ".nii.gz", ".nii", ".tif", ".tiff")


def _keys(keys: str | Sequence[str]) -> tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else tuple(keys)


def find_mask_file(folder: Path, keys: str | Sequence[str], suffixes: Sequence[str]) -> Path | None:
    """First ``folder/<key><suffix>`` that exists, keys in order, else None.

    Args:
        keys: one key (a case ID) or several, most specific first (see
            ``medseg.ingest.inputs.lookup_keys``); a key may hold folders
            (``siteA/IM0001``) for mask trees that mirror the image folders.
    """
    for key in _keys(keys):
        for suffix in suffixes:
            candidate = folder / f"{key}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _no_key_problem(what: str, where: Path, keys: tuple[str, ...], suffix: str) -> str:
    tried = " or ".join(str(where / f"{key}{suffix}") for key in keys)
    return f"image without its mask: no {what} at {tried}"


def read_scr_masks(
    masks_root: str | Path, keys: str | Sequence[str], structures: Sequence[str], image_path: str | Path
) -> tuple[dict[str, np.ndarray], Path]:
    """Read one case's SCR-layout masks.

    All structures come from one key: the first key under which any
    structure has a mask (so one case's heart is never read with another's
    lungs).

    Args:
        masks_root: folder holding one sub-folder per structure.
        keys: the case's key or keys, most specific first (``find_mask_file``).
        structures: structure folder names to read.
        image_path: the image these masks belong to (named in errors).

    Returns:
        ({structure: bool (Hm, Wm)}, masks_root).

    Raises:
        InputError: a structure's mask is missing, unreadable, not binary, or
            the structures' sizes differ.
    """
    masks_root = Path(masks_root)
    keys = _keys(keys)
    key = next((k for k in keys for name in structures
                if find_mask_file(masks_root / name, k, SCR_MASK_SUFFIXES) is not None), None)
    masks: dict[str, np.ndarray] = {}
    for name in structures:
        mask_file = find_mask_file(masks_root / name, key, SCR_MASK_SUFFIXES) if key is not None else None
        if mask_file is None:
            raise InputError(image_path, _no_key_problem(f"'{name}' mask", masks_root / name,
                                                         (key,) if key is not None else keys, ".gif"))
        array, _ = read_grayscale_raster(mask_file, "mask")
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
    keys: str | Sequence[str],
    label_values: Mapping[int, str],
    image_path: str | Path,
) -> tuple[dict[str, np.ndarray], Path]:
    """Read one case's integer label image and split it into structures.

    Returns:
        ({structure: bool (Hm, Wm)} for every structure in ``label_values``,
        the label file). See :func:`read_label_file` and
        :func:`split_label_image`.

    Raises:
        InputError: no label image for the case, or it is unreadable,
            colour, or not 2-D.
    """
    masks_root = Path(masks_root)
    label_file = find_label_file(masks_root, keys, image_path)
    masks = split_label_image(read_label_file(label_file), label_values)
    return masks, label_file


def find_label_file(masks_root: str | Path, keys: str | Sequence[str], image_path: str | Path) -> Path:
    """The label image of a case: ``masks_root/<key>.png|.nii.gz|...``.

    Raises:
        InputError: naming ``image_path``, when there is none.
    """
    masks_root = Path(masks_root)
    label_file = find_mask_file(masks_root, keys, LABEL_IMAGE_SUFFIXES)
    if label_file is None:
        raise InputError(image_path, _no_key_problem("label image", masks_root, _keys(keys), ".png/.nii.gz"))
    return label_file


def read_label_file(label_file: str | Path) -> np.ndarray:
    """A label image's values as stored, (H, W) upright.

    PNG / TIFF: greyscale values (uint8, uint16 for "I;16", int32 for "I");
    palette ("P", "PA") images by index, never through the palette colours;
    a greyscale-looking RGB image by its grey value. NIfTI: the stored
    integers (as :func:`medseg.nifti.load_nifti_2d` returns them).

    Raises:
        InputError: unreadable, colour (RGB with differing channels),
            multi-frame, or not 2-D.
    """
    label_file = Path(label_file)
    if label_file.name.endswith((".nii", ".nii.gz")):
        from medseg.nifti import load_nifti_2d

        try:
            array, _ = load_nifti_2d(label_file)
        except Exception as err:  # nibabel raises several types for bad files
            raise InputError(label_file, f"unreadable NIfTI label image: {err}") from err
    else:
        array, _ = read_grayscale_raster(label_file, "label image")
    array = np.asarray(array)
    if array.ndim != 2:
        raise InputError(label_file, f"expected a 2-D label image, got shape {array.shape}")
    return array


def split_label_image(array: np.ndarray, label_values: Mapping[int, str]) -> dict[str, np.ndarray]:
    """{structure: bool (H, W)}: where the label image holds the structure's
    value (the union when several values name one structure)."""
    masks: dict[str, np.ndarray] = {}
    for value, name in label_values.items():
        hit = array == int(value)
        masks[name] = masks[name] | hit if name in masks else hit
    return masks


def label_values_present(array: np.ndarray, label_values: Mapping[int, str]) -> set[int]:
    """The values of ``label_values`` that occur in the label image ``array``."""
    return {int(value) for value in label_values if np.any(array == int(value))}


def warn_absent_label_values(
    label_values: Mapping[int, str], present: Iterable[int], n_images: int, where: str = ""
) -> dict[int, str]:
    """Log a warning for each label value that occurs in no label image.

    A value that never occurs is usually a wrong label-value table (or the
    wrong folder): its structure is then empty in every case.

    Args:
        label_values: {value: structure} used.
        present: the values seen in at least one label image.
        n_images: how many label images were read (named in the message).
        where: the label-image folder, named in the message.

    Returns:
        {value: structure} of the absent values, in ``label_values`` order.
    """
    seen = {int(v) for v in present}
    absent = {int(v): name for v, name in label_values.items() if int(v) not in seen}
    place = f" in {where}" if where else ""
    for value, name in absent.items():
        # Another value of the same structure may still occur.
        empty = all(int(v) in absent for v, other in label_values.items() if other == name)
        consequence = f"; {name} is empty in every case" if empty else ""
        log.warning("label value %d (%s) occurs in none of the %d label images%s: check the label values "
                    "(--label-values)%s", value, name, n_images, place, consequence)
    return absent


def check_label_values_occur(label_files: Iterable[str | Path], label_values: Mapping[int, str]) -> dict[int, str]:
    """Read label images again and warn about values that occur in none.

    For runs that did not keep the values seen (preprocessing); unreadable
    files are skipped (they were reported when first read).

    Returns:
        {value: structure} of the values found in no label image.
    """
    present: set[int] = set()
    files = list(dict.fromkeys(str(f) for f in label_files if str(f)))
    n_read = 0
    for label_file in files:
        try:
            present |= label_values_present(read_label_file(label_file), label_values)
        except InputError:
            continue
        n_read += 1
    if not n_read:
        return {}
    folders = {str(Path(f).parent) for f in files}
    return warn_absent_label_values(label_values, present, n_read, folders.pop() if len(folders) == 1 else "")


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
