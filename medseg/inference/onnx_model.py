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

import atexit
import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medseg.atomic import atomic_path
from medseg.inference.ctr import DEFAULT_MIN_CONFIDENCE
from medseg.inference.model import LoadedModel

if TYPE_CHECKING:
    import onnx

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


def precise_instance_norm(model: "onnx.ModelProto") -> int:
    """Rewrite every 4-D ``InstanceNormalization`` of ``model`` (in place)
    as its definition with the means taken in two stages (over columns,
    then rows): ``(x - mean) / sqrt(var + epsilon) * scale + bias``.

    Why: ONNX Runtime's InstanceNormalization (and a one-stage ReduceMean)
    sums a 256 x 256 plane in float32 one element after another, about ten
    times less precisely than PyTorch; over a U-Net's 18 norms that moved
    sigmoid probabilities by 1.8e-4 on phantoms, beyond the 1e-4 parity of
    issue 14. Means of 256 means of 256 values are as precise as PyTorch's
    to a few 1e-7, and ran faster than the fused operator here.

    Returns:
        The number of nodes rewritten (others, e.g. 3-D, are left as they are).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    rank4 = {v.name for v in [*graph.input, *graph.value_info, *graph.output]
             if v.type.tensor_type.HasField("shape") and len(v.type.tensor_type.shape.dim) == 4}
    constants = [helper.make_tensor("medseg_in_axis3", TensorProto.INT64, [1], [3]),
                 helper.make_tensor("medseg_in_axis2", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("medseg_in_axes12", TensorProto.INT64, [2], [1, 2])]
    nodes, rewritten = [], 0
    for index, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx") or \
                node.input[0] not in rank4:
            nodes.append(node)
            continue
        x, scale, bias = node.input
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        name = f"medseg_in{index}"
        constants.append(helper.make_tensor(f"{name}_eps", TensorProto.FLOAT, [], [epsilon]))
        nodes += [
            helper.make_node("ReduceMean", [x, "medseg_in_axis3"], [f"{name}_m1"], keepdims=1),
            helper.make_node("ReduceMean", [f"{name}_m1", "medseg_in_axis2"], [f"{name}_mean"], keepdims=1),
            helper.make_node("Sub", [x, f"{name}_mean"], [f"{name}_d"]),
            helper.make_node("Mul", [f"{name}_d", f"{name}_d"], [f"{name}_d2"]),
            helper.make_node("ReduceMean", [f"{name}_d2", "medseg_in_axis3"], [f"{name}_v1"], keepdims=1),
            helper.make_node("ReduceMean", [f"{name}_v1", "medseg_in_axis2"], [f"{name}_var"], keepdims=1),
            helper.make_node("Add", [f"{name}_var", f"{name}_eps"], [f"{name}_ve"]),
            helper.make_node("Sqrt", [f"{name}_ve"], [f"{name}_std"]),
            helper.make_node("Div", [f"{name}_d", f"{name}_std"], [f"{name}_n"]),
            helper.make_node("Unsqueeze", [scale, "medseg_in_axes12"], [f"{name}_scale"]),  # (C,) -> (C, 1, 1)
            helper.make_node("Unsqueeze", [bias, "medseg_in_axes12"], [f"{name}_bias"]),
            helper.make_node("Mul", [f"{name}_n", f"{name}_scale"], [f"{name}_s"]),
            helper.make_node("Add", [f"{name}_s", f"{name}_bias"], list(node.output)),
        ]
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(constants)
    return rewritten


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
        import onnx

        proto = onnx.load(str(tmp))
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and written != opset:  # the exporter converts, or says why not, and writes its own
            raise OnnxExportError(f"{model.uri}: opset {opset} asked for, but the exporter can only write opset "
                                  f"{written} for this model")
        if precise_instance_norm(proto):
            onnx.save(proto, str(tmp))
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
    # The metadata must describe this graph (a hand-edited file may not):
    # fixed dimensions are checked, symbolic ones (the batch) are free.
    image = module.session.get_inputs()[0].shape
    probabilities = next(o for o in module.session.get_outputs() if o.name == OUTPUT_NAME).shape
    size, channels = contract["size"], len(contract["labels"])
    problems = [f"{what} {dim} where its metadata says {expected}"
                for what, dim, expected in (("input side", image[-1] if len(image) == 4 else None, size),
                                            ("output channels", probabilities[1] if len(probabilities) == 4 else None,
                                             channels))
                if isinstance(dim, int) and dim != expected]
    bad = {k: v for k, v in contract["thresholds"].items() if k not in contract["labels"] or not 0 < v < 1}
    if bad:
        problems.append(f"thresholds {bad} name unknown labels or lie outside (0, 1)")
    if problems:
        raise ValueError(f"{path}: its medseg metadata does not fit its graph: {'; '.join(problems)}")
    return LoadedModel(module, contract["labels"], contract["size"], contract["intensity"], str(path.resolve()),
                       contract["min_confidence"], contract["thresholds"], contract["network"], "onnxruntime",
                       _file_sha256(path))


def cache_folder() -> Path:
    """Where exported models are kept between runs: ``$MEDSEG_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``; ``onnx/`` inside."""
    root = os.environ.get("MEDSEG_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medseg"
    return Path(root) / "onnx"


def export_key(model: LoadedModel, opset: int | None = None) -> str:
    """What an export depends on: the model's :meth:`LoadedModel.fingerprint`
    (weights, labels, size, intensity window), its thresholds and QC
    threshold (in the metadata), and the versions of medseg, torch, onnx and
    onnxscript (the exporter), this module's source, and the opset; SHA-256, hex."""
    import onnx
    import onnxscript

    from medseg import __version__

    # This module's own source: a change to how medseg exports (a graph
    # rewrite, say) must not be answered by an export made before it.
    exporter = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    parts = [exporter, model.fingerprint(), json.dumps(model.thresholds, sort_keys=True), repr(float(model.min_confidence)),
             json.dumps(model.network, sort_keys=True), model.uri, __version__, torch.__version__, onnx.__version__,
             onnxscript.__version__, repr(opset), METADATA_VERSION]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_export(model: LoadedModel, *, opset: int | None = None, folder: str | Path | None = None,
                  refresh: bool = False) -> Path:
    """``model`` exported once (:func:`export_onnx`) and kept in ``folder``
    (default :func:`cache_folder`) as ``<export_key>.onnx``: later runs with
    the same model load the file instead of exporting again (5-10 s).

    Written atomically, so jobs exporting the same model at once each
    leave a whole file. Where the folder cannot be written, the export goes
    to a temporary folder, removed when the process ends.

    Args:
        refresh: export again even if the folder holds the file (a damaged copy).

    Raises:
        ValueError, OnnxExportError: as :func:`export_onnx`.
    """
    folder = Path(folder) if folder is not None else cache_folder()
    path = folder / f"{export_key(model, opset)}.onnx"
    if path.is_file() and not refresh:
        log.info("%s: its ONNX export from an earlier run: %s", model.uri, path)
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, opset=opset)
        log.info("%s exported to ONNX, kept for later runs: %s", model.uri, path)
        return path
    except OSError as err:
        log.warning("cannot keep the ONNX export in %s (%s): exporting to a temporary folder", folder, err)
        scratch = Path(tempfile.mkdtemp(prefix="medseg-onnx-"))
        atexit.register(shutil.rmtree, scratch, True)
        return export_onnx(model, scratch / "model.onnx", opset=opset)


def as_onnxruntime(model: LoadedModel, device: torch.device | None = None, *,
                   opset: int | None = None) -> LoadedModel:
    """``model`` exported (:func:`cached_export`) and loaded in ONNX Runtime.
    The result keeps ``model``'s ``uri`` (where it came from).

    Raises:
        ValueError, OnnxExportError: as :func:`export_onnx`.
    """
    path = cached_export(model, opset=opset)
    try:
        loaded = load_onnx_model(path, device)
    except ValueError as err:  # a damaged cached copy: made again, not used
        log.warning("%s: the cached ONNX export %s is damaged (%s): exporting again", model.uri, path, err)
        loaded = load_onnx_model(cached_export(model, opset=opset, refresh=True), device)
    loaded.uri = model.uri
    return loaded


__all__ = ["INPUT_NAME", "METADATA_PREFIX", "OUTPUT_NAME", "OnnxExportError", "OnnxRuntimeModule",
           "PARITY_TOLERANCE", "as_onnxruntime", "cache_folder", "cached_export", "contract_metadata", "export_key", "export_onnx", "load_onnx_model",
           "read_contract"]
