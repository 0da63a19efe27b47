"""Prediction speed and memory.

- End to end (read DICOM -> masks + NIfTI + overlay + DICOM SEG + table row)
  scans/s on phantom DICOMs at their original size, next to the model's
  forward pass alone on the same scans (the ratio is the pipeline overhead).
- Peak resident memory of `medseg predict` over --small and --large scans
  (constant memory: the two should be about equal).

    .venv/bin/python benchmarks/predict.py [--model results/phantoms/models/fold0/model.json]
        [--n 64] [--small 100] [--large 1000] [--height 512 --width 448]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.ingest.inputs import collect_inputs
from medseg.inference.model import load_model
from medseg.inference.predict import PredictSettings, _prepare, predict_files, predict_probabilities
from medseg.phantoms.write import write_phantom_dataset
from medseg.training.network import NetworkSpec, build_network
from medseg.training.trainer import pick_device

DEMO_MODEL = Path("results/phantoms/models/fold0/model.json")


def untrained_checkpoint(path: Path, size: int) -> Path:
    """A checkpoint with fresh weights: same cost per scan as a trained one."""
    net = build_network(NetworkSpec(preset="cpu_small", out_channels=3))
    torch.save({"model": net.state_dict(), "labels": ["heart", "lungs", "clavicles"], "size": size,
                "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5},
                "settings": {"network": "basic_unet", "preset": "cpu_small", "upsample": "resize_bilinear"}}, path)
    return path


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of one command, MiB (GNU time's %M, per process)."""
    with tempfile.NamedTemporaryFile("r") as report:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return int(report.read().strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model URI, model.json or best.pt (default: the demo's model if present)")
    parser.add_argument("--n", type=int, default=64, help="scans for the speed figures")
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device, "auto").torch_device

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_ref = args.model or (str(DEMO_MODEL) if DEMO_MODEL.exists() else None)
        if model_ref is None:
            model_ref = str(untrained_checkpoint(tmp / "untrained.pt", 256))
        model = load_model(model_ref, device=device)
        write_phantom_dataset(tmp / "raw", n=min(args.n, 16), seed=0, shape=(args.height, args.width))
        sources = sorted((tmp / "raw" / "images").glob("*.dcm"))
        scans = tmp / "scans"
        scans.mkdir()
        for i in range(max(args.n, args.large)):
            os.link(sources[i % len(sources)], scans / f"SCAN{i:05d}.dcm")
        files = collect_inputs([scans]).files
        settings = PredictSettings()

        # Forward pass alone on the same scans, preprocessed beforehand.
        batch = np.stack([_prepare(f, model, settings).tensor for f in files[:settings.batch_size]])
        predict_probabilities(model, batch, False, device)  # warm-up
        start = time.perf_counter()
        for _ in range(args.n // settings.batch_size):
            predict_probabilities(model, batch, False, device)
        forward = (args.n // settings.batch_size) * settings.batch_size / (time.perf_counter() - start)

        predict_files(files[:2], model, settings, tmp / "warm", device)
        start = time.perf_counter()
        table, failures = predict_files(files[:args.n], model, settings, tmp / "speed", device)
        end_to_end = args.n / (time.perf_counter() - start)
        assert len(table) == args.n and not failures

        memory = {}
        for count in (args.small, args.large):
            listing = tmp / f"list{count}.txt"
            listing.write_text("".join(f"{f.path}\n" for f in files[:count]))
            out = tmp / f"mem{count}"
            memory[count] = peak_rss_mb([sys.executable, "-m", "medseg", "-q", "predict", str(listing),
                                         "--model", model_ref, "--out", str(out), "--device", args.device])
            shutil.rmtree(out)

    print(f"model {model_ref} ({model.size} px, labels {', '.join(model.labels)}), device {device}, "
          f"{os.cpu_count()} CPUs; phantom DICOMs {args.height}x{args.width}")
    print(f"end to end (DICOM -> masks, NIfTI, overlay, SEG, row): {end_to_end:6.2f} scans/s over {args.n} scans")
    print(f"model forward pass only (batch {settings.batch_size}):           {forward:6.2f} scans/s "
          f"-> pipeline share of time {100 * (1 - end_to_end / forward):.0f}%")
    for count, mb in memory.items():
        print(f"peak memory of `medseg predict` over {count:5d} scans: {mb:7.0f} MiB")


if __name__ == "__main__":
    main()
