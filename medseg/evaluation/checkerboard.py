"""Checkerboard artifacts, measured: how much of a map's variation is a
period-2 pattern.

Transposed convolutions whose kernel size is not divisible by the stride
overlap unevenly and leave a period-2 checkerboard in their output (and
strided layers leave one in the gradients), visible even before training;
resize-convolution cannot (Odena, Dumoulin & Olah, "Deconvolution and
Checkerboard Artifacts", Distill 2016). A period-2 pattern puts its energy on
the Nyquist lines of the 2-D spectrum (the row ky = H/2 and the column
kx = W/2).

Two measures, both from :func:`numpy.fft.fft2` of each map minus its mean:

- :func:`nyquist_share`: the Nyquist lines' share of all non-DC energy, in
  [0, 1]. Simple, but sharp edges (a trained network's near-binary
  probabilities) also put energy there, so its floor depends on the content.
- :func:`checkerboard_score`: the Nyquist lines' energy over the mean energy
  of the 8 lines of each kind next to them (ky = H/2 +- 1..4, kx = W/2 +-
  1..4). Edges and smooth content have a spectrum that varies slowly there
  (ratio about 1 or below; hard-edged discs 0.06-2.4 over 200 random ones
  at 64 px, the highest for discs centred exactly on a pixel; the phantoms'
  masks 0.6-1.1); a period-2 pattern is a peak on the Nyquist lines alone
  (ratio >> 1; untrained kernel-3 stride-2 decoders: 6.9-25). Using a
  band rather than the adjacent lines only averages out the ringing of sharp
  shapes' spectra (a hard-edged disc of radius r rings with a period of
  about H/r bins). Scale-free, so maps at initialisation (probabilities near
  0.5) and after training compare. This is the measure the project reports.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

_BAND = 4  # lines each side of the Nyquist lines that set the reference level


def _normalised_spectra(maps) -> np.ndarray:
    """(..., H, W) -> (M, H, W) spectra of the M non-constant maps, each
    divided by its non-DC energy (so every map weighs the same)."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().float().numpy()  # float(): numpy has no bfloat16
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2 or min(maps.shape[-2:]) < 2 * _BAND + 2 or maps.shape[-2] % 2 or maps.shape[-1] % 2:
        raise ValueError(f"maps must be (..., H, W) with even H, W >= {2 * _BAND + 2}, got shape {maps.shape}")
    if maps.size == 0:
        raise ValueError(f"no maps: shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    maps = maps.reshape(-1, *maps.shape[-2:])
    # Scaled to at most 1 before anything is summed: no overflow near 1e308.
    largest = np.abs(maps).max(axis=(-2, -1), keepdims=True)
    maps = maps / np.where(largest > 0, largest, 1.0)
    centred = maps - maps.mean(axis=(-2, -1), keepdims=True)
    scale = np.abs(centred).max(axis=(-2, -1))
    varying = scale > 1e-12  # constant up to rounding
    centred = centred[varying] / scale[varying, None, None]
    spectrum = np.abs(np.fft.fft2(centred)) ** 2
    return spectrum / spectrum.sum(axis=(-2, -1), keepdims=True)


def _cross(spectrum: np.ndarray, offset: int = 0) -> np.ndarray:
    """Energy of the row ky = H/2 + offset plus the column kx = W/2 + offset, per map."""
    h, w = spectrum.shape[-2:]
    return spectrum[..., h // 2 + offset, :].sum(-1) + spectrum[..., :, w // 2 + offset].sum(-1)


def nyquist_share(maps) -> float:
    """Share of the maps' non-DC spectral energy on the Nyquist lines.

    Args:
        maps: (..., H, W) finite real values, numpy or torch (e.g.
            probabilities (N, C, H, W)); H, W even, >= 10.

    Returns:
        Mean over the non-constant maps, in [0, 1]; 0 when all are constant.

    Raises:
        ValueError: odd or too small H, W; no maps; NaN or infinite values.
    """
    spectrum = _normalised_spectra(maps)
    if not len(spectrum):
        return 0.0
    h, w = spectrum.shape[-2:]
    return float((_cross(spectrum) - spectrum[..., h // 2, w // 2]).mean())


def checkerboard_score(maps) -> float:
    """Period-2 peak ratio: Nyquist-line energy over the neighbouring lines'.

    Args:
        maps: (..., H, W) finite real values, numpy or torch (probabilities,
            or gradients with respect to the input); H, W even, >= 10.

    Returns:
        ``mean(E[ky=H/2] + E[kx=W/2]) / mean_d(mean(E[ky=H/2+d] + E[kx=W/2+d]))``
        for d = +-1..4, E a line's energy as a share of its map's non-DC
        energy, means over the non-constant maps (each map weighs the same;
        a ratio of means, so one map without energy on a line cannot zero
        or blow up the result). About 1 or below without a pattern (hard-
        edged masks: up to about 2.4, reached by discs centred exactly on a
        pixel), far above with a checkerboard (infinite for a pure one); 0
        when all maps are constant.

    Raises:
        ValueError: odd or too small H, W; no maps; NaN or infinite values.
    """
    spectrum = _normalised_spectra(maps)
    if not len(spectrum):
        return 0.0
    peak = float(_cross(spectrum).mean())
    side = float(np.mean([_cross(spectrum, d).mean() for d in range(-_BAND, _BAND + 1) if d]))
    if peak > 0 and side <= 1e-12 * peak:  # FFT rounding only: a pure checkerboard
        return math.inf
    return peak / side if side > 0 else 0.0


def input_gradient(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Gradient of the summed output probabilities with respect to the input.

    Args:
        model: logits network, (N, 1, H, W) -> (N, C, H, W).
        images: (N, 1, H, W) float (computed in the model's parameter dtype).

    Returns:
        (N, 1, H, W) float32 array, d sum(sigmoid(logits)) / d input, with
        the model in eval mode (batch-norm statistics used, not updated).
        The model's mode and its parameters' ``.grad`` are left as they were;
        works under ``torch.no_grad()``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dtype = next(model.parameters(), torch.empty(0)).dtype  # float32 for a parameter-free model
            x = images.detach().to(dtype).clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(torch.sigmoid(model(x)).sum(), x)
    finally:
        model.train(was_training)
    return gradient.detach().cpu().numpy().astype(np.float32)


__all__ = ["checkerboard_score", "nyquist_share", "input_gradient"]
