"""Segmentation metrics for one pair of 2-D binary masks.

Overlap: Dice and Jaccard. Surface distances (MONAI, between the masks' edge
pixels, i.e. pixels of the mask with a 4-connected neighbour outside it),
in millimetres with the (row, column) pixel spacing honoured:

- ``hd95_mm``: 95th-percentile symmetric Hausdorff distance. As in MONAI, the
  95th percentile (linear interpolation) is taken of each directed set of
  edge distances (prediction -> truth, truth -> prediction) and the larger of
  the two is reported.
- ``assd_mm``: average symmetric surface distance, the mean over both
  directed sets pooled together.

Edge cases (decided here, used everywhere in the project):

- both masks empty: the structure is correctly absent -> dice = jaccard = 1,
  hd95 = assd = 0.
- exactly one mask empty: dice = jaccard = 0, hd95 = assd = +inf. Infinity,
  not NaN, because the structure was missed (or invented) entirely; NaN would
  be silently skipped by pandas' mean and hide the failure, while +inf makes
  the mean say so (the median stays informative).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95_mm", "assd_mm")
# Higher is better for these; lower is better for the distances.
OVERLAP_METRICS: tuple[str, ...] = ("dice", "jaccard")
DISTANCE_METRICS: tuple[str, ...] = ("hd95_mm", "assd_mm")


def segmentation_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, float]
) -> dict[str, float]:
    """Dice, Jaccard, HD95 and ASSD of one predicted mask against its truth.

    Args:
        pred: bool (H, W) predicted mask.
        truth: bool (H, W) ground-truth mask, same grid as ``pred``.
        spacing_mm: (row spacing, column spacing) of that grid in millimetres.

    Returns:
        {"dice", "jaccard"} in [0, 1] and {"hd95_mm", "assd_mm"} in mm
        (see the module docstring for empty masks).

    Raises:
        ValueError: the masks are not 2-D or differ in shape, or the spacing
            is not two positive numbers.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.ndim != 2 or pred.shape != truth.shape:
        raise ValueError(f"need two 2-D masks of one shape, got {pred.shape} and {truth.shape}")
    if len(spacing_mm) != 2 or not all(float(s) > 0 and math.isfinite(float(s)) for s in spacing_mm):
        raise ValueError(f"spacing_mm must be two positive numbers (row, column), got {spacing_mm}")

    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_pred == 0 and n_truth == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    intersection = int(np.logical_and(pred, truth).sum())
    union = n_pred + n_truth - intersection
    dice = 2.0 * intersection / (n_pred + n_truth)
    jaccard = intersection / union
    if n_pred == 0 or n_truth == 0:
        return {"dice": dice, "jaccard": jaccard, "hd95_mm": math.inf, "assd_mm": math.inf}
    hd95, assd = _surface_distances(pred, truth, (float(spacing_mm[0]), float(spacing_mm[1])))
    return {"dice": dice, "jaccard": jaccard, "hd95_mm": hd95, "assd_mm": assd}


def _surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
    """(HD95, ASSD) in mm for two non-empty bool (H, W) masks."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    # MONAI wants one-hot (batch, channel, H, W); with a single channel the
    # "background" channel is our structure, so include_background=True.
    y_pred = pred[np.newaxis, np.newaxis].astype(np.float32)
    y = truth[np.newaxis, np.newaxis].astype(np.float32)
    with warnings.catch_warnings():
        # Empty masks are handled before we get here, and MONAI's own internal
        # call to a deprecated argument is not ours to fix: keep it quiet.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, directed=False, spacing=list(spacing)
        )
        assd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=list(spacing)
        )
    return float(hd95.reshape(-1)[0]), float(assd.reshape(-1)[0])
