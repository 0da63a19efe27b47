"""Models shipped inside the medseg package: ``medseg predict`` works on a
fresh install, with no training and no MLflow store.

Each model is a checkpoint (``<name>.pt``: weights plus the model's contract,
see :func:`medseg.inference.model.checkpoint_contract`) and a card
(``<name>.json``): what it was trained on, its cross-validation figures, its
SHA-256 and the terms of its training data. ``medseg models`` prints the
cards; ``benchmarks/jsrt.py --ship NAME`` trains one and writes both files
(docs/accuracy.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# ``medseg predict`` without --model uses this one, when it is shipped.
DEFAULT_MODEL = "jsrt-cpu"


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model.

    Attributes:
        name: what ``--model`` accepts (e.g. "jsrt-cpu").
        checkpoint: the ``.pt`` file inside the installed package.
        card: the parsed ``<name>.json`` (keys: description, labels, size,
            training, cross_validation, terms, sha256).
    """

    name: str
    checkpoint: Path
    card: dict[str, Any]

    def verify(self) -> None:
        """Check the checkpoint against the card's SHA-256.

        Raises:
            ValueError: the file is missing or altered (e.g. a Git LFS
                pointer instead of the weights).
        """
        if not self.checkpoint.is_file():
            raise ValueError(f"shipped model {self.name}: {self.checkpoint} is missing")
        digest = hashlib.sha256(self.checkpoint.read_bytes()).hexdigest()
        if digest != self.card.get("sha256"):
            raise ValueError(f"shipped model {self.name}: {self.checkpoint} does not match its card's SHA-256 "
                             f"({digest[:12]}... vs {str(self.card.get('sha256'))[:12]}...)")


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def shipped_models() -> list[ShippedModel]:
    """Every model shipped with this installation, by name."""
    models = []
    for card_path in sorted(_folder().glob("*.json")):
        try:
            card = json.loads(card_path.read_text())
            if not isinstance(card, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:  # one broken card must not break every prediction
            log.warning("shipped model card %s is unreadable (%s); that model is not offered", card_path, err)
            continue
        models.append(ShippedModel(card_path.stem, card_path.with_name(card.get("file", f"{card_path.stem}.pt")),
                                   card))
    return models


def shipped_model(name: str) -> ShippedModel | None:
    """The shipped model called ``name``, or None."""
    return next((m for m in shipped_models() if m.name == name), None)


def default_model() -> str | None:
    """``--model``'s default: :data:`DEFAULT_MODEL` when it is shipped, else None."""
    return DEFAULT_MODEL if shipped_model(DEFAULT_MODEL) is not None else None


def describe_shipped_model(model: ShippedModel, default: bool = False) -> str:
    """A shipped model's card as text (``medseg models``): name, what it
    segments, its cross-validation figures per structure, training data and
    the data's terms of use."""
    card = model.card
    lines = [f"{model.name}{'  (default --model)' if default else ''}",
             f"  {card.get('description', '')}",
             f"  labels (channel order): {', '.join(card.get('labels', []))}; input {card.get('size')} x "
             f"{card.get('size')} px; file {model.checkpoint.name}, "
             f"{model.checkpoint.stat().st_size / 1e6 if model.checkpoint.is_file() else float('nan'):.1f} MB, "
             f"SHA-256 {str(card.get('sha256', ''))[:16]}..."]
    training = card.get("training", {})
    if training:
        lines.append(f"  trained on: {training.get('data', '?')} with {training.get('recipe', '?')}"
                     f" ({training.get('epochs', '?')} epochs, {training.get('seconds', 0) / 60:.0f} min on "
                     f"{training.get('device', '?')}); scans from this data set are its training cases, not a test")
    cv = card.get("cross_validation", {})
    if cv:
        lines.append(f"  held-out figures of its recipe ({cv.get('protocol', '')}; {cv.get('n_cases', '?')} "
                     "held-out cases, scored at 1024 x 1024):")
        lines.append(f"    {'structure':<10} {'Jaccard':>8} {'Dice':>7} {'HD95 mm':>8} {'ASSD mm':>8}")
        for label, figures in cv.get("structures", {}).items():
            lines.append(f"    {label:<10} {figures['jaccard']:>8.3f} {figures['dice']:>7.3f} "
                         f"{figures['hd95_mm']:>8.2f} {figures['assd_mm']:>8.2f}")
        if "ctr_abs_error_mean" in cv:
            lines.append(f"    CTR |error| vs the expert masks: mean {cv['ctr_abs_error_mean']:.4f}; cardiomegaly "
                         f"(CTR > 0.5) called as by the expert masks in "
                         f"{100 * cv.get('cardiomegaly_agreement', float('nan')):.1f} % of cases")
    if card.get("qc", {}).get("min_confidence") is not None:
        lines.append(f"  QC: low_confidence below a boundary confidence of {card['qc']['min_confidence']:g} "
                     "(chosen on held-out cases)")
    if card.get("terms"):
        lines.append(f"  terms: {card['terms']}")
    return "\n".join(lines)
