"""Pictures people look at: mask overlays and contact sheets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_path

# Heart red, lungs green, clavicles blue, everywhere in the project.
LABEL_COLOURS: dict[str, tuple[float, float, float]] = {
    "heart": (1.0, 0.0, 0.0),
    "lungs": (0.0, 1.0, 0.0),
    "clavicles": (0.0, 0.3, 1.0),
}
_FALLBACK = [(1.0, 0.8, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0)]


def label_colour(name: str, index: int) -> tuple[float, float, float]:
    """Colour of a label; left/right variants share their group's colour."""
    for group, colour in LABEL_COLOURS.items():
        if name == group or name.endswith(group.rstrip("s")) or name.endswith(group):
            return colour
    return _FALLBACK[index % len(_FALLBACK)]


def overlay_rgb(image: np.ndarray, masks: Mapping[str, np.ndarray], alpha: float = 0.35) -> np.ndarray:
    """Blend binary masks onto a greyscale image.

    Args:
        image: (H, W) in [0, 1].
        masks: {label: bool (H, W)}; overlaps blend.
        alpha: opacity of each mask.

    Returns:
        float32 (H, W, 3) RGB in [0, 1].
    """
    rgb = np.repeat(np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None], 3, axis=2)
    for index, (name, mask) in enumerate(masks.items()):
        colour = np.array(label_colour(name, index), dtype=np.float32)
        m = np.asarray(mask, dtype=bool)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
    return rgb


def subplots(*args, **kwargs):
    """matplotlib's ``plt.subplots`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Save a figure as PNG atomically and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def save_contact_sheet(
    path: str | Path,
    tiles: Sequence[np.ndarray],
    titles: Sequence[str],
    columns: int = 4,
    tile_inches: float = 3.0,
) -> None:
    """Save RGB (or greyscale) tiles in a grid as one PNG, atomically."""
    n = len(tiles)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig, axes = subplots(rows, columns, figsize=(columns * tile_inches, rows * tile_inches), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile, title in zip(axes.ravel(), tiles, titles):
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    save_figure(fig, path)
