"""The ONNX form of a medseg model: export, and prediction in ONNX Runtime.

An exported file is self-describing: its graph maps input ``image``, float32
(N, 1, S, S) in [0, 1] (N free), to output ``probabilities``, float32
(N, C, S, S) sigmoid probabilities in channel order ``labels``; its
``metadata_props`` carry the medseg contract (:data:`METADATA_PREFIX` keys;
strings, JSON where structured): labels, size, intensity window, per-label
thresholds, QC min_confidence, the source model's URI and fingerprint, the
network settings when known, and the medseg version that wrote it.
:func:`load_onnx_model` reads it back into a :class:`LoadedModel` whose
module runs the graph in ONNX Runtime, so ``predict_probabilities`` and
everything after it work unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from medseg.atomic import atomic_path
from medseg.inference.ctr import DEFAULT_MIN_CONFIDENCE
from medseg.inference.model import LoadedModel

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
METADATA_PREFIX = "medseg."
# Bumped when the metadata's keys or meaning change.
METADATA_VERSION = "1"
# Largest |ONNX Runtime - PyTorch| probability an export may show on the check input.
PARITY_TOLERANCE = 1e-4
# The check input's batch differs from the export example's (2), so a batch
# axis fixed by mistake fails the check instead of a later prediction.
_CHECK_BATCH = 3


class OnnxExportError(RuntimeError):
    """The model could not be exported, or its export does not compute what
    PyTorch computes."""


class OnnxRuntimeModule(torch.nn.Module):
    """An ONNX Runtime session behind the ``torch.nn.Module`` interface.

    Input float32 (N, 1, S, S) tensor on any device; output float32
    (N, C, S, S) tensor on the input's device. Data goes through host memory
    (numpy) both ways, whatever the execution provider. It has no parameters
    and an empty state dict: torch cannot see the weights, so
    :class:`LoadedModel` names it by ``fingerprint_override``.
    """

    def __init__(self, path: str | Path, device: torch.device | None = None) -> None:
        """Open ``path`` in ONNX Runtime: CPUExecutionProvider, with
        CUDAExecutionProvider first when ``device`` is CUDA and this
        onnxruntime build has it; intra-op threads = ``torch.get_num_threads()``
        (``pick_device`` sets it to the usable CPUs); every graph optimisation.

        Raises:
            ValueError: ``path`` is not an ONNX model ONNX Runtime can load.
        """
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            else:
                log.warning("%s: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): "
                            "ONNX Runtime predicts on the CPU", self.path.name)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own pybind types
            raise ValueError(f"{self.path}: not an ONNX model ONNX Runtime can load ({err})") from err

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """float32 (N, 1, S, S) -> float32 (N, C, S, S) probabilities."""
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        (probabilities,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(probabilities).to(image.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, providers={self.session.get_providers()}"


class _ImageToProbabilities(torch.nn.Module):
    """What gets exported: the model's module under the graph's input name."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        # Set directly: eval() would recurse into torch.export program
        # modules (MLflow's), which refuse it; the exporter warns about a
        # model left in training mode.
        self.training = False

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.module(image)


def contract_metadata(model: LoadedModel) -> dict[str, str]:
    """The medseg contract of ``model`` as ONNX ``metadata_props``
    ({``medseg.<key>``: string}; JSON for lists and mappings)."""
    from medseg import __version__

    values = {
        "metadata_version": METADATA_VERSION,
        "labels": json.dumps(list(model.labels)),
        "size": str(int(model.size)),
        "intensity": json.dumps(model.intensity, sort_keys=True),
        "thresholds": json.dumps(model.thresholds, sort_keys=True),
        "min_confidence": json.dumps(float(model.min_confidence)),
        "network": json.dumps(model.network, sort_keys=True),
        "source_uri": model.uri,
        "source_fingerprint": model.fingerprint(),
        "medseg_version": __version__,
    }
    return {METADATA_PREFIX + key: value for key, value in values.items()}


# Loggers of the exporter's stack and the level they are held at during an
# export: a warning per torchvision operator torch skips (torchvision is not a
# medseg dependency), a line per graph pass of onnxscript / onnx_ir at INFO.
_EXPORTER_LOGGERS = {"torch.onnx._internal.exporter._registration": logging.ERROR, "onnxscript": logging.WARNING,
                     "onnx_ir": logging.WARNING}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what torch's exporter says that a medseg user cannot act on
    (:data:`_EXPORTER_LOGGERS`, and a pytree deprecation inside torch)."""
    loggers = {logging.getLogger(name): level for name, level in _EXPORTER_LOGGERS.items()}
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def _max_difference(module: torch.nn.Module, path: Path, size: int) -> tuple[float, tuple, tuple]:
    """(max |ONNX Runtime - PyTorch| probability, ONNX output shape, PyTorch
    output shape) on a seeded uniform [0, 1) float32 batch of :data:`_CHECK_BATCH`."""
    x = torch.rand(_CHECK_BATCH, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x).float()
    got = OnnxRuntimeModule(path)(x)
    if got.shape != expected.shape:
        return float("inf"), tuple(got.shape), tuple(expected.shape)
    return float((got - expected).abs().max()), tuple(got.shape), tuple(expected.shape)


def export_onnx(model: LoadedModel, path: str | Path, *, opset: int | None = None) -> Path:
    """Export ``model`` to the ONNX file ``path`` with its contract in the
    metadata, checked against PyTorch.

    The graph is ``model.module`` (probabilities already), traced by
    ``torch.onnx.export``'s torch.export-based exporter (``dynamo=True``: it
    takes every module :func:`medseg.inference.model.load_model` returns,
    MLflow's torch.export programs and :class:`ProbabilityEnsemble`
    included; the TorchScript one is deprecated) on the CPU (a copy when the
    module lives elsewhere), with a free batch axis. Input
    ``image`` float32 (N, 1, S, S); output ``probabilities`` float32
    (N, C, S, S). Weights are stored in the file itself. The file is written
    atomically: under its final name only once checked.

    Args:
        model: a PyTorch model (``backend`` "pytorch").
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: ONNX opset; None: torch's default.

    Returns:
        ``path``.

    Raises:
        ValueError: ``model`` is not a PyTorch model (already ONNX).
        OnnxExportError: the exporter failed, or ONNX Runtime's probabilities
            on a seeded random batch differ from PyTorch's by more than
            :data:`PARITY_TOLERANCE` (the message gives the difference).
    """
    if model.backend != "pytorch":
        raise ValueError(f"{model.uri} runs in {model.backend}, not PyTorch: it is exported already")
    path = Path(path)
    module = model.module
    if any(t.device.type != "cpu" for t in [*module.parameters(), *module.buffers()]):
        module = copy.deepcopy(module).cpu()
    example = torch.rand(2, 1, model.size, model.size, generator=torch.Generator().manual_seed(1))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                _ImageToProbabilities(module), (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=True, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; say which model failed
        raise OnnxExportError(f"{model.uri}: torch.onnx.export failed: {type(err).__name__}: {err}") from err
    program.model.metadata_props.update(contract_metadata(model))
    program.model.doc_string = (
        f"medseg model {model.uri}: input {INPUT_NAME!r} float32 (N, 1, {model.size}, {model.size}), a radiograph on "
        f"the square canvas scaled to [0, 1]; output {OUTPUT_NAME!r} float32 (N, {len(model.labels)}, {model.size}, "
        f"{model.size}), sigmoid probability per label: {', '.join(model.labels)}")
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
        difference, got, expected = _max_difference(module, tmp, model.size)
        if not difference <= PARITY_TOLERANCE:  # also catches nan
            detail = (f"output shape {got} instead of {expected}" if got != expected else
                      f"probabilities differ from PyTorch's by up to {difference:.2e} (tolerance "
                      f"{PARITY_TOLERANCE:g})")
            raise OnnxExportError(f"{model.uri}: the ONNX export does not compute what PyTorch does: {detail}")
    log.debug("%s -> %s: max |ONNX Runtime - PyTorch| %.2e", model.uri, path, difference)
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_contract(metadata: dict[str, str], path: str | Path) -> dict:
    """The contract in an exported file's ``metadata_props``: {labels,
    size, intensity, thresholds, min_confidence, network, source_uri,
    source_fingerprint, medseg_version, metadata_version}.

    Raises:
        ValueError: naming ``path``: no medseg metadata ("not exported by
            medseg export"), or malformed values.
    """
    ours = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
    missing = [k for k in ("labels", "size", "intensity") if k not in ours]
    if missing:
        raise ValueError(f"not exported by medseg export: {path} has no medseg metadata "
                         f"({', '.join(METADATA_PREFIX + k for k in missing)} missing); export the model with "
                         "`medseg export MODEL --format onnx --out FILE.onnx`")
    try:
        contract = {
            "labels": [str(name) for name in json.loads(ours["labels"])],
            "size": int(ours["size"]),
            "intensity": dict(json.loads(ours["intensity"])),
            "thresholds": {str(k): float(v) for k, v in json.loads(ours.get("thresholds", "{}")).items()},
            "min_confidence": float(json.loads(ours.get("min_confidence", str(DEFAULT_MIN_CONFIDENCE)))),
            "network": dict(json.loads(ours.get("network", "{}"))),
        }
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: malformed medseg metadata ({type(err).__name__}: {err})") from err
    if not contract["labels"] or not {"lower_percentile", "upper_percentile"} <= set(contract["intensity"]):
        raise ValueError(f"{path}: its medseg metadata lacks labels or the intensity window's percentiles")
    contract.update({k: ours.get(k, "") for k in ("source_uri", "source_fingerprint", "medseg_version",
                                                  "metadata_version")})
    return contract


def load_onnx_model(path: str | Path, device: torch.device | None = None) -> LoadedModel:
    """A ``.onnx`` file written by :func:`export_onnx`, run in ONNX Runtime
    (:class:`OnnxRuntimeModule`; CUDA when ``device`` is and this
    onnxruntime offers it).

    The :class:`LoadedModel` has the file's contract, ``uri`` the file's
    absolute path, ``backend`` "onnxruntime" and ``fingerprint_override`` the
    file's SHA-256 (its graph, weights and contract; exports are
    byte-for-byte reproducible, so re-exporting the same model keeps it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ONNX model, not exported by medseg (no medseg
            metadata), or a graph without the ``image`` -> ``probabilities``
            interface.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model file not found")
    module = OnnxRuntimeModule(path, device)
    contract = read_contract(module.session.get_modelmeta().custom_metadata_map, path)
    inputs = [i.name for i in module.session.get_inputs()]
    outputs = [o.name for o in module.session.get_outputs()]
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise ValueError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found inputs {inputs} "
                         f"and outputs {outputs}")
    return LoadedModel(module, contract["labels"], contract["size"], contract["intensity"], str(path.resolve()),
                       contract["min_confidence"], contract["thresholds"], contract["network"], "onnxruntime",
                       _file_sha256(path))


def as_onnxruntime(model: LoadedModel, device: torch.device | None = None, *,
                   opset: int | None = None) -> LoadedModel:
    """``model`` exported (:func:`export_onnx`) to a temporary file and
    loaded in ONNX Runtime; the file is removed once the session has read it.
    The result keeps ``model``'s ``uri`` (where it came from).

    Raises:
        ValueError, OnnxExportError: as :func:`export_onnx`.
    """
    with tempfile.TemporaryDirectory(prefix="medseg-onnx-") as folder:
        path = export_onnx(model, Path(folder) / "model.onnx", opset=opset)
        loaded = load_onnx_model(path, device)
    loaded.uri = model.uri
    return loaded


__all__ = ["INPUT_NAME", "METADATA_PREFIX", "OUTPUT_NAME", "OnnxExportError", "OnnxRuntimeModule",
           "PARITY_TOLERANCE", "as_onnxruntime", "contract_metadata", "export_onnx", "load_onnx_model",
           "read_contract"]
