"""Multi-label Dice + binary cross-entropy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


class MultiLabelDiceCELoss(DiceCELoss):
    """MONAI DiceCELoss (sigmoid Dice) with a per-channel *binary* CE term.

    MONAI's DiceCELoss uses softmax cross-entropy whenever the input has more
    than one channel, even with ``sigmoid=True``; for overlapping labels
    (clavicles over lungs) each channel needs its own BCE.

    Args:
        label_weights: (C,) weights applied to each channel's Dice and BCE
            terms (normalised to mean 1), or None.
        lambda_dice, lambda_ce: term weights.

    Input: logits (N, C, H, W); target: (N, C, H, W) in {0, 1}.
    """

    def __init__(self, label_weights: torch.Tensor | None = None, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0) -> None:
        if label_weights is not None:
            label_weights = torch.as_tensor(label_weights, dtype=torch.float32)
            label_weights = label_weights / label_weights.mean()
        super().__init__(sigmoid=True, weight=label_weights, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.register_buffer("channel_weights", label_weights if label_weights is not None else torch.empty(0))

    def ce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - MONAI's name
        weight = None
        if self.channel_weights.numel():
            weight = self.channel_weights.to(input.dtype).view(1, -1, *([1] * (input.ndim - 2)))
        return F.binary_cross_entropy_with_logits(input, target.to(input.dtype), weight=weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return self.lambda_dice * self.dice(input, target) + self.lambda_ce * self.ce(input, target)


def label_weight_tensor(labels: Sequence[str], weights: Mapping[str, float]) -> torch.Tensor | None:
    """(C,) weights in label order, 1 where unspecified; None when all are 1."""
    unknown = sorted(set(weights) - set(labels))
    if unknown:
        raise ValueError(f"label_weights names unknown labels: {', '.join(unknown)}")
    values = [float(weights.get(name, 1.0)) for name in labels]
    if all(v == 1.0 for v in values):
        return None
    return torch.tensor(values)
