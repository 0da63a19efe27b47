"""Which runtime predicts with a model: PyTorch or ONNX Runtime.

Kept free of torch imports: the command line builds its options from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


# Prediction runtimes. "auto": a .onnx model runs in ONNX Runtime; any other
# model runs in PyTorch on CUDA, and on CPU in CPU_DEFAULT_BACKEND.
BACKENDS = ("auto", "pytorch", "onnxruntime")
# The CPU runtime for models given as PyTorch references (checkpoints, MLflow
# URIs, shipped models) under "auto": whichever predicts faster on CPU with
# probabilities within 1e-4 of the other. benchmarks/predict.py, 2-core CPU:
# forward pass 1.6x (demo BasicUNet: 28.3 vs 17.2 scans/s) and 1.3x (shipped UNet:
# 64 vs 50) PyTorch's, 7e-6
# apart (README, Benchmarks).
CPU_DEFAULT_BACKEND = "onnxruntime"


def is_onnx_reference(reference: str) -> bool:
    """Whether the model reference names an ONNX file (``*.onnx``; an MLflow
    ``models:/`` or ``runs:/`` URI never does)."""
    return not reference.startswith(("models:/", "runs:/")) and Path(reference).suffix.lower() == ".onnx"


def resolve_backend(requested: str, references: str | Sequence[str], device_type: str = "cpu") -> str:
    """The runtime that predicts with ``references`` on ``device_type``
    ("cpu" or "cuda"): "pytorch" or "onnxruntime".

    ``requested`` "auto": ONNX Runtime when a reference is a ``.onnx`` file,
    else PyTorch on CUDA and :data:`CPU_DEFAULT_BACKEND` on CPU.
    "onnxruntime" with PyTorch references: they are exported first
    (:func:`medseg.inference.model.load_for_backend`).

    Raises:
        ValueError: an unknown ``requested``; "pytorch" with a ``.onnx``
            reference (ONNX files run in ONNX Runtime only).
    """
    references = [references] if isinstance(references, str) else list(references)
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose from {', '.join(BACKENDS)}")
    onnx = [r for r in references if is_onnx_reference(r)]
    if requested == "pytorch" and onnx:
        raise ValueError(f"backend pytorch cannot run the ONNX model {onnx[0]} (ONNX files run in onnxruntime: "
                         "give --backend onnxruntime or auto, or the model's PyTorch reference)")
    if requested != "auto":
        return requested
    if onnx:
        return "onnxruntime"
    return CPU_DEFAULT_BACKEND if device_type == "cpu" else "pytorch"

