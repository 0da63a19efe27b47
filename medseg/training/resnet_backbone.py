"""A ResNet encoder for FCN-8s and DeepLabV3: MONAI's ``ResNet`` (basic
blocks, ResNet-18 layout), one input channel, widths from the preset,
randomly initialised (nothing is downloaded)."""

from __future__ import annotations

import torch
from monai.networks.nets.resnet import ResNet
from torch import nn


class ResNetBackbone(nn.Module):
    """(N, in_channels, H, W) -> features at 1/8, 1/16 and 1/32 of H, W.

    Args:
        in_channels: image channels.
        widths: channels of the four stages (ResNet-18: 64, 128, 256, 512).
        dilate_last: run the last stage at stride 1 with dilation 2
            (atrous convolution; DeepLab's output stride 16, Chen et al. 2017)
            instead of stride 2.

    ``forward`` returns a list of three tensors: (N, widths[1], H/8, W/8),
    (N, widths[2], H/16, W/16), (N, widths[3], H/32, W/32) (H/16 with
    ``dilate_last``). H and W must be multiples of 32.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int], dilate_last: bool = False) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.resnet = ResNet("basic", [2, 2, 2, 2], list(widths), spatial_dims=2, n_input_channels=in_channels,
                             conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", feed_forward=False)
        if dilate_last:
            # torchvision's replace_stride_with_dilation, done to MONAI's layer.
            for block in self.resnet.layer4:
                for conv in (block.conv1, block.conv2):
                    conv.stride, conv.dilation, conv.padding = (1, 1), (2, 2), (2, 2)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.act(r.bn1(r.conv1(x))))
        x = r.layer1(x)
        f8 = r.layer2(x)
        f16 = r.layer3(f8)
        return [f8, f16, r.layer4(f16)]


__all__ = ["ResNetBackbone"]
