"""Decoder upsampling: one x2 step of a decoder, in each of the ways the
segmentation literature uses (Odena, Dumoulin & Olah, "Deconvolution and
Checkerboard Artifacts", Distill 2016; Noh et al., "Learning Deconvolution
Network for Semantic Segmentation", ICCV 2015; Badrinarayanan et al., "SegNet",
TPAMI 2017; Shi et al., "Real-Time Single Image and Video Super-Resolution
Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016).

Every choice maps (N, C_in, H, W) float to (N, C_out, 2H, 2W):

- ``resize_nearest`` / ``resize_bilinear``: 1x1 convolution to C_out, then a
  fixed resize; with the decoder's 3x3 convolutions after it this is
  "resize-convolution": no checkerboard, before or after training.
- ``bed_of_nails``: 1x1 convolution, then zero insertion (each value at the
  top-left of its 2x2 cell, zeros elsewhere). Followed by a 3x3 convolution
  it is the same operation as a kernel-3 stride-2 transposed convolution.
- ``max_unpool``: 1x1 convolution, then each value goes back to the position
  the encoder's 2x2 max-pooling took it from (``torch.nn.MaxUnpool2d``); needs
  the pooling indices, so only encoder-decoders that keep them (``segnet``).
- ``transposed``: transposed convolution, kernel 2 stride 2 (MONAI's
  ``UpSample(mode="deconv")``): every output pixel gets exactly one kernel tap,
  even overlap.
- ``transposed_k3s2``: transposed convolution, kernel 3 stride 2 (the
  lecture's uneven-overlap example): output pixels alternately get 1, 2 or 4
  taps, so a checkerboard shows even at initialisation.
- ``pixel_shuffle``: sub-pixel convolution with ICNR initialisation (MONAI's
  ``SubpixelUpsample``), which starts out equal to nearest-neighbour resize.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UpSample
from torch import nn

from medseg.training.choices import UPSAMPLING


class BedOfNails(nn.Module):
    """Zero insertion, x2: (N, C, H, W) -> (N, C, 2H, 2W), value at the
    top-left of each 2x2 cell, zeros elsewhere (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = x.new_zeros(n, c, 2 * h, 2 * w)
        out[..., ::2, ::2] = x
        return out


class Upsample2x(nn.Module):
    """One decoder upsampling step: (N, C_in, H, W) -> (N, C_out, 2H, 2W).

    Args:
        mode: a member of :data:`UPSAMPLING`.
        in_channels, out_channels: channels before and after.

    ``forward(x, indices=None)``: ``indices`` are the (N, C_out, 2H, 2W)
    -> (N, C_out, H, W) max-pooling indices that ``max_unpool`` needs.

    Raises:
        ValueError: unknown mode; ``max_unpool`` called without indices.
    """

    def __init__(self, mode: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if mode not in UPSAMPLING:
            raise ValueError(f"unknown upsampling {mode!r}; choose from {', '.join(UPSAMPLING)}")
        self.mode = mode
        if mode == "transposed":
            self.up = UpSample(2, in_channels, out_channels, 2, mode="deconv")
        elif mode == "transposed_k3s2":
            self.up = UpSample(2, in_channels, out_channels, 2, kernel_size=3, mode="deconv")
        elif mode == "pixel_shuffle":
            self.up = UpSample(2, in_channels, out_channels, 2, mode="pixelshuffle")
        elif mode in ("resize_nearest", "resize_bilinear"):
            nearest = mode == "resize_nearest"
            self.up = UpSample(2, in_channels, out_channels, 2, mode="nontrainable", pre_conv="default",
                               interp_mode="nearest" if nearest else "bilinear",
                               align_corners=None if nearest else True)
        else:  # bed_of_nails, max_unpool: a 1x1 channel change, then the parameter-free step
            self.pre = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            self.up = BedOfNails() if mode == "bed_of_nails" else nn.MaxUnpool2d(2)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "max_unpool":
            if indices is None:
                raise ValueError("max_unpool needs the encoder's max-pooling indices")
            x = self.pre(x)
            return self.up(x, indices, output_size=(2 * x.shape[-2], 2 * x.shape[-1]))
        if self.mode == "bed_of_nails":
            return self.up(self.pre(x))
        return self.up(x)


__all__ = ["UPSAMPLING", "BedOfNails", "Upsample2x"]
