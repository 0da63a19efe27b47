"""Which networks and decoder upsamplings exist, which pairs fit, and what
image sizes each network takes. Plain data and checks, no torch import, so
the workflow can refuse a bad config before any job runs.

Sizes: MONAI UNet's four stride-2 convolutions and concatenations need the
image side to be a multiple of 16 (the other networks pad inside and crop
back); the ResNet encoders of fcn8s and deeplabv3 reduce to 1/32, and their
batch normalisation needs more than one value per channel, so they need at
least 64 px (2x2 at the deepest level, even for a batch of one).
"""

from __future__ import annotations

UPSAMPLING = ("transposed", "resize_nearest", "resize_bilinear", "pixel_shuffle",
              "transposed_k3s2", "bed_of_nails", "max_unpool")
NETWORKS = ("basic_unet", "unet", "segnet", "fcn8s", "deeplabv3")
# What each network's decoder can use.
NETWORK_UPSAMPLING: dict[str, tuple[str, ...]] = {
    "basic_unet": tuple(u for u in UPSAMPLING if u != "max_unpool"),
    "unet": ("transposed",),
    "segnet": UPSAMPLING,
    "fcn8s": ("transposed", "resize_bilinear"),
    "deeplabv3": ("resize_bilinear",),
}
INPUT_MULTIPLE: dict[str, int] = {"unet": 16}
MIN_SIZE: dict[str, int] = {"fcn8s": 64, "deeplabv3": 64}


def check_network_choice(network: str, upsample: str) -> None:
    """Refuse unknown names and pairs that do not fit.

    Raises:
        ValueError: naming the value and what to choose from.
    """
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; choose from {', '.join(NETWORKS)}")
    if upsample not in UPSAMPLING:
        raise ValueError(f"unknown upsampling {upsample!r}; choose from {', '.join(UPSAMPLING)}")
    if upsample not in NETWORK_UPSAMPLING[network]:
        others = [n for n, modes in NETWORK_UPSAMPLING.items() if upsample in modes]
        raise ValueError(f"network {network!r} cannot use upsample {upsample!r}: it takes "
                         f"{', '.join(NETWORK_UPSAMPLING[network])}; {upsample!r} works with {', '.join(others)}")


def size_problem(network: str, size: int, key: str = "preprocess.size") -> str | None:
    """Why ``network`` cannot take square inputs of side ``size`` px, or
    None; ``key`` names the setting in the message (``train.patch_size``
    for patch training)."""
    multiple = INPUT_MULTIPLE.get(network, 1)
    if size % multiple:
        return (f"network {network!r} needs {key} to be a multiple of {multiple}, got {size} "
                "(basic_unet, segnet, fcn8s and deeplabv3 take any size)")
    minimum = MIN_SIZE.get(network, 0)
    if size < minimum:
        return f"network {network!r} needs {key} of at least {minimum}, got {size}"
    return None


__all__ = ["UPSAMPLING", "NETWORKS", "NETWORK_UPSAMPLING", "INPUT_MULTIPLE", "MIN_SIZE",
           "check_network_choice", "size_problem"]
