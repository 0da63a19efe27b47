"""Intensity normalisation agrees with MONAI's percentile scaling."""

from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRangePercentiles

from medseg.preprocessing.intensity import normalise_intensity


def test_matches_monai_percentile_scaling():
    rng = np.random.default_rng(0)
    pixels = rng.gamma(2.0, 300.0, size=(120, 90)).astype(np.float32)
    ours = normalise_intensity(pixels, 0.5, 99.5)
    monai = np.asarray(ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(pixels[None]))[0]
    np.testing.assert_allclose(ours, monai, atol=1e-5)
    assert ours.min() == 0.0 and ours.max() == 1.0


def test_constant_image_gives_zeros():
    assert not normalise_intensity(np.full((4, 4), 7.0)).any()
