"""Networks: MONAI U-Nets with a configurable decoder upsampling.

Upsampling choices (decoder, each level x2):
- ``transposed``: transposed convolution (learned; can leave checkerboard
  artifacts when kernel size is not divisible by the stride).
- ``resize_nearest`` / ``resize_bilinear``: resize, then convolution
  ("resize-convolution", Odena et al. 2016): no checkerboard by construction.
- ``pixel_shuffle``: sub-pixel convolution (Shi et al. 2016) with ICNR init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.blocks import UpSample
from monai.networks.nets import BasicUNet, UNet
from monai.networks.nets.basic_unet import UpCat
from torch import nn

NETWORKS = ("basic_unet", "unet")
UPSAMPLING = ("transposed", "resize_nearest", "resize_bilinear", "pixel_shuffle")

# Feature widths (BasicUNet: 5 encoder levels + final decoder width).
PRESETS: dict[str, tuple[int, ...]] = {
    "cpu_tiny": (8, 8, 16, 32, 64, 8),  # tests and CI
    "cpu_small": (16, 16, 32, 64, 128, 16),  # demo on a laptop
    "cpu_medium": (16, 32, 64, 128, 256, 16),  # MONAI UNet tutorial widths (network "unet": the JSRT CPU recipe)
    "gpu_medium": (32, 32, 64, 128, 256, 32),  # MONAI's default widths
    "gpu_large": (64, 64, 128, 256, 512, 64),  # accuracy runs at 512-1024 px
    "gpu_wide": (32, 64, 128, 256, 512, 32),  # cpu_medium x 2 (network "unet": the JSRT GPU recipe)
}


@dataclass(frozen=True)
class NetworkSpec:
    """What to build.

    Attributes:
        name: "basic_unet" (MONAI BasicUNet) or "unet" (MONAI UNet, residual units).
        preset: a key of :data:`PRESETS`.
        upsample: a member of :data:`UPSAMPLING`.
        in_channels: 1 for radiographs.
        out_channels: one sigmoid channel per label.
    """

    name: str = "basic_unet"
    preset: str = "cpu_small"
    upsample: str = "resize_bilinear"
    in_channels: int = 1
    out_channels: int = 3

    def __post_init__(self) -> None:
        if self.name not in NETWORKS:
            raise ValueError(f"unknown network {self.name!r}; choose from {', '.join(NETWORKS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"unknown upsampling {self.upsample!r}; choose from {', '.join(UPSAMPLING)}")
        if self.name == "unet" and self.upsample != "transposed":
            raise ValueError("network 'unet' (MONAI UNet) only has transposed-convolution upsampling; "
                             "use basic_unet for resize or pixel-shuffle decoders")
        if self.out_channels < 1:
            raise ValueError("out_channels must be at least 1")


_MONAI_UPSAMPLE = {"transposed": "deconv", "resize_nearest": "nontrainable",
                   "resize_bilinear": "nontrainable", "pixel_shuffle": "pixelshuffle"}


def build_network(spec: NetworkSpec) -> nn.Module:
    """Build the network; input (N, in_channels, H, W) -> logits (N, out_channels, H, W).

    H and W must be divisible by 16 (four poolings).
    """
    features = PRESETS[spec.preset]
    if spec.name == "unet":
        return UNet(spatial_dims=2, in_channels=spec.in_channels, out_channels=spec.out_channels,
                    channels=features[:5], strides=(2, 2, 2, 2), num_res_units=2, norm="instance")
    net = BasicUNet(spatial_dims=2, in_channels=spec.in_channels, out_channels=spec.out_channels,
                    features=features, upsample=_MONAI_UPSAMPLE[spec.upsample])
    if spec.upsample == "resize_nearest":
        # BasicUNet's "nontrainable" mode is always (bi)linear; swap in nearest
        # with the same 1x1 channel-halving pre-convolution.
        # (The last level keeps its width and has no pre-convolution.)
        for module in [m for m in net.modules() if isinstance(m, UpCat)]:
            conv = getattr(module.upsample, "preconv", None)
            module.upsample = UpSample(
                2, conv.in_channels if conv else None, conv.out_channels if conv else None, 2,
                mode="nontrainable", pre_conv="default" if conv else None,
                interp_mode="nearest", align_corners=None)
    return net


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SigmoidHead(nn.Module):
    """Wraps a logits network so its output is per-label probabilities.

    This is what gets logged to MLflow: pyfunc users get probabilities in
    [0, 1], shape (N, C, H, W), from float32 input (N, 1, H, W) in [0, 1].
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))
