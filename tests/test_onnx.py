"""ONNX export and prediction in ONNX Runtime: the same probabilities as
PyTorch (within 1e-4) on phantoms, the contract in the file, the command
line (export, predict --backend) and its errors. Real files, real
onnxruntime, no mocks."""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from medseg.cli import EXIT_OK, EXIT_USAGE, main
from medseg.inference.backend import CPU_DEFAULT_BACKEND, resolve_backend
from medseg.inference.model import LoadedModel, ProbabilityEnsemble, load_for_backend, load_model
from medseg.inference.onnx_model import (
    METADATA_PREFIX, PARITY_TOLERANCE, OnnxExportError, OnnxRuntimeModule, export_onnx, load_onnx_model,
)
from medseg.inference.predict import predict_probabilities

from cli_runner import run_in_process as _run

CPU = torch.device("cpu")


def _checkpoint(model_and_scans) -> dict:
    return torch.load(model_and_scans[0], map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def phantoms(model_and_scans) -> np.ndarray:
    """The trained model's preprocessed phantoms: float32 (N, 1, 64, 64) in [0, 1]."""
    from medseg.nifti import load_nifti_2d
    from medseg.preprocessing.manifest import read_manifest

    pre = model_and_scans[0].parent.parent / "pre"
    images = [load_nifti_2d(pre / image)[0] for image in read_manifest(pre / "manifest.csv")["image"][:6]]
    return np.stack(images)[:, np.newaxis].astype(np.float32)


def _assert_parity(reference: LoadedModel, exported: LoadedModel, phantoms: np.ndarray) -> None:
    expected = predict_probabilities(reference, phantoms, tta=False, device=CPU)
    got = predict_probabilities(exported, phantoms, tta=False, device=CPU)
    assert got.shape == expected.shape == (len(phantoms), len(reference.labels), *phantoms.shape[-2:])
    assert got.dtype == np.float32
    difference = float(np.abs(got - expected).max())
    assert difference <= PARITY_TOLERANCE, difference
    assert expected.std() > 0.01  # the probabilities say something (not all 0.5)


@pytest.fixture(scope="module")
def tuned(model_and_scans, tmp_path_factory) -> Path:
    """The trained basic_unet checkpoint as best.pt with an operating point of
    its own (per-label thresholds, QC threshold), so the contract round trip
    carries more than defaults."""
    state = _checkpoint(model_and_scans)
    state["thresholds"] = {"heart": 0.6, "clavicles": 0.35}
    state["qc"] = {"min_confidence": 0.7}
    path = tmp_path_factory.mktemp("tuned") / "best.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def exported(tuned, tmp_path_factory) -> Path:
    """`medseg export best.pt --format onnx --out best.onnx`."""
    out = tmp_path_factory.mktemp("exported") / "best.onnx"
    assert main(["export", str(tuned), "--format", "onnx", "--out", str(out)]) == EXIT_OK
    return out


def test_export_from_best_pt_matches_pytorch_and_carries_the_contract(tuned, exported, phantoms):
    reference = load_model(str(tuned))
    assert reference.network["network"] == "basic_unet"
    loaded = load_model(str(exported))  # load_model takes a .onnx too
    assert isinstance(loaded.module, OnnxRuntimeModule) and loaded.backend == "onnxruntime"
    _assert_parity(reference, loaded, phantoms)
    for what in ("labels", "size", "intensity", "thresholds", "min_confidence", "network"):
        assert getattr(loaded, what) == getattr(reference, what), what
    assert loaded.thresholds == {"heart": 0.6, "clavicles": 0.35} and loaded.min_confidence == 0.7
    assert loaded.uri == str(exported.resolve())
    # The file's own metadata: strings, JSON where structured, naming its source.
    proto = onnx.load(str(exported))
    metadata = {p.key[len(METADATA_PREFIX):]: p.value for p in proto.metadata_props
                if p.key.startswith(METADATA_PREFIX)}
    assert json.loads(metadata["labels"]) == ["heart", "lungs", "clavicles"] and metadata["size"] == "64"
    assert json.loads(metadata["intensity"]) == {"lower_percentile": 0.5, "upper_percentile": 99.5}
    assert metadata["source_uri"] == str(tuned.resolve())
    assert metadata["source_fingerprint"] == reference.fingerprint()
    assert metadata["medseg_version"] and metadata["metadata_version"] == "1"
    # Free batch axis, fixed image size.
    (image,) = proto.graph.input
    (probabilities,) = proto.graph.output
    assert (image.name, probabilities.name) == ("image", "probabilities")
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 1, 64, 64]
    assert [d.dim_param or d.dim_value for d in probabilities.type.tensor_type.shape.dim] == ["batch", 3, 64, 64]
    # Named by the file (torch cannot see the session's weights), not by an empty state dict.
    assert loaded.fingerprint() not in (reference.fingerprint(), LoadedModel(
        torch.nn.Identity(), loaded.labels, loaded.size, loaded.intensity).fingerprint())


def _log_untrained_unet(tmp: Path) -> tuple[str, str]:
    """An untrained MONAI UNet (cpu_tiny, 64 px) logged and registered as
    `medseg` training does; returns (tracking URI, models:/ URI)."""
    from medseg.tracking import client_for, connect
    from medseg.training.network import NetworkSpec, build_network
    from medseg.training.run import TrackingTarget, log_model

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = client_for(uri)
    run = client.create_run(connect(uri, "onnx"))
    torch.manual_seed(0)
    net = build_network(NetworkSpec("unet", "cpu_tiny", "transposed", out_channels=3))
    metadata = {"labels": ["heart", "lungs", "clavicles"], "size": 64,
                "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5},
                "network": {"network": "unet", "preset": "cpu_tiny", "upsample": "transposed"}}
    registered = log_model(net, 64, TrackingTarget(uri, "onnx", "medseg-onnx", system_metrics=False), 0,
                           run_id=run.info.run_id, best_epoch=1, best_metrics={}, metadata=metadata)
    client.set_terminated(run.info.run_id)
    return uri, registered["model_uri"]


def test_export_from_an_mlflow_models_uri_unet(phantoms, tmp_path, capsys, caplog):
    """A registered model loads as a torch.export program (MLflow's pt2
    format); it exports as well as the network it came from."""
    tracking, model_uri = _log_untrained_unet(tmp_path)
    out = tmp_path / "unet.onnx"
    rc, text = _run(["export", model_uri, "--tracking-uri", tracking, "--out", out], capsys, caplog)
    assert rc == EXIT_OK, text
    assert f"exported {model_uri} to {out}" in text
    reference = load_model(model_uri, tracking)
    assert isinstance(reference.module, torch.fx.GraphModule) and reference.network["network"] == "unet"
    loaded = load_onnx_model(out)
    assert loaded.uri == str(out.resolve()) and loaded.network == reference.network
    _assert_parity(reference, loaded, phantoms)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left beside it


def test_ensemble_in_onnxruntime_is_one_temporary_graph(model_and_scans, exported, phantoms, tmp_path,
                                                       monkeypatch):
    """--backend onnxruntime with PyTorch references: their ensemble exported
    as one graph to a temporary file, removed once loaded."""
    state = _checkpoint(model_and_scans)
    last_bias = [k for k in state["model"] if k.endswith("bias")][-1]
    state["model"][last_bias] = state["model"][last_bias] + 1.5  # a second member that disagrees
    other = tmp_path / "other.pt"
    torch.save(state, other)
    references = [str(model_and_scans[0]), str(other)]
    reference = load_model(references)
    assert isinstance(reference.module, ProbabilityEnsemble)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = load_for_backend(references, "onnxruntime")
    assert list(scratch.iterdir()) == []  # the temporary export is gone
    assert isinstance(loaded.module, OnnxRuntimeModule) and loaded.uri == reference.uri
    _assert_parity(reference, loaded, phantoms)
    assert [m["network"] for m in loaded.network["ensemble"]] == ["basic_unet", "basic_unet"]
    with pytest.raises(ValueError, match="exported already"):
        export_onnx(loaded, tmp_path / "again.onnx")
    # An ensemble of ONNX files: named by its members' files, not by their (empty) state dicts.
    pair = load_model([str(exported), str(exported)])
    assert isinstance(pair.module, ProbabilityEnsemble) and pair.backend == "onnxruntime"
    assert pair.fingerprint() not in (loaded.fingerprint(), load_model(str(exported)).fingerprint())


class _Drifting(torch.nn.Module):
    """Python state the graph cannot hold: each call adds more; an export
    freezes the value it saw while tracing. (A counter outside the module:
    torch.export restores the module's own attributes after tracing.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls = itertools.count(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.repeat(1, 3, 1, 1) + 0.01 * next(self.calls))


def test_an_export_that_disagrees_with_pytorch_is_refused_and_not_written(tmp_path):
    model = LoadedModel(_Drifting(), ["heart", "lungs", "clavicles"], 16, uri="drifting")
    with pytest.raises(OnnxExportError, match=r"drifting: .*differ from PyTorch's by up to \d\.\d\de-0\d "
                                              r"\(tolerance 0\.0001\)"):
        export_onnx(model, tmp_path / "drifting.onnx")
    assert list(tmp_path.iterdir()) == []


def _masks(out: Path) -> dict[tuple[str, str], np.ndarray]:
    masks = {}
    for png in sorted(out.glob("*/masks/*.png")):
        with Image.open(png) as image:
            masks[png.parent.parent.name, png.stem] = np.asarray(image) > 0
    return masks


def test_predict_backend_onnxruntime_gives_pytorch_s_masks(tuned, exported, model_and_scans, tmp_path, capsys,
                                                          caplog):
    """`medseg predict --backend onnxruntime` with the exported file gives the
    masks PyTorch gives from its checkpoint, but for pixels at the threshold;
    a rerun with the other backend predicts again instead of reusing."""
    scans = model_and_scans[1]
    out = tmp_path / "out"
    rc, text = _run(["predict", scans, "--model", tuned, "--out", out, "--no-seg", "--backend", "pytorch"], capsys,
                    caplog)
    assert rc == EXIT_OK, text
    assert " in pytorch" in text
    pytorch = _masks(out)
    assert len(pytorch) == 4 * 3
    rc, text = _run(["predict", scans, "--model", exported, "--out", out, "--no-seg", "--backend", "onnxruntime"],
                    capsys, caplog)
    assert rc == EXIT_OK, text
    assert "predict 4/4 scans (4 new, 0 already done" in text  # not reused from the PyTorch run
    onnxruntime = _masks(out)
    assert onnxruntime.keys() == pytorch.keys()
    differing = sum(int((onnxruntime[k] != pytorch[k]).sum()) for k in pytorch)
    total = sum(m.size for m in pytorch.values())
    assert differing <= 0.001 * total, (differing, total)
    for meta in out.glob("*/prediction.json"):
        settings = json.loads(meta.read_text())["settings"]
        assert settings["backend"] == "onnxruntime" and settings["model_uri"] == str(exported.resolve())
        assert settings["threshold"] == {"heart": 0.6, "lungs": 0.5, "clavicles": 0.35}  # the file's own
        assert settings["min_confidence"] == 0.7


def test_backend_choice():
    assert resolve_backend("auto", ["best.pt"], "cpu") == CPU_DEFAULT_BACKEND
    assert resolve_backend("auto", ["best.pt"], "cuda") == "pytorch"
    assert resolve_backend("auto", ["best.pt", "model.ONNX"], "cuda") == "onnxruntime"
    assert resolve_backend("onnxruntime", "models:/x@candidate") == "onnxruntime"
    with pytest.raises(ValueError, match="backend pytorch cannot run the ONNX model m.onnx"):
        resolve_backend("pytorch", ["best.pt", "m.onnx"])
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        resolve_backend("tensorrt", ["best.pt"])


def _plain_onnx(path: Path) -> Path:
    """A valid ONNX model with the right interface but no medseg metadata."""
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["image"], ["probabilities"])], "plain", [image],
                              [probabilities])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnx_errors(tmp_path, capsys, caplog):
    plain = _plain_onnx(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match=r"not exported by medseg export: .*plain\.onnx has no medseg metadata"):
        load_onnx_model(plain)
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    with pytest.raises(ValueError, match=r"notes\.onnx: not an ONNX model"):
        load_onnx_model(not_onnx)
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.png").write_bytes(b"not read")

    cases = [
        (["predict", scans, "--model", plain, "--out", tmp_path / "out", "--backend", "pytorch"],
         "backend pytorch cannot run the ONNX model"),
        (["predict", scans, "--model", plain, "--out", tmp_path / "out"], "not exported by medseg export"),
        (["export", plain, "--out", tmp_path / "x.onnx"], "is an ONNX file already"),
        (["export", tmp_path / "missing.pt", "--out", tmp_path / "x.onnx"], "missing.pt: file not found"),
        (["export", plain, "--format", "tflite", "--out", tmp_path / "x.onnx"], "invalid choice: 'tflite'"),
        (["export", plain, "--out", tmp_path / "x.pt"], "give a file name ending in .onnx"),
    ]
    for argv, message in cases:
        rc, text = _run(argv, capsys, caplog)
        assert rc == EXIT_USAGE and message in text, (argv, text)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.onnx").exists()


def test_cpu_default_runs_onnxruntime_exporting_each_model_once(tuned, model_and_scans, tmp_path, capsys, caplog,
                                                                monkeypatch):
    """On CPU, `medseg predict` without --backend runs a PyTorch model in
    ONNX Runtime (faster there: benchmarks/predict.py), exporting it on
    first use into the cache and loading that file on later runs; the
    rerun of the same batch reuses every result (same fingerprint)."""
    from medseg.inference.backend import CPU_DEFAULT_BACKEND

    assert CPU_DEFAULT_BACKEND == "onnxruntime"
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(cache))
    scans = model_and_scans[1]
    out = tmp_path / "out"
    rc, text = _run(["predict", scans, "--model", tuned, "--out", out, "--no-seg", "--device", "cpu"], capsys,
                    caplog)
    assert rc == EXIT_OK and " in onnxruntime" in text, text
    (exported,) = (cache / "onnx").glob("*.onnx")
    made = exported.stat().st_mtime_ns
    rc, text = _run(["predict", scans, "--model", tuned, "--out", out, "--no-seg", "--device", "cpu"], capsys,
                    caplog)
    assert rc == EXIT_OK and "(0 new, 4 already done" in text, text
    assert list((cache / "onnx").glob("*.onnx")) == [exported] and exported.stat().st_mtime_ns == made


def test_default_backend_falls_back_to_pytorch_when_the_export_disagrees(caplog):
    """A model whose export does not compute what PyTorch does is refused
    when ONNX Runtime was asked for, and predicted in PyTorch, with a
    warning, when ONNX Runtime was only the CPU default."""
    from medseg.inference.model import onnxruntime_or_pytorch

    model = LoadedModel(_Drifting(), ["heart", "lungs", "clavicles"], 16, uri="drifting")
    with pytest.raises(OnnxExportError):
        onnxruntime_or_pytorch(model)
    kept = onnxruntime_or_pytorch(model, fallback=True)
    assert kept is model and kept.backend == "pytorch"
    assert "drifting: the ONNX export does not compute what PyTorch does" in caplog.text
    assert "predicting in PyTorch instead" in caplog.text


def test_a_damaged_cached_export_is_made_again(tuned, tmp_path, caplog, monkeypatch):
    """Bug report (fresh-user trial): a cut-short file in the cache made its
    model unusable for good. It is now exported again, with a warning."""
    from medseg.inference.onnx_model import as_onnxruntime, cached_export

    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path))
    model = load_model(str(tuned))
    path = cached_export(model)
    whole = path.read_bytes()
    path.write_bytes(whole[:50_000])
    assert as_onnxruntime(model).labels == model.labels
    assert "is damaged" in caplog.text and "exporting again" in caplog.text
    loaded = load_onnx_model(path)
    assert loaded.labels == model.labels


def test_an_opset_the_exporter_cannot_write_is_refused(tuned, tmp_path):
    """Bug report: `medseg export --opset 11` wrote opset 18 and said it had
    exported; now it refuses, naming the opset it could write, and writes nothing."""
    with pytest.raises(OnnxExportError, match=r"opset 11 asked for, but the exporter can only write opset \d+"):
        export_onnx(load_model(str(tuned)), tmp_path / "old.onnx", opset=11)
    assert not list(tmp_path.iterdir())


def test_metadata_that_does_not_fit_the_graph_is_refused(exported, tmp_path):
    """A hand-edited contract (labels, size, thresholds) that does not
    describe the network is refused when loaded, not half-used."""
    for key, value, message in [("medseg.labels", '["heart", "lungs"]', "output channels 3 where its metadata says 2"),
                                ("medseg.size", "128", "input side 64 where its metadata says 128"),
                                ("medseg.thresholds", '{"heart": 7}', "thresholds {'heart': 7.0}")]:
        proto = onnx.load(str(exported))
        for prop in proto.metadata_props:
            if prop.key == key:
                prop.value = value
        edited = tmp_path / f"{key}.onnx"
        onnx.save(proto, str(edited))
        with pytest.raises(ValueError, match=re.escape(message)):
            load_onnx_model(edited)
