"""Load a trained model for prediction: an MLflow model URI, a checkpoint or
an ONNX file; and which runtime (backend) runs it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medseg.inference.backend import is_onnx_reference, resolve_backend
from medseg.inference.ctr import DEFAULT_MIN_CONFIDENCE
from medseg.preprocessing.intensity import DEFAULT_INTENSITY

log = logging.getLogger(__name__)


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
        min_confidence: "low_confidence" QC flag below this boundary-band
            confidence (:func:`medseg.inference.ctr.boundary_confidence`);
            calibrated on cross-validation when the model records one.
        thresholds: {label: probability threshold} chosen on cross-validation,
            when the model records them; labels missing here use 0.5.
        network: how the network was built ({"network", "preset", "upsample"}),
            when the model records it; an ensemble's: {"ensemble": [member's, ...]}.
        backend: the runtime that runs ``module``: "pytorch", or
            "onnxruntime" (:mod:`medseg.inference.onnx_model`).
        fingerprint_override: what :meth:`fingerprint` returns when torch
            cannot see the weights (an ONNX Runtime session holds them): e.g.
            the SHA-256 of the ``.onnx`` file. None for PyTorch modules.
        amp: mixed precision of its training ("auto", "bf16", "fp16",
            "off"); prediction on CUDA autocasts the same way (a model
            trained in full precision is predicted in full precision).
    """

    module: torch.nn.Module
    labels: list[str]
    size: int
    intensity: dict = field(default_factory=lambda: dict(DEFAULT_INTENSITY))
    uri: str = ""
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    thresholds: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)
    backend: str = "pytorch"
    fingerprint_override: str | None = None
    amp: str = "auto"

    def fingerprint(self) -> str:
        """SHA-256 of the weights (state dict tensors in order) plus the
        labels, size and intensity settings: which model made a result,
        whatever path or alias it was loaded through. ``fingerprint_override``
        instead, when set (an ONNX model: its file's SHA-256)."""
        if self.fingerprint_override is not None:
            return self.fingerprint_override
        digest = hashlib.sha256(repr((self.labels, self.size, sorted(self.intensity.items()))).encode())
        for name, tensor in self.module.state_dict().items():
            digest.update(name.encode())
            # As raw bytes: numpy has no bfloat16.
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class ProbabilityEnsemble(torch.nn.Module):
    """Mean of several models' probabilities (nnU-Net's cross-validation
    ensemble: each fold's network sees the same input; their per-label
    sigmoid probabilities are averaged).

    Input float32 (N, 1, S, S); output (N, C, S, S) probabilities in [0, 1].
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(members)

    def train(self, mode: bool = True) -> "ProbabilityEnsemble":
        """Only this wrapper's flag: the members are inference modules, and
        the ones MLflow loads (torch.export programs) refuse ``train()`` and
        ``eval()`` altogether."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total = total + member(x)
        return total / len(self.members)


def ensemble(models: Sequence[LoadedModel], uri: str = "") -> LoadedModel:
    """One :class:`LoadedModel` averaging ``models``' probabilities.

    Raises:
        ValueError: the models disagree on labels (and channel order), input
            size or intensity normalisation: their probabilities would not
            describe the same pixels.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    first = models[0]
    for other in models[1:]:
        for what in ("labels", "size", "intensity"):
            if getattr(other, what) != getattr(first, what):
                raise ValueError(f"cannot average {first.uri} and {other.uri}: their {what} differ "
                                 f"({getattr(first, what)} vs {getattr(other, what)})")
    if len(models) == 1:
        return first
    # The members' QC thresholds were calibrated on their own sharpness; an
    # average is less sharp, so the most lenient member's threshold applies.
    if any(m.thresholds for m in models):
        log.warning("the ensemble of %s predicts at threshold 0.5 for every label: its members' own per-label "
                    "thresholds were chosen for them alone (give --threshold to set another)",
                    ", ".join(m.uri for m in models))
    # Members whose weights torch cannot see (ONNX Runtime sessions) have an
    # empty state dict: the ensemble is then named by its members' fingerprints.
    override = None
    if any(m.fingerprint_override is not None for m in models):
        override = hashlib.sha256("\n".join(["ensemble", *(m.fingerprint() for m in models)]).encode()).hexdigest()
    networks = [m.network for m in models]
    return LoadedModel(ProbabilityEnsemble([m.module for m in models]), list(first.labels), first.size,
                       dict(first.intensity), uri or "ensemble(" + ", ".join(m.uri for m in models) + ")",
                       min(m.min_confidence for m in models),
                       # Thresholds were chosen per member; the ensemble's own would need its own CV.
                       {},
                       {"ensemble": networks} if any(networks) else {},
                       "+".join(sorted({m.backend for m in models})), override,
                       # Members trained at different precisions: full precision serves each.
                       amp=first.amp if all(m.amp == first.amp for m in models) else "off")


def checkpoint_contract(state: Mapping, path: Path) -> tuple[list[str], int, dict]:
    """(labels in channel order, input size in px, intensity window) of a
    checkpoint written by :class:`medseg.training.trainer.Trainer`.

    Checkpoints carry their contract; ones written before they did
    (no ``intensity`` key) take it from the ``model.json`` beside them.

    Raises:
        ValueError: no labels/size, or no intensity window in the
            checkpoint nor a ``model.json`` beside it (normalising with
            defaults could silently change every mask).
    """
    if "labels" not in state or "size" not in state or "settings" not in state:
        raise ValueError(f"{path}: not a medseg checkpoint (no labels, size or settings)")
    intensity = state.get("intensity")
    if intensity is None:
        summary = path.parent / "model.json"  # written beside the checkpoints by `medseg train`
        if not summary.is_file() or "intensity" not in json.loads(summary.read_text()):
            raise ValueError(f"{path}: this checkpoint does not record its intensity normalisation (written by an "
                             "older medseg) and has no model.json beside it; put it back beside its model.json")
        intensity = json.loads(summary.read_text())["intensity"]
    if not {"lower_percentile", "upper_percentile"} <= set(intensity):
        raise ValueError(f"{path}: its intensity window {intensity} lacks lower_percentile / upper_percentile")
    labels = list(state["labels"])
    thresholds = state.get("thresholds") or {}
    unknown = sorted(set(thresholds) - set(labels))
    bad = {k: v for k, v in thresholds.items() if not 0 < float(v) < 1}
    if unknown or bad:
        raise ValueError(f"{path}: its per-label thresholds name unknown labels {unknown} or lie outside (0, 1): "
                         f"{bad}")
    return labels, int(state["size"]), dict(intensity)


def _from_checkpoint(path: Path) -> LoadedModel:
    from medseg.training.network import NetworkSpec, SigmoidHead, build_network

    state = torch.load(path, map_location="cpu", weights_only=False)
    labels, size, intensity = checkpoint_contract(state, path)
    settings = state["settings"]
    net = build_network(NetworkSpec(settings["network"], settings["preset"], settings["upsample"],
                                    out_channels=len(labels)))
    # Shipped checkpoints hold float16 weights (half the file); prediction runs in float32.
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    return LoadedModel(SigmoidHead(net).eval(), labels, size, intensity, str(path.resolve()),
                       float(state.get("qc", {}).get("min_confidence", DEFAULT_MIN_CONFIDENCE)),
                       dict(state.get("thresholds") or {}),
                       {k: settings[k] for k in ("network", "preset", "upsample")},
                       amp=str(settings.get("amp", "auto")))


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
                       dict(metadata.get("intensity") or DEFAULT_INTENSITY), uri,
                       float((metadata.get("qc") or {}).get("min_confidence", DEFAULT_MIN_CONFIDENCE)),
                       dict(metadata.get("thresholds") or {}), dict(metadata.get("network") or {}),
                       amp=str(metadata.get("amp", "auto")))


def _from_summary(path: Path, tracking_uri: str | None) -> LoadedModel:
    """A fold's ``model.json``: its registered model version, or, when the
    run could not be tracked, the ``best.pt`` beside it. The cross-validation
    ``summary.json``: the chosen model (``choice``: the folds' ensemble or
    the best fold) through the registry, or from the folds' ``best.pt``."""
    summary = json.loads(path.read_text())
    if "sha256" in summary and "file" in summary:  # a shipped model's card (medseg/models/<name>.json)
        return load_model(summary.get("name", path.stem)) if path.resolve().parent == _shipped_folder() else \
            _from_checkpoint(path.parent / summary["file"])
    if summary.get("choice") == "ensemble":
        uris = summary.get("fold_model_uris") or [None] * len(summary["folds"])
        tracking = tracking_uri or summary.get("tracking_uri")
        members = [_from_mlflow(uri, tracking) if uri else _from_checkpoint(path.parent / f"fold{k}" / "best.pt")
                   for k, uri in zip(summary["folds"], uris)]
        return ensemble(members, f"{path.resolve()} (ensemble of folds {', '.join(map(str, summary['folds']))})")
    if summary.get("model_uri"):
        return _from_mlflow(summary["model_uri"], tracking_uri or summary.get("tracking_uri"))
    if "best_fold" in summary:
        return _from_checkpoint(path.parent / f"fold{summary['best_fold']}" / "best.pt")
    return _from_checkpoint(path.parent / "best.pt")


def _shipped_folder() -> Path:
    from medseg.models import _folder

    return _folder().resolve()


def load_model(model: str | Sequence[str], tracking_uri: str | None = None,
               device: torch.device | None = None) -> LoadedModel:
    """Load ``model``: the name of a model shipped with medseg
    (:func:`medseg.models.shipped_models`), an MLflow model URI (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``runs:/<id>/model``), a ``.pt`` checkpoint,
    a fold's ``model.json`` written by ``medseg train`` or the cross-validation
    ``summary.json`` written by ``medseg cv-finish``, or a ``.onnx`` file
    written by ``medseg export`` (run in ONNX Runtime:
    :func:`medseg.inference.onnx_model.load_onnx_model`). Several references:
    their :func:`ensemble` (probabilities averaged).

    Raises:
        ValueError: a checkpoint without its contract, models that cannot
            be averaged, a URI the store does not hold, a ``.onnx`` file not
            written by ``medseg export``.
        FileNotFoundError: no MLflow store where a models:/ URI needs one; a
            ``.onnx`` file that does not exist.
    """
    if not isinstance(model, str):
        models = [load_model(m, tracking_uri, device if is_onnx_reference(m) else None) for m in model]
        loaded = ensemble(models)
        if device is not None:
            loaded.module = loaded.module.to(device)
        return loaded
    from medseg.models import shipped_model

    path = Path(model)
    if is_onnx_reference(model):
        from medseg.inference.onnx_model import load_onnx_model

        # The session is made for its device (execution provider); no .to() after.
        return load_onnx_model(path, device)
    # A checkpoint or JSON file first; then a shipped model's name (a folder
    # of that name, e.g. an earlier --out, does not hide it); then MLflow.
    is_file = path.is_file() and path.suffix in (".pt", ".json")
    shipped = None if is_file else shipped_model(model)
    if shipped is not None:
        shipped.verify()
        loaded = _from_checkpoint(shipped.checkpoint)
        loaded.uri = f"{shipped.name} (shipped with medseg)"
    elif is_file and path.suffix == ".pt":
        loaded = _from_checkpoint(path)
    elif is_file:
        loaded = _from_summary(path, tracking_uri)
    else:
        loaded = _from_mlflow(model, tracking_uri)
    if device is not None:
        loaded.module = loaded.module.to(device)
    return loaded


def load_for_backend(model: str | Sequence[str], backend: str, tracking_uri: str | None = None,
                     device: torch.device | None = None, *, fallback: bool = False) -> LoadedModel:
    """:func:`load_model`, run by ``backend`` ("pytorch" or "onnxruntime",
    as :func:`medseg.inference.backend.resolve_backend` gives).

    For "onnxruntime", PyTorch references are exported to ONNX once and kept
    (:func:`medseg.inference.onnx_model.cached_export`): several of them as
    one ensemble graph, or each alone when ``.onnx`` files are among them
    (every member keeps its equal share of the average). Such a model keeps
    its source's ``uri``.

    Args:
        fallback: "onnxruntime" was chosen for speed, not asked for (the
            CPU default): a model that cannot be exported, or whose export
            disagrees with PyTorch, is run in PyTorch instead, with a warning.

    Raises:
        ValueError: an unknown backend, "pytorch" with a ``.onnx`` file, and
            what :func:`load_model` raises.
        medseg.inference.onnx_model.OnnxExportError: without ``fallback``, a
            model that cannot be exported, or whose export disagrees with
            PyTorch.
    """
    references = [model] if isinstance(model, str) else list(model)
    if backend not in ("pytorch", "onnxruntime"):
        raise ValueError(f"unknown backend {backend!r}; choose pytorch or onnxruntime")
    if backend == "pytorch":
        resolve_backend(backend, references)  # refuses .onnx files
        return load_model(model, tracking_uri, device)
    from medseg.inference.onnx_model import as_onnxruntime

    if not any(is_onnx_reference(r) for r in references):
        # Exported from the CPU, whatever device ONNX Runtime then runs on.
        cpu = torch.device("cpu")
        return onnxruntime_or_pytorch(load_model(model, tracking_uri, cpu), device, fallback=fallback)
    members = [load_model(r, tracking_uri, device) if is_onnx_reference(r)
               else as_onnxruntime(load_model(r, tracking_uri, torch.device("cpu")), device) for r in references]
    return ensemble(members)


def onnxruntime_or_pytorch(model: LoadedModel, device: torch.device | None = None, *,
                           fallback: bool = False) -> LoadedModel:
    """``model`` (PyTorch) exported and run in ONNX Runtime
    (:func:`medseg.inference.onnx_model.as_onnxruntime`); with ``fallback``,
    ``model`` itself (on ``device``) when it cannot be exported or its
    export disagrees with PyTorch, with a warning saying why.

    Raises:
        medseg.inference.onnx_model.OnnxExportError: without ``fallback``.
    """
    from medseg.inference.onnx_model import OnnxExportError, as_onnxruntime

    try:
        return as_onnxruntime(model, device)
    except OnnxExportError as err:
        if not fallback:
            raise
        log.warning("%s; predicting in PyTorch instead (--backend pytorch: without trying ONNX Runtime)", err)
        if device is not None:
            model.module = model.module.to(device)
        return model
