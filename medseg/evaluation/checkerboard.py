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
  (ratio about 1 or below: 0.6-0.9 for off-centre discs with hard edges); a
  period-2 pattern is a peak on the Nyquist lines alone (ratio >> 1). Using a
  band rather than the adjacent lines only averages out the ringing of sharp
  shapes' spectra (a hard-edged disc of radius r rings with a period of
  about H/r bins). Scale-free, so maps at initialisation (probabilities near
  0.5) and after training compare. This is the measure the project reports.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_BAND = 4  # lines each side of the Nyquist lines that set the reference level


def _spectra(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2 or min(maps.shape[-2:]) < 2 * _BAND + 2 or maps.shape[-2] % 2 or maps.shape[-1] % 2:
        raise ValueError(f"maps must be (..., H, W) with even H, W >= {2 * _BAND + 2}, got shape {maps.shape}")
    centred = maps - maps.mean(axis=(-2, -1), keepdims=True)
    return np.abs(np.fft.fft2(centred)) ** 2


def _line(spectrum: np.ndarray, row: int | None = None, col: int | None = None) -> np.ndarray:
    return spectrum[..., row, :].sum(-1) if row is not None else spectrum[..., :, col].sum(-1)


def nyquist_share(maps: np.ndarray) -> float:
    """Share of the maps' non-DC spectral energy on the Nyquist lines.

    Args:
        maps: (..., H, W) real values (e.g. probabilities (N, C, H, W)); H, W even, >= 10.

    Returns:
        Mean over the leading axes, in [0, 1] (0 for constant maps).

    Raises:
        ValueError: odd or too small H, W.
    """
    spectrum = _spectra(maps)
    h, w = spectrum.shape[-2:]
    nyquist = _line(spectrum, row=h // 2) + _line(spectrum, col=w // 2) - spectrum[..., h // 2, w // 2]
    total = spectrum.sum(axis=(-2, -1))
    return float(np.mean(np.where(total > 0, nyquist / np.maximum(total, 1e-300), 0.0)))


def checkerboard_score(maps: np.ndarray) -> float:
    """Period-2 peak ratio: Nyquist-line energy over the neighbouring lines'.

    Args:
        maps: (..., H, W) real values (probabilities, or gradients with
            respect to the input); H, W even, >= 10.

    Returns:
        Geometric mean over the leading axes of
        ``(E[ky=H/2] + E[kx=W/2]) / mean_d(E[ky=H/2+d] + E[kx=W/2+d])`` for
        d = +-1..4 (E: a line's summed energy); about 1 (or less) without a
        checkerboard, much more with one; 0 for constant maps.

    Raises:
        ValueError: odd or too small H, W.
    """
    spectrum = _spectra(maps)
    h, w = spectrum.shape[-2:]
    peak = _line(spectrum, row=h // 2) + _line(spectrum, col=w // 2)
    band = [d for d in range(-_BAND, _BAND + 1) if d]
    side = np.mean([_line(spectrum, row=h // 2 + d) + _line(spectrum, col=w // 2 + d) for d in band], axis=0)
    tiny = 1e-30 * max(float(spectrum.max()), 1e-300)
    ratio = np.where(peak > tiny, peak / np.maximum(side, tiny), 0.0)
    return float(np.exp(np.mean(np.log(np.maximum(ratio, 1e-12)))) if np.all(ratio > 0) else np.mean(ratio))


def input_gradient(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Gradient of the summed output probabilities with respect to the input.

    Args:
        model: logits network, (N, 1, H, W) -> (N, C, H, W).
        images: (N, 1, H, W) float32.

    Returns:
        (N, 1, H, W) float32 array, d sum(sigmoid(logits)) / d input.
        The model is left in the mode it was in.
    """
    x = images.detach().clone().requires_grad_(True)
    torch.sigmoid(model(x)).sum().backward()
    return x.grad.detach().numpy().astype(np.float32)


__all__ = ["checkerboard_score", "nyquist_share", "input_gradient"]
