"""Prediction speed and memory (issue 14's targets).

- The network's forward pass alone, scans/s, with PyTorch and with ONNX
  Runtime (the model exported by ``medseg export --format onnx``) side by
  side, on the same preprocessed batch, with their largest probability
  difference (parity).
- End to end (read DICOM -> masks + NIfTI + overlay + DICOM SEG + results
  row) scans/s on phantom DICOMs at their original size: one stage after the
  other (``--workers 0``, as before issue 14) and pipelined (scans read ahead,
  results written behind: the default), each over the forward-only rate of
  the same backend, model and batch size (target: pipelined >= 0.8).
- Peak resident memory of ``medseg predict`` over --small and --large small
  scans (target: within 10 %).

    .venv/bin/python benchmarks/predict.py [--model MODEL] [--n 96] [--small 100] [--large 10000]
        [--height 512 --width 448] [--memory-size 128] [--skip-memory | --skip-speed] [--device auto]

MODEL: anything ``medseg predict --model`` takes; default the demo's model
(results/phantoms/models/fold0/model.json, after ``make demo``), else the
model shipped with medseg.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.inference.model import LoadedModel, load_model
from medseg.inference.predict import PredictSettings, _prepare, default_workers, predict_files, predict_probabilities
from medseg.ingest.inputs import InputFile, collect_inputs
from medseg.models import default_model
from medseg.phantoms.write import write_phantom_dataset
from medseg.training.trainer import pick_device

DEMO_MODEL = Path("results/phantoms/models/fold0/model.json")


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of one command, MiB (GNU time's %M, per process)."""
    with tempfile.NamedTemporaryFile("r") as report:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return int(report.read().strip().splitlines()[-1]) / 1024


def linked_scans(folder: Path, sources: list[Path], count: int) -> list[InputFile]:
    """``count`` distinct files (hard links cycling through ``sources``)."""
    folder.mkdir(parents=True)
    for i in range(count):
        os.link(sources[i % len(sources)], folder / f"SCAN{i:05d}.dcm")
    return collect_inputs([folder]).files


def forward_rate(model: LoadedModel, batch: np.ndarray, device: torch.device, scans: int) -> float:
    """Scans/s of ``predict_probabilities`` alone on one preprocessed batch, repeated."""
    predict_probabilities(model, batch, False, device)  # warm-up
    repeats = max(1, scans // len(batch))
    start = time.perf_counter()
    for _ in range(repeats):
        predict_probabilities(model, batch, False, device)
    return repeats * len(batch) / (time.perf_counter() - start)


def onnx_model(model_ref: str, model: LoadedModel, folder: Path, device: torch.device) -> LoadedModel | None:
    """The model exported to ONNX and loaded in ONNX Runtime; None (said why) if that cannot run here."""
    try:
        from medseg.inference.onnx_model import export_onnx, load_onnx_model
    except ImportError as err:
        print(f"ONNX Runtime: not measured ({err})")
        return None
    start = time.perf_counter()
    path = export_onnx(model, folder / "model.onnx")
    print(f"export of {model_ref} to ONNX: {time.perf_counter() - start:.1f} s")
    return load_onnx_model(path, device=device)


def end_to_end(files: list[InputFile], model: LoadedModel, settings: PredictSettings, out: Path,
               device: torch.device) -> float:
    predict_files(files[:2], model, settings, out.with_name(out.name + "-warm"), device)
    start = time.perf_counter()
    table, failures = predict_files(files, model, settings, out, device)
    rate = len(files) / (time.perf_counter() - start)
    assert len(table) == len(files) and not failures, failures[:3]
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model reference (default: the demo's model, else the shipped model)")
    parser.add_argument("--n", type=int, default=96, help="scans for the speed figures")
    parser.add_argument("--small", type=int, default=100, help="scans of the first memory run")
    parser.add_argument("--large", type=int, default=10_000, help="scans of the second memory run")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--memory-size", type=int, default=128, help="side of the memory run's small scans (px)")
    parser.add_argument("--skip-memory", action="store_true", help="speed figures only")
    parser.add_argument("--skip-speed", action="store_true", help="memory figures only")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device, "auto").torch_device
    model_ref = args.model or (str(DEMO_MODEL) if DEMO_MODEL.exists() else default_model())
    model = load_model(model_ref, device=device)
    settings = PredictSettings()
    print(f"model {model_ref} ({model.size} px, labels {', '.join(model.labels)}), device {device}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"batch {settings.batch_size}; phantom DICOMs {args.height}x{args.width}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantom_dataset(tmp / "raw", n=16, seed=0, shape=(args.height, args.width))
        sources = sorted((tmp / "raw" / "images").glob("*.dcm"))
        if not args.skip_speed:
            files = linked_scans(tmp / "scans", sources, args.n)
            batch = np.stack([_prepare(f, model, settings).tensor for f in files[:settings.batch_size]])

            backends = {"pytorch": model}
            ort = onnx_model(model_ref, model, tmp, device)
            if ort is not None:
                backends["onnxruntime"] = ort
                difference = float(np.abs(predict_probabilities(ort, batch, False, device)
                                          - predict_probabilities(model, batch, False, device)).max())
                print(f"ONNX Runtime vs PyTorch: largest probability difference {difference:.1e} "
                      "(parity: <= 1e-4)")
            forward = {name: forward_rate(m, batch, device, args.n) for name, m in backends.items()}
            print("forward pass only: " + ", ".join(f"{name} {rate:.2f}" for name, rate in forward.items())
                  + " scans/s")

            workers = default_workers(args.n, settings.batch_size)
            for name, m in backends.items():
                sequential = end_to_end(files, m, dataclasses.replace(settings, workers=0), tmp / f"{name}-seq",
                                        device)
                pipelined = end_to_end(files, m, dataclasses.replace(settings, workers=workers),
                                       tmp / f"{name}-pipe", device)
                print(f"{name}: end to end over {args.n} scans (DICOM -> masks, NIfTI, overlay, SEG, row): "
                      f"one stage after the other {sequential:.2f} scans/s = "
                      f"{sequential / forward[name]:.2f} x forward; "
                      f"pipelined ({workers} + {workers} threads) {pipelined:.2f} scans/s = "
                      f"{pipelined / forward[name]:.2f} x forward (target >= 0.80: "
                      f"{'met' if pipelined / forward[name] >= 0.8 else 'not met; see README, Benchmarks'})")

        if args.skip_memory:
            return
        write_phantom_dataset(tmp / "small", n=16, seed=1, shape=(args.memory_size, args.memory_size))
        small_sources = sorted((tmp / "small" / "images").glob("*.dcm"))
        small = linked_scans(tmp / "memory-scans", small_sources, max(args.small, args.large))
        memory = {}
        # The first run of a model in ONNX Runtime exports it (once; the
        # exporter's memory peak): done here first, so both counts measure
        # the steady state.
        os.environ["MEDSEG_CACHE_DIR"] = str(tmp / "cache")  # a cache of this run's own: the export happens here
        listing = tmp / "export.txt"
        listing.write_text(f"{small[0].path}\n")
        exporting = peak_rss_mb([sys.executable, "-m", "medseg", "-q", "predict", str(listing), "--model", model_ref,
                                 "--out", str(tmp / "export-run"), "--device", args.device])
        print(f"peak memory of `medseg predict` over 1 scan, exporting the model to ONNX first: {exporting:7.0f} MiB")
        for count in (args.small, args.large):
            listing = tmp / f"list{count}.txt"
            listing.write_text("".join(f"{f.path}\n" for f in small[:count]))
            out = tmp / f"mem{count}"
            start = time.perf_counter()
            memory[count] = peak_rss_mb([sys.executable, "-m", "medseg", "-q", "predict", str(listing),
                                         "--model", model_ref, "--out", str(out), "--device", args.device])
            print(f"peak memory of `medseg predict` over {count:5d} scans of {args.memory_size} px: "
                  f"{memory[count]:7.0f} MiB ({count / (time.perf_counter() - start):.1f} scans/s)", flush=True)
            shutil.rmtree(out)
        small_mb, large_mb = memory[args.small], memory[args.large]
        change = 100 * (large_mb / small_mb - 1)
        print(f"peak memory {args.large} vs {args.small} scans: {change:+.1f} % "
              f"(target within 10 %: {'met' if abs(change) <= 10 else 'not met'})")


if __name__ == "__main__":
    main()
