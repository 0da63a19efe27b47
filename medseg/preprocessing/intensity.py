"""Intensity normalisation for radiographs."""

from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRangePercentiles


def normalise_intensity(pixels: np.ndarray, lower_percentile: float = 0.5, upper_percentile: float = 99.5) -> np.ndarray:
    """Robust min-max scaling to [0, 1].

    Percentiles rather than min/max, so burnt-in labels, collimator edges and
    dead pixels do not squash the anatomy's contrast.

    Args:
        pixels: (H, W) any float range, display polarity.

    Returns:
        float32 (H, W) in [0, 1].
    """
    scale = ScaleIntensityRangePercentiles(
        lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
    )
    return np.asarray(scale(np.asarray(pixels, dtype=np.float32)[np.newaxis]), dtype=np.float32)[0]
