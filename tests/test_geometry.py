"""Resize + pad geometry and its inverse (prediction -> original image)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.preprocessing.geometry import ResizePadGeometry, to_original, to_preprocessed


@pytest.mark.parametrize(
    "shape, spacing, size, resized, pad",
    [
        ((1024, 1024), (0.35, 0.35), 256, (256, 256), (0, 0)),
        ((512, 448), (0.7, 0.7), 256, (256, 224), (0, 16)),
        ((300, 600), (0.2, 0.2), 128, (64, 128), (32, 0)),
        # Anisotropic pixels: the physical extent keeps its aspect (100 x 100 mm).
        ((200, 100), (0.5, 1.0), 100, (100, 100), (0, 0)),
    ],
)
def test_fit(shape, spacing, size, resized, pad):
    g = ResizePadGeometry.fit(shape, spacing, size)
    assert g.resized_shape == resized
    assert (g.pad_top, g.pad_left) == pad
    assert g.preprocessed_spacing_mm[0] == pytest.approx(g.preprocessed_spacing_mm[1], rel=0.02)


def test_record_round_trip():
    g = ResizePadGeometry.fit((512, 448), (0.7, 0.7), 256)
    assert ResizePadGeometry.from_record(g.as_record()) == g


def test_points_round_trip_is_identity():
    g = ResizePadGeometry.fit((733, 517), (0.3, 0.3), 256)
    rng = np.random.default_rng(0)
    points = rng.uniform([0, 0], [733, 517], size=(100, 2))
    back = g.to_original(g.to_preprocessed(points))
    np.testing.assert_allclose(back, points, atol=1e-9)
    # Image corners land on the resized block's corners, inside the padding.
    corners = g.to_preprocessed(np.array([[0.0, 0.0], [733.0, 517.0]]))
    np.testing.assert_allclose(corners[0], [g.pad_top, g.pad_left])
    np.testing.assert_allclose(corners[1], [g.pad_top + g.resized_shape[0], g.pad_left + g.resized_shape[1]])


def _ellipse_mask(shape, centre, radii):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return ((rr - centre[0]) / radii[0]) ** 2 + ((cc - centre[1]) / radii[1]) ** 2 <= 1


@pytest.mark.parametrize(
    "shape, size",
    [((512, 448), 256), ((1024, 1024), 256), ((300, 200), 512), ((257, 391), 128)],
)
def test_mask_round_trip_within_one_pixel(shape, size):
    """preprocess -> map back reproduces a mask up to one preprocessed pixel at its edge."""
    mask = _ellipse_mask(shape, (shape[0] * 0.45, shape[1] * 0.55), (shape[0] * 0.3, shape[1] * 0.2))
    g = ResizePadGeometry.fit(shape, (0.5, 0.5), size)
    pre = to_preprocessed(mask[np.newaxis].astype(np.float32), g) >= 0.5
    assert pre.shape == (1, size, size)
    # Nothing leaks into the padding.
    assert not pre[0, : g.pad_top].any() and not pre[0, :, : g.pad_left].any()
    back = to_original(pre.astype(np.float32), g)[0] >= 0.5
    assert back.shape == shape
    # Each wrong pixel lies within one preprocessed pixel of the true edge.
    one_pixel = 1.0 / min(g.scale)
    edge_distance = np.minimum(ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    wrong = back != mask
    assert edge_distance[wrong].max(initial=0) <= one_pixel + 0.5
    # And the area is preserved to within a thin boundary band.
    assert abs(int(back.sum()) - int(mask.sum())) / mask.sum() < 0.03


def test_round_trip_exact_when_upsampling():
    mask = _ellipse_mask((100, 80), (50, 40), (30, 20))
    g = ResizePadGeometry.fit((100, 80), (1.0, 1.0), 200)
    back = to_original(to_preprocessed(mask[np.newaxis].astype(np.float32), g), g)[0] >= 0.5
    assert np.array_equal(back, mask)
