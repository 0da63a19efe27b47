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


def check_label_sources(labels: Mapping[str, Sequence[str]], structures: Sequence[str]) -> None:
    """Raise ValueError naming the structures ``labels`` draw on that ``structures`` lack."""
    unknown = sorted({s for group in labels.values() for s in group} - set(structures))
    if unknown:
        raise ValueError(f"labels use structures not in the masks: {', '.join(unknown)}")


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
    check_label_sources(labels, structures)
    packed = np.asarray(packed).astype(np.uint8)
    bit_of = {name: bit for bit, name in enumerate(structures)}
    channels = []
    for group in labels.values():
        group_bits = np.uint8(sum(1 << bit_of[s] for s in group))
        channels.append((packed & group_bits) != 0)
    return np.stack(channels).astype(np.float32)


# Partial-volume fractions are stored as uint8 (share x 255): 1/510 of a
# pixel's area is far below what any mask can resolve.
FRACTION_SCALE = 255


def fractions_to_uint8(fractions: np.ndarray) -> np.ndarray:
    """Shares of a pixel covered, float in [0, 1] (any shape) -> uint8 (x 255, rounded)."""
    return np.rint(np.clip(np.asarray(fractions, dtype=np.float32), 0.0, 1.0) * FRACTION_SCALE).astype(np.uint8)


def labels_from_fractions(
    fractions: np.ndarray,
    structures: Sequence[str],
    labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS,
) -> np.ndarray:
    """Soft (partial-volume) training target from per-structure fractions.

    Args:
        fractions: uint8 (H, W, S) as :func:`fractions_to_uint8` stored them,
            channel s = share of the pixel covered by ``structures[s]``.
        structures: the channels' structure names.

    Returns:
        float32 (C, H, W) in [0, 1], C = len(labels): channel c = the sum of
        its source structures' shares, capped at 1 (exact for the SCR
        groups, whose members do not overlap: left + right lung, left +
        right clavicle).

    Raises:
        ValueError: a label names a structure not stored, or the channel
            count differs from ``structures``.
    """
    check_label_sources(labels, structures)
    fractions = np.asarray(fractions)
    if fractions.ndim == 2:
        fractions = fractions[:, :, np.newaxis]
    if fractions.shape[2] != len(structures):
        raise ValueError(f"{fractions.shape[2]} fraction channels for {len(structures)} structures")
    share = fractions.astype(np.float32) / FRACTION_SCALE
    index = {name: i for i, name in enumerate(structures)}
    channels = [np.minimum(1.0, share[:, :, [index[s] for s in group]].sum(axis=2)) for group in labels.values()]
    return np.stack(channels).astype(np.float32)


def label_masks(masks: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS
                ) -> dict[str, np.ndarray]:
    """{label: bool (H, W)}, each the union of its source structures' masks."""
    return {label: np.logical_or.reduce([np.asarray(masks[s], dtype=bool) for s in group])
            for label, group in labels.items()}
