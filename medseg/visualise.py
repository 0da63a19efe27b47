"""Pictures people look at: mask overlays and contact sheets."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def legend_text(labels: Sequence[str]) -> str:
    """The colour legend of ``labels`` in words, e.g. "heart red, lungs green,
    clavicles blue" (for captions and titles)."""
    names = {(1.0, 0.0, 0.0): "red", (0.0, 1.0, 0.0): "green", (0.0, 0.3, 1.0): "blue", (1.0, 0.8, 0.0): "yellow",
             (1.0, 0.0, 1.0): "magenta", (0.0, 1.0, 1.0): "cyan"}
    return ", ".join(f"{name} {names[label_colour(name, i)]}" for i, name in enumerate(labels))


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


def save_figure(fig, path: str | Path, dpi: int = 100, layout: bool = True) -> None:
    """Save a figure as PNG atomically and free it (``layout``: apply
    ``tight_layout`` first; off when the caller laid it out already)."""
    import matplotlib.pyplot as plt

    if layout:
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
    caption: str = "",
) -> None:
    """Save RGB (or greyscale) tiles in a grid as one PNG, atomically.

    Args:
        tiles: (H, W, 3) RGB or (H, W) greyscale, values in [0, 1].
        titles: one per tile.
        caption: a line under the grid (what is shown, the colour legend).
    """
    n = len(tiles)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig, axes = subplots(rows, columns, figsize=(columns * tile_inches, rows * tile_inches), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile, title in zip(axes.ravel(), tiles, titles):
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, layout=not caption)


@dataclass(frozen=True)
class LegendEntry:
    """One entry of a picture's legend: a swatch and a name.

    Attributes:
        name: what the colour marks, e.g. "heart" or "thorax width".
        colour: RGB in [0, 1].
        line: a drawn line (swatch in the solid colour) rather than a mask
            fill (swatch blended over mid grey as :func:`overlay_rgb` blends it
            over the image, so it looks like the fill it names).
    """

    name: str
    colour: tuple[float, float, float]
    line: bool = False


@functools.lru_cache(maxsize=8)
def _caption_font(size_px: int):
    """A font ``size_px`` high (loaded once per size: predict annotates every scan)."""
    from PIL import ImageFont

    try:  # Pillow >= 10.1 with FreeType: a scalable font
        return ImageFont.load_default(size=size_px)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, fits) -> list[str]:
    """``text`` in lines that ``fits(line)``; a word too long for a line is
    split between characters (case IDs have no spaces)."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and not fits(current + char):
                lines.append(current)
                current = ""
            current += char
    return [*lines, current] if current or not lines else lines


def annotate_below(rgb: np.ndarray, lines: Sequence[str], legend: Sequence[LegendEntry] = (),
                   alpha: float = 0.35) -> np.ndarray:
    """The picture with a caption band under it: text lines, then a legend.

    The band is drawn below the image rather than over it, so no text hides
    anatomy and row/column coordinates of the image still hold in the
    annotated picture. Text height scales with the width (1/40 of it, at
    least 10 px), so it stays readable when a large scan is shown small.

    Args:
        rgb: float (H, W, 3) in [0, 1], e.g. ``overlay_rgb`` (+ CTR lines).
        lines: text, white on black, each wrapped to the width.
        legend: swatch + name per entry, wrapped to the width.
        alpha: the mask opacity of ``overlay_rgb``, for fill swatches.

    Returns:
        float32 (H + band, W, 3) in [0, 1]; rows 0..H-1 are ``rgb`` clipped to
        [0, 1], unchanged otherwise.
    """
    from PIL import Image, ImageDraw

    image = np.clip(np.asarray(rgb, dtype=np.float32), 0, 1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb must have shape (H, W, 3), got {image.shape}")
    width = image.shape[1]
    size = max(10, round(width / 40))
    font = _caption_font(size)
    pad = max(2, size // 2)
    row_height = round(size * 1.3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    room = max(1, width - 2 * pad)

    def fits(text: str) -> bool:
        return measure.textlength(text, font=font) <= room

    text_rows = [row for line in lines for row in _wrap(line, fits)]
    # Legend entries laid out left to right, wrapping to the next row.
    swatch, gap = size, size
    placed: list[tuple[int, int, LegendEntry]] = []  # (row, x, entry)
    row, x = 0, pad
    for entry in legend:
        extent = swatch + size // 3 + round(measure.textlength(entry.name, font=font))
        if x > pad and x + extent > width - pad:
            row, x = row + 1, pad
        placed.append((row, x, entry))
        x += extent + gap
    legend_rows = row + 1 if placed else 0
    band_height = 2 * pad + row_height * (len(text_rows) + legend_rows)
    band = Image.new("RGB", (width, band_height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for index, text in enumerate(text_rows):
        draw.text((pad, pad + index * row_height), text, fill=(255, 255, 255), font=font)
    top = pad + row_height * len(text_rows)
    for row, x, entry in placed:
        colour = np.asarray(entry.colour, dtype=np.float32)
        if not entry.line:
            colour = (1 - alpha) * 0.5 + alpha * colour
        fill = tuple(int(round(float(c) * 255)) for c in colour)
        y = top + row * row_height
        if entry.line:  # a bar as thick as the drawn lines look at this size
            thickness = max(2, size // 4)
            middle = y + size // 2
            draw.rectangle((x, middle - thickness // 2, x + swatch - 1, middle - thickness // 2 + thickness - 1),
                           fill=fill)
        else:
            draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=fill)
        draw.text((x + swatch + size // 3, y), entry.name, fill=(255, 255, 255), font=font)
    caption = np.asarray(band, dtype=np.float32) / 255.0
    return np.concatenate([image, caption], axis=0)
