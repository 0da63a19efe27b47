"""Overlay colours: medseg's own overlay_rgb (used by predict's overlay.png,
the evaluation's worst cases, training overlays and the preview) gives the
documented colour per structure, exactly: heart red, lungs green, clavicles
blue (0, 0.3, 1), each blended at alpha 0.35 over the grey image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medseg.inference.predict import _save_png
from medseg.phantoms.anatomy import render_phantom
from medseg.visualise import LABEL_COLOURS, LegendEntry, annotate_below, label_colour, overlay_rgb

ALPHA = 0.35
GREY = 0.5  # (1 - ALPHA) * GREY = 0.325


def _known_case() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 4x6 grey image and three label masks, as predict passes them:

    (0, 0) heart only        (1, 1) lungs only        (2, 2) clavicles only
    (1, 2) clavicle over lung (0, 1) heart and lungs  (3, 5) nothing, grey
    (3, 4) nothing, image 1.7 (clipped to 1)  (3, 3) nothing, image -0.3 (to 0)
    """
    image = np.full((4, 6), GREY, dtype=np.float32)
    image[3, 4], image[3, 3] = 1.7, -0.3
    heart, lungs, clavicles = (np.zeros((4, 6), dtype=bool) for _ in range(3))
    heart[0, 0] = heart[0, 1] = True
    lungs[1, 1] = lungs[1, 2] = lungs[0, 1] = True
    clavicles[2, 2] = clavicles[1, 2] = True
    return image, {"heart": heart, "lungs": lungs, "clavicles": clavicles}


# Hand-computed: a mask pixel becomes 0.65 * below + 0.35 * colour, masks in order.
EXPECTED_FLOAT = {
    (0, 0): (0.325 + 0.35, 0.325, 0.325),  # heart red
    (1, 1): (0.325, 0.325 + 0.35, 0.325),  # lungs green
    (2, 2): (0.325, 0.325 + 0.35 * 0.3, 0.325 + 0.35),  # clavicles blue (0, 0.3, 1)
    # clavicle over lung: lung first (0.325, 0.675, 0.325), then the clavicle blends on top.
    (1, 2): (0.65 * 0.325, 0.65 * 0.675 + 0.35 * 0.3, 0.65 * 0.325 + 0.35),
    # heart and lungs: heart first (0.675, 0.325, 0.325), then the lungs.
    (0, 1): (0.65 * 0.675, 0.65 * 0.325 + 0.35, 0.65 * 0.325),
    (3, 5): (GREY, GREY, GREY),
    (3, 4): (1.0, 1.0, 1.0),
    (3, 3): (0.0, 0.0, 0.0),
}
# As predict writes overlay.png: (clip(rgb, 0, 1) * 255) truncated to uint8.
EXPECTED_PNG = {
    (0, 0): (172, 82, 82),
    (1, 1): (82, 172, 82),
    (2, 2): (82, 109, 172),
    (1, 2): (53, 138, 143),
    (0, 1): (111, 143, 53),
    (3, 5): (127, 127, 127),
    (3, 4): (255, 255, 255),
    (3, 3): (0, 0, 0),
}


def test_colour_table_is_the_documented_one():
    assert LABEL_COLOURS == {"heart": (1.0, 0.0, 0.0), "lungs": (0.0, 1.0, 0.0), "clavicles": (0.0, 0.3, 1.0)}
    # Source structures share their group's colour, whatever their position.
    for index, (name, group) in enumerate([("left_lung", "lungs"), ("right_lung", "lungs"),
                                           ("left_clavicle", "clavicles"), ("right_clavicle", "clavicles"),
                                           ("heart", "heart")]):
        assert label_colour(name, index) == LABEL_COLOURS[group], name
    # Other labels: the fallback colours, by position.
    assert [label_colour("trachea", i) for i in range(4)] == [(1.0, 0.8, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0),
                                                              (1.0, 0.8, 0.0)]


def test_overlay_rgb_exact_pixel_values():
    image, masks = _known_case()
    rgb = overlay_rgb(image, masks)
    assert rgb.dtype == np.float32 and rgb.shape == (4, 6, 3)
    for (row, col), colour in EXPECTED_FLOAT.items():
        np.testing.assert_allclose(rgb[row, col], colour, atol=1e-6, err_msg=f"pixel {(row, col)}")
    # Every unmasked pixel keeps its (clipped) grey value.
    untouched = ~np.logical_or.reduce(list(masks.values()))
    np.testing.assert_allclose(rgb[untouched], np.repeat(np.clip(image[untouched], 0, 1)[:, None], 3, axis=1))
    # The input is not modified.
    assert image[3, 4] == np.float32(1.7)


def test_overlay_alpha_is_honoured():
    image, masks = _known_case()
    rgb = overlay_rgb(image, {"heart": masks["heart"]}, alpha=1.0)
    np.testing.assert_array_equal(rgb[0, 0], (1.0, 0.0, 0.0))
    rgb = overlay_rgb(image, {"heart": masks["heart"]}, alpha=0.0)
    np.testing.assert_array_equal(rgb[0, 0], (GREY, GREY, GREY))


def test_inference_overlay_png_pixels(tmp_path):
    """predict's overlay.png: overlay_rgb, clipped, scaled to uint8, written by _save_png."""
    image, masks = _known_case()
    rgb = overlay_rgb(image, masks)
    path = tmp_path / "overlay.png"
    _save_png(path, (np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (6, 4)
        pixels = np.asarray(png)
    for (row, col), colour in EXPECTED_PNG.items():
        assert tuple(int(v) for v in pixels[row, col]) == colour, (row, col)


@pytest.mark.parametrize("seed", [0, 3])
def test_overlay_of_a_phantom_colours_each_structure(seed):
    """A rendered phantom with its label masks: every heart-only pixel is the
    grey blended with red, and so on; pixels outside all masks are unchanged."""
    image, structures = render_phantom(seed, (96, 80))
    masks = {"heart": structures["heart"],
             "lungs": structures["left_lung"] | structures["right_lung"],
             "clavicles": structures["left_clavicle"] | structures["right_clavicle"]}
    rgb = overlay_rgb(image, masks)
    grey = np.clip(image, 0, 1).astype(np.float32)[..., None]
    for name, mask in masks.items():
        others = np.logical_or.reduce([m for n, m in masks.items() if n != name])
        only = mask & ~others
        assert only.any() or name == "clavicles", name  # the phantom's clavicles may lie wholly over the lungs
        expected = (1 - ALPHA) * grey[only] + ALPHA * np.array(LABEL_COLOURS[name], dtype=np.float32)
        np.testing.assert_allclose(rgb[only], expected, atol=1e-6, err_msg=name)
    overlap = masks["lungs"] & masks["clavicles"] & ~masks["heart"]
    assert overlap.any()  # clavicle over lung: green first, then blue on top
    green = (1 - ALPHA) * grey[overlap] + ALPHA * np.array((0.0, 1.0, 0.0), dtype=np.float32)
    np.testing.assert_allclose(rgb[overlap], (1 - ALPHA) * green + ALPHA * np.array((0.0, 0.3, 1.0)), atol=1e-6)
    outside = ~np.logical_or.reduce(list(masks.values()))
    np.testing.assert_allclose(rgb[outside], np.repeat(grey[outside], 3, axis=1), atol=0)


# --------------------------------------------------------------------------- annotate_below


def _band_colours(picture: np.ndarray, rows: int) -> set[tuple[int, int, int]]:
    band = (np.clip(picture[rows:], 0, 1) * 255).round().astype(int)
    return {tuple(c) for c in band.reshape(-1, 3)}


def test_annotate_below_keeps_the_image_and_adds_a_band():
    image, _ = _known_case()
    rgb = overlay_rgb(np.kron(image, np.ones((20, 20))), masks={})  # 80 x 120 grey
    out = annotate_below(rgb, ["CASE0001", "CTR 0.512"], [LegendEntry("heart", LABEL_COLOURS["heart"])])
    assert out.dtype == np.float32 and out.shape[1:] == (120, 3) and out.shape[0] > 80
    # The image's own rows are untouched: coordinates on the scan still hold.
    np.testing.assert_array_equal(out[:80], np.clip(rgb, 0, 1))
    band = out[80:]
    assert band.max() > 0.9  # white text (anti-aliased)
    assert (band == 0).all(axis=-1).mean() > 0.5  # on black
    # The fill swatch looks like the fill on mid grey: 0.65 * 0.5 + 0.35 * red.
    assert (round(255 * (0.325 + 0.35)), round(255 * 0.325), round(255 * 0.325)) in _band_colours(out, 80)


def test_annotate_below_line_swatches_only_for_line_entries():
    rgb = np.full((60, 200, 3), 0.5, dtype=np.float32)
    magenta = (1.0, 0.0, 1.0)
    with_line = annotate_below(rgb, ["x"], [LegendEntry("thorax width", magenta, line=True)])
    as_fill = annotate_below(rgb, ["x"], [LegendEntry("thorax width", magenta)])
    assert (255, 0, 255) in _band_colours(with_line, 60)  # a line's swatch: its solid colour
    assert (255, 0, 255) not in _band_colours(as_fill, 60)  # a fill's: blended


def test_annotate_below_wraps_long_text_and_legends():
    rgb = np.zeros((50, 100, 3), dtype=np.float32)
    short = annotate_below(rgb, ["A1"])
    long = annotate_below(rgb, ["QC: " + ", ".join(["low_confidence_heart"] * 4), "X" * 60])
    assert long.shape[0] > short.shape[0] + 2 * (short.shape[0] - 50)  # several wrapped lines more
    legend = [LegendEntry(name, LABEL_COLOURS[name]) for name in LABEL_COLOURS]
    assert annotate_below(rgb, [], legend).shape[0] > annotate_below(rgb, [], legend[:1]).shape[0]  # 2 rows
    with pytest.raises(ValueError):
        annotate_below(np.zeros((5, 5)), ["x"])
