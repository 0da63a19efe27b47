"""DeepLabV3: atrous convolution and atrous spatial pyramid pooling (ASPP).

Chen, Papandreou, Schroff & Adam, "Rethinking Atrous Convolution for Semantic
Image Segmentation", arXiv:1706.05587 (2017): a ResNet whose last stage runs
dilated (output stride 16), ASPP with rates 6, 12, 18 plus a 1x1 branch
(MONAI's ``SimpleASPP``) and an image-pooling branch, a 1x1 projection, a 3x3
convolution, a 1x1 classifier, and bilinear x16 upsampling to the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import SimpleASPP
from torch import nn

from medseg.training.resnet_backbone import ResNetBackbone
from medseg.training.segnet import pad_to_multiple


class DeepLabV3(nn.Module):
    """DeepLabV3 on a ResNet encoder (ResNet-18 layout, last stage dilated).

    Args:
        in_channels: image channels (1).
        out_channels: labels (one logit map each).
        widths: the encoder's four stage widths.
        aspp_channels: channels of each ASPP branch (256 in the paper).

    Input (N, in_channels, H, W) float, any H, W (padded to a multiple of 32
    inside, cropped back); output (N, out_channels, H, W) logits.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, int, int, int],
                 aspp_channels: int) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(in_channels, widths, dilate_last=True)
        self.aspp = SimpleASPP(2, widths[3], aspp_channels, kernel_sizes=(1, 3, 3, 3), dilations=(1, 6, 12, 18),
                               norm_type="BATCH", acti_type="RELU")
        # No norm on the pooled branch: a 1x1 map cannot be batch-normalised
        # with batch size 1.
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(widths[3], aspp_channels, 1),
                                        nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(5 * aspp_channels, aspp_channels, 1, bias=False),
                                     nn.BatchNorm2d(aspp_channels), nn.ReLU(inplace=True),
                                     nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(aspp_channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(aspp_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 32)
        features = self.backbone(x)[-1]
        pooled = self.image_pool(features).expand(-1, -1, *features.shape[-2:])
        y = self.classifier(self.project(torch.cat([self.aspp(features), pooled], dim=1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]


__all__ = ["DeepLabV3"]
