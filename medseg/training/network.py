"""Networks (``train.network``) and what each can use as decoder upsampling
(``train.upsample``, :mod:`medseg.training.upsampling`).

- ``basic_unet``: MONAI BasicUNet (U-Net, Ronneberger et al. 2015); every
  upsampling but ``max_unpool``.
- ``unet``: MONAI UNet (residual units); its decoder is MONAI's transposed
  convolution with kernel 3, stride 2, so ``transposed`` only.
- ``segnet``: SegNet/DeconvNet-style encoder-decoder without skips
  (:mod:`medseg.training.segnet`); every upsampling, ``max_unpool`` included.
- ``fcn8s``: FCN-8s (:mod:`medseg.training.fcn`); ``transposed`` (learnable,
  bilinear-initialised, as Long et al.) or ``resize_bilinear`` (fixed).
- ``deeplabv3``: DeepLabV3 (:mod:`medseg.training.deeplab`);
  ``resize_bilinear`` (its x16 bilinear upsampling) only.

torchvision's ``fcn_resnet50`` / ``deeplabv3_resnet50`` are not used: the only
torchvision wheels on the package index are linked against CUDA torch and
fail to import with the CPU build (``operator torchvision::nms does not
exist``); FCN-8s and DeepLabV3 are built from MONAI's ResNet and SimpleASPP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.blocks import UpSample
from monai.networks.nets import BasicUNet, UNet
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from medseg.training.deeplab import DeepLabV3
from medseg.training.fcn import FCN8s
from medseg.training.segnet import SegNet
# NETWORKS, UPSAMPLING and NETWORK_UPSAMPLING are re-exported from here.
from medseg.training.choices import NETWORK_UPSAMPLING, NETWORKS, UPSAMPLING, check_network_choice, size_problem
from medseg.training.upsampling import Upsample2x

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
        name: a member of :data:`NETWORKS`.
        preset: a key of :data:`PRESETS` (widths; the ResNet encoders of
            fcn8s and deeplabv3 take entries 1-4 as their stage widths, so
            for them cpu_medium builds the same network as gpu_medium, and
            gpu_large the same as gpu_wide).
        upsample: a member of :data:`NETWORK_UPSAMPLING` ``[name]``.
        in_channels: 1 for radiographs.
        out_channels: one sigmoid channel per label.
    """

    name: str = "basic_unet"
    preset: str = "cpu_small"
    upsample: str = "resize_bilinear"
    in_channels: int = 1
    out_channels: int = 3

    def __post_init__(self) -> None:
        check_network_choice(self.name, self.upsample)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.out_channels < 1:
            raise ValueError("out_channels must be at least 1")


_MONAI_UPSAMPLE = {"transposed": "deconv", "resize_nearest": "nontrainable",
                   "resize_bilinear": "nontrainable", "pixel_shuffle": "pixelshuffle"}


def build_network(spec: NetworkSpec) -> nn.Module:
    """Build the network, randomly initialised; input (N, in_channels, H, W)
    float -> logits (N, out_channels, H, W).

    Raises:
        ValueError: from :class:`NetworkSpec` for unknown or unsupported choices.
    """
    features = PRESETS[spec.preset]
    if spec.name == "segnet":
        return SegNet(spec.in_channels, spec.out_channels, features[:5], spec.upsample)
    if spec.name == "fcn8s":
        return FCN8s(spec.in_channels, spec.out_channels, features[1:5],
                     learnable_upsampling=spec.upsample == "transposed")
    if spec.name == "deeplabv3":
        return DeepLabV3(spec.in_channels, spec.out_channels, features[1:5], aspp_channels=features[3])
    if spec.name == "unet":
        return UNet(spatial_dims=2, in_channels=spec.in_channels, out_channels=spec.out_channels,
                    channels=features[:5], strides=(2, 2, 2, 2), num_res_units=2, norm="instance")
    if spec.upsample in ("transposed_k3s2", "bed_of_nails"):
        # Same channels as BasicUNet's own transposed convolution; own step.
        net = BasicUNet(spatial_dims=2, in_channels=spec.in_channels, out_channels=spec.out_channels,
                        features=features, upsample="deconv")
        for module in [m for m in net.modules() if isinstance(m, UpCat)]:
            deconv = module.upsample.deconv
            module.upsample = Upsample2x(spec.upsample, deconv.in_channels, deconv.out_channels)
        return net
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


def check_input_size(spec: NetworkSpec, size: int, key: str = "preprocess.size") -> None:
    """Refuse an image side the network cannot take
    (:func:`medseg.training.choices.size_problem`).

    Raises:
        medseg.errors.SettingsMismatch: naming the network, the need and ``size`` (pixels).
    """
    from medseg.errors import SettingsMismatch

    problem = size_problem(spec.name, size, key)
    if problem:
        raise SettingsMismatch(problem)


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
