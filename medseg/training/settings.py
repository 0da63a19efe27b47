"""Training settings: the ``train`` section of the workflow config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medseg.training.data import AugmentSettings
from medseg.training.network import NETWORKS, PRESETS, UPSAMPLING, NetworkSpec

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "poly", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")


# Fields added after checkpoints were first written, with their defaults.
_ADDED_LATER: dict[str, Any] = {"ema_decay": 0.0, "patch_size": 0, "soft_labels": False}


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def check_value_types(settings: Any, section: str) -> None:
    """Refuse values of the wrong type for a settings dataclass's plain fields
    (YAML's quoted ``"false"`` is text, and text is truthy).

    The expected type is the field default's: bool, int (not bool), float
    (int accepted) or str. Other fields are left to their own checks.

    Raises:
        ValueError: naming ``section.field``, what it must be and the value.
    """
    for item in dataclasses.fields(settings):
        default = item.default
        kind = next((t for t in (bool, int, float, str) if isinstance(default, t)), None)
        if kind is None:
            continue
        value = getattr(settings, item.name)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            hint = ""
            if kind is float and isinstance(value, str) and _parses_as_float(value):
                hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3 or 0.001)"
            raise ValueError(f"{section}.{item.name} must be {_TYPE_NAMES[kind]}, got {value!r}{hint}")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run's result.

    Attributes:
        network, preset, upsample: see :mod:`medseg.training.network`.
        epochs: passes over the training cases (>= 1).
        samples_per_epoch: augmented samples per epoch; 0 = one per training
            case. Larger values repeat the cases (small datasets).
        batch_size: images per step.
        optimizer: "adamw" or "sgd" (Nesterov momentum).
        learning_rate, weight_decay, momentum: optimiser settings.
        scheduler: "cosine" (to 0 at the last epoch), "poly" (power 0.9), "none".
        lambda_dice, lambda_ce: weights of the Dice and BCE terms.
        label_weights: optional {label: weight} against class imbalance
            (the clavicles are small); missing labels weigh 1.
        validate_every: validate every N epochs (and at the last).
        overlay_every: save validation overlays every N epochs.
        seed: seeds initialisation, shuffling and augmentation.
        amp: mixed precision on CUDA: "auto" (bf16 where supported, else
            fp16), "bf16", "fp16" or "off". Never used on CPU.
        device: "auto" (CUDA when present), "cpu" or "cuda".
        num_workers: data-loading processes; -1 = auto (0 on CPU, where the
            cores are better spent on the network; several on CUDA).
        augment: see :class:`AugmentSettings`.
        ema_decay: exponential moving average of the weights, updated after
            every step (0 = off). Validation, ``best.pt`` and the logged model
            use the averaged weights (Polyak averaging; e.g. 0.99 averages
            over about the last 100 steps).
        patch_size: train on random patch_size x patch_size patches of the
            preprocessed images (0 = whole images); validation and prediction
            still see whole images (which measured poorly after patch
            training: docs/accuracy.md, s6). Multiple of 16 (the network's
            4 halvings).
        soft_labels: train on the masks' partial-volume shares of each
            preprocessed pixel (soft targets in [0, 1]; BCE and soft Dice
            take them as they are) instead of the masks thresholded at half a
            pixel. At 256 px from 1024 px masks, thresholding alone costs the
            clavicles 0.045 Jaccard (0.955 against 0.989 scored back at
            1024 px over SCR fold 1's first 40 cases; lungs and heart 0.990
            against 0.998): boundaries learnt from {0, 1} targets sit on the
            pixel grid. Validation still scores the thresholded masks.
            Measured on JSRT at 256 px: no gain (docs/accuracy.md, s11).
    """

    network: str = "basic_unet"
    preset: str = "cpu_small"
    upsample: str = "resize_bilinear"
    epochs: int = 40
    samples_per_epoch: int = 0
    batch_size: int = 8
    optimizer: str = "adamw"
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.99
    scheduler: str = "cosine"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    label_weights: Mapping[str, float] = field(default_factory=dict)
    validate_every: int = 1
    overlay_every: int = 5
    seed: int = 0
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = -1
    augment: AugmentSettings = AugmentSettings()
    ema_decay: float = 0.0
    patch_size: int = 0
    soft_labels: bool = False

    def __post_init__(self) -> None:
        check_value_types(self, "train")
        if isinstance(self.augment, AugmentSettings):
            check_value_types(self.augment, "train.augment")
        NetworkSpec(self.network, self.preset, self.upsample)  # raises on bad names
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.samples_per_epoch >= 0, f"samples_per_epoch must be >= 0, got {self.samples_per_epoch}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"),
            (self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}"),
            (self.amp in AMP_MODES, f"unknown amp {self.amp!r}; choose from {', '.join(AMP_MODES)}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.patch_size >= 0 and self.patch_size % 16 == 0,
             f"patch_size must be 0 or a positive multiple of 16, got {self.patch_size}"),
            (self.validate_every >= 1, f"validate_every must be at least 1, got {self.validate_every}"),
            (self.overlay_every >= 1, f"overlay_every must be at least 1, got {self.overlay_every}"),
            (self.lambda_dice >= 0 and self.lambda_ce >= 0 and self.lambda_dice + self.lambda_ce > 0,
             "lambda_dice and lambda_ce must be >= 0 and not both 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainSettings:
        """Build from a config mapping; unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train setting(s): {', '.join(unknown)}")
        values = dict(values)
        if "augment" in values:
            if not isinstance(values["augment"], Mapping):
                raise ValueError(f"train.augment must be a mapping of settings, got {values['augment']!r}")
            aug_known = {f.name for f in dataclasses.fields(AugmentSettings)}
            aug_unknown = sorted(set(values["augment"]) - aug_known)
            if aug_unknown:
                raise ValueError(f"unknown train.augment setting(s): {', '.join(aug_unknown)}")
            values["augment"] = AugmentSettings(**values["augment"])
        if "label_weights" in values:
            values["label_weights"] = dict(values["label_weights"] or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["label_weights"] = dict(self.label_weights)
        return data

    def fingerprint(self) -> str:
        """Hash of the settings that change results (checkpoints record it,
        so a changed config never resumes an old run)."""
        data = self.to_dict()
        for volatile in ("num_workers", "device", "overlay_every"):
            data.pop(volatile)
        # Settings added later hash only when set: a checkpoint written before
        # they existed still resumes (same behaviour, same fingerprint).
        for added, default in _ADDED_LATER.items():
            if data.get(added) == default:
                data.pop(added)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["TrainSettings", "NETWORKS", "PRESETS", "UPSAMPLING", "OPTIMIZERS", "SCHEDULERS"]
