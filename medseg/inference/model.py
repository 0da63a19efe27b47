"""Load a trained model for prediction: an MLflow model URI or a checkpoint."""

from __future__ import annotations

import hashlib

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_INTENSITY = {"lower_percentile": 0.5, "upper_percentile": 99.5}


@dataclass
class LoadedModel:
    """A probability model and what it needs to see.

    Attributes:
        module: maps float32 (N, 1, size, size) in [0, 1] to (N, C, size, size)
            probabilities.
        labels: C label names, channel order.
        size: square input side in pixels.
        intensity: percentiles for intensity normalisation.
        uri: where it came from (recorded in the results table).
    """

    module: torch.nn.Module
    labels: list[str]
    size: int
    intensity: dict = field(default_factory=lambda: dict(DEFAULT_INTENSITY))
    uri: str = ""

    def fingerprint(self) -> str:
        """SHA-256 of the weights (state dict tensors in order) plus the
        labels, size and intensity settings: which model made a result,
        whatever path or alias it was loaded through."""
        digest = hashlib.sha256(repr((self.labels, self.size, sorted(self.intensity.items()))).encode())
        for name, tensor in self.module.state_dict().items():
            digest.update(name.encode())
            # As raw bytes: numpy has no bfloat16.
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _from_checkpoint(path: Path) -> LoadedModel:
    from medseg.training.network import NetworkSpec, SigmoidHead, build_network

    state = torch.load(path, map_location="cpu", weights_only=False)
    settings = state["settings"]
    net = build_network(NetworkSpec(settings["network"], settings["preset"], settings["upsample"],
                                    out_channels=len(state["labels"])))
    net.load_state_dict(state["model"])
    intensity = dict(DEFAULT_INTENSITY)
    summary = path.parent / "model.json"  # written beside the checkpoints by `medseg train`
    if summary.exists():
        intensity = json.loads(summary.read_text()).get("intensity", intensity)
    return LoadedModel(SigmoidHead(net).eval(), list(state["labels"]), int(state["size"]), intensity,
                       str(path.resolve()))


def _from_mlflow(uri: str, tracking_uri: str | None) -> LoadedModel:
    import mlflow

    from medseg.tracking import default_tracking_uri

    tracking = default_tracking_uri(tracking_uri)
    if tracking.startswith("sqlite:///") and not Path(tracking[len("sqlite:///"):]).is_file():
        # MLflow would create an empty store there and then not find the model.
        raise FileNotFoundError(
            f"{uri}: no MLflow store at {tracking[len('sqlite:///'):]} (the default store is results/mlflow.db "
            "under the current folder); give --tracking-uri or set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for a missing model
        raise ValueError(f"{uri} not found in the MLflow store {tracking}: {err}") from err
    metadata = info.metadata or {}
    if "labels" not in metadata or "size" not in metadata:
        raise ValueError(f"{uri}: model has no medseg metadata (labels, size); was it logged by medseg train?")
    module = mlflow.pytorch.load_model(uri)
    return LoadedModel(module, list(metadata["labels"]), int(metadata["size"]),
                       dict(metadata.get("intensity") or DEFAULT_INTENSITY), uri)


def _from_summary(path: Path, tracking_uri: str | None) -> LoadedModel:
    """A fold's ``model.json``: its registered model version, or, when the
    run could not be tracked, the ``best.pt`` beside it. The cross-validation
    ``summary.json``: the chosen model, or the best fold's ``best.pt``."""
    summary = json.loads(path.read_text())
    if summary.get("model_uri"):
        return _from_mlflow(summary["model_uri"], tracking_uri or summary.get("tracking_uri"))
    if "best_fold" in summary:
        return _from_checkpoint(path.parent / f"fold{summary['best_fold']}" / "best.pt")
    return _from_checkpoint(path.parent / "best.pt")


def load_model(model: str, tracking_uri: str | None = None, device: torch.device | None = None) -> LoadedModel:
    """Load ``model``: an MLflow model URI (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``runs:/<id>/model``), a ``.pt`` checkpoint,
    a fold's ``model.json`` written by ``medseg train`` or the cross-validation
    ``summary.json`` written by ``medseg cv-finish``."""
    path = Path(model)
    if path.suffix == ".pt" and path.exists():
        loaded = _from_checkpoint(path)
    elif path.suffix == ".json" and path.exists():
        loaded = _from_summary(path, tracking_uri)
    else:
        loaded = _from_mlflow(model, tracking_uri)
    if device is not None:
        loaded.module = loaded.module.to(device)
    return loaded
