"""SegNet / DeconvNet-style encoder-decoder ("upside-down VGG"), with the
decoder's upsampling as a switch.

Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017; Noh, Hong &
Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015.
No skip connections: everything the decoder knows of position comes through
the upsampling (with ``max_unpool``, the encoder's pooling indices), which is
what makes it the network on which decoders differ most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import TwoConv
from torch import nn

from medseg.training.upsampling import Upsample2x

# BasicUNet's blocks, so the two differ only in skips and upsampling.
_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
_NORM = ("instance", {"affine": True})


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (N, C, H, W) at the bottom/right to multiples of ``multiple``;
    returns the padded tensor and the original (H, W) to crop back to."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x, (h, w)


class SegNet(nn.Module):
    """Encoder (4 x [two 3x3 conv blocks, 2x2 max-pool with indices]) ->
    two conv blocks at 1/16 -> decoder (4 x [x2 upsampling, two conv blocks])
    -> 1x1 convolution to logits.

    Args:
        in_channels: image channels (1).
        out_channels: labels (one logit map each).
        features: 5 widths, full resolution to 1/16 (e.g. (16, 16, 32, 64, 128)).
        upsample: a member of :data:`medseg.training.upsampling.UPSAMPLING`.

    Input (N, in_channels, H, W) float, any H, W (padded to a multiple of 16
    inside, cropped back); output (N, out_channels, H, W) logits.
    """

    def __init__(self, in_channels: int, out_channels: int, features: tuple[int, ...], upsample: str) -> None:
        super().__init__()
        widths = tuple(features[:5])
        if len(widths) != 5:
            raise ValueError(f"SegNet needs 5 widths, got {features}")
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths[:4]:
            self.encoders.append(TwoConv(2, previous, width, _ACT, _NORM, True, 0.0))
            previous = width
        self.bottleneck = TwoConv(2, widths[3], widths[4], _ACT, _NORM, True, 0.0)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(4)):
            self.ups.append(Upsample2x(upsample, widths[level + 1], widths[level]))
            self.decoders.append(TwoConv(2, widths[level], widths[level], _ACT, _NORM, True, 0.0))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 16)
        indices = []
        for encoder in self.encoders:
            x, index = F.max_pool2d(encoder(x), 2, return_indices=True)
            indices.append(index)
        x = self.bottleneck(x)
        for up, decoder, index in zip(self.ups, self.decoders, reversed(indices)):
            x = decoder(up(x, index))
        return self.head(x)[..., :h, :w]


__all__ = ["SegNet", "pad_to_multiple"]
