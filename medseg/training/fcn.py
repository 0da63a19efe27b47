"""FCN-8s: a fully convolutional network with skip fusion of predictions.

Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015: 1x1 "score" layers on the encoder's features at
1/32, 1/16 and 1/8; the 1/32 scores upsampled x2 and added to the 1/16
scores, that sum upsampled x2 and added to the 1/8 scores, the result
upsampled x8 to the input. The upsampling is learnable (transposed
convolutions initialised to bilinear interpolation, as in the paper) or fixed
bilinear. The encoder here is a ResNet-18 layout (the paper used VGG-16).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.training.resnet_backbone import ResNetBackbone
from medseg.training.segnet import pad_to_multiple


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """(channels, channels, k, k) transposed-convolution weights that upsample
    each channel bilinearly on its own (Long et al.'s ``upsample_filt``)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    grid = np.ogrid[:kernel_size, :kernel_size]
    filt = (1 - abs(grid[0] - center) / factor) * (1 - abs(grid[1] - center) / factor)
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = torch.as_tensor(filt, dtype=torch.float32)
    return weight


def _learnable_upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    """x``factor`` transposed convolution, kernel 2*factor, bilinear start."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return up


class FCN8s(nn.Module):
    """FCN-8s on a ResNet encoder.

    Args:
        in_channels: image channels (1).
        out_channels: labels (one logit map each).
        widths: the encoder's four stage widths.
        learnable_upsampling: transposed convolutions (bilinear-initialised)
            if true, fixed bilinear interpolation if false.

    Input (N, in_channels, H, W) float, any H, W (padded to a multiple of 32
    inside, cropped back); output (N, out_channels, H, W) logits.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, int, int, int],
                 learnable_upsampling: bool = True) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(in_channels, widths)
        self.score8 = nn.Conv2d(widths[1], out_channels, 1)
        self.score16 = nn.Conv2d(widths[2], out_channels, 1)
        self.score32 = nn.Conv2d(widths[3], out_channels, 1)
        self.learnable = learnable_upsampling
        if learnable_upsampling:
            self.up32 = _learnable_upsample(out_channels, 2)
            self.up16 = _learnable_upsample(out_channels, 2)
            self.up8 = _learnable_upsample(out_channels, 8)

    def _up(self, x: torch.Tensor, layer: str, factor: int) -> torch.Tensor:
        if self.learnable:
            return getattr(self, layer)(x)
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 32)
        f8, f16, f32 = self.backbone(x)
        fused = self._up(self.score32(f32), "up32", 2) + self.score16(f16)
        fused = self._up(fused, "up16", 2) + self.score8(f8)
        return self._up(fused, "up8", 8)[..., :h, :w]


__all__ = ["FCN8s", "bilinear_kernel"]
