"""Anatomical structures and how they group into training labels.

Masks are stored per *source structure* (SCR's five: heart, left_lung,
right_lung, left_clavicle, right_clavicle; "left" is the patient's left, on the
image's right side). Training *labels* are unions of source structures, one
sigmoid channel each (multi-label: clavicles overlap the lungs). Keeping the
sources separate preserves left/right for the cardiothoracic ratio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SCR_STRUCTURES: tuple[str, ...] = (
    "heart",
    "left_lung",
    "right_lung",
    "left_clavicle",
    "right_clavicle",
)

DEFAULT_LABELS: dict[str, tuple[str, ...]] = {
    "heart": ("heart",),
    "lungs": ("left_lung", "right_lung"),
    "clavicles": ("left_clavicle", "right_clavicle"),
}

# A uint8 bit field holds up to 8 source structures per pixel.
MAX_SOURCE_STRUCTURES = 8


def pack_masks(masks: Mapping[str, np.ndarray], structures: Sequence[str]) -> np.ndarray:
    """Pack boolean masks into one uint8 bit field.

    Args:
        masks: structure name -> bool array (H, W). Every name in
            ``structures`` must be present.
        structures: order of the bits: bit i holds ``structures[i]``.

    Returns:
        uint8 array (H, W); bit i set where structure i is present. Overlaps
        (clavicle over lung) are kept.
    """
    if len(structures) > MAX_SOURCE_STRUCTURES:
        raise ValueError(f"at most {MAX_SOURCE_STRUCTURES} source structures, got {len(structures)}")
    shape = next(iter(masks.values())).shape
    packed = np.zeros(shape, dtype=np.uint8)
    for bit, name in enumerate(structures):
        packed |= (np.asarray(masks[name], dtype=bool).astype(np.uint8) << bit)
    return packed


def unpack_masks(packed: np.ndarray, structures: Sequence[str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_masks`: uint8 (H, W) -> {name: bool (H, W)}."""
    packed = np.asarray(packed).astype(np.uint8)
    return {name: ((packed >> bit) & 1).astype(bool) for bit, name in enumerate(structures)}


def labels_from_packed(
    packed: np.ndarray,
    structures: Sequence[str],
    labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS,
) -> np.ndarray:
    """Multi-label training target from a packed bit field.

    Returns:
        float32 array (C, H, W), C = len(labels), channel c = union of the
        source structures listed for label c.
    """
    unknown = sorted({s for group in labels.values() for s in group} - set(structures))
    if unknown:
        raise ValueError(f"labels use structures not in the masks: {', '.join(unknown)}")
    packed = np.asarray(packed).astype(np.uint8)
    bit_of = {name: bit for bit, name in enumerate(structures)}
    channels = []
    for group in labels.values():
        group_bits = np.uint8(sum(1 << bit_of[s] for s in group))
        channels.append((packed & group_bits) != 0)
    return np.stack(channels).astype(np.float32)


def label_masks(masks: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS
                ) -> dict[str, np.ndarray]:
    """{label: bool (H, W)}, each the union of its source structures' masks."""
    return {label: np.logical_or.reduce([np.asarray(masks[s], dtype=bool) for s in group])
            for label, group in labels.items()}
