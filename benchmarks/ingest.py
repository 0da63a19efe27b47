"""Ingest speed: preprocessed images per second from DICOM.

Prints medseg's full preprocessing (read + Modality/VOI LUT + polarity +
normalise + resize + pad + NIfTI write, masks included) next to a plain
pydicom read + resize of the same files, in the same run.

    .venv/bin/python benchmarks/ingest.py                      # phantom DICOMs
    .venv/bin/python benchmarks/ingest.py --n 64 --height 2048 --width 2048
    .venv/bin/python benchmarks/ingest.py --dicom-dir /path/to/dicoms
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from medseg.ingest.inputs import list_image_files
from medseg.phantoms.write import write_phantom_dataset
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset


def plain_pydicom(files: list[Path], size: int) -> None:
    """Baseline: pydicom read + pixel_array + bilinear resize to size x size."""
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
        torch.nn.functional.interpolate(torch.from_numpy(pixels)[None, None], size=(size, size), mode="bilinear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom-dir", type=Path, help="existing DICOM folder (default: write phantoms)")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dicom_dir:
            images, masks = args.dicom_dir, None
        else:
            write_phantom_dataset(tmp / "raw", n=args.n, seed=0, shape=(args.height, args.width))
            images, masks = tmp / "raw" / "images", tmp / "raw" / "masks"
        files = list_image_files(images)
        settings = PreprocessSettings(size=args.size)

        # Warm up imports, caches and the worker pool's fork server (a one-off
        # cost of a few seconds per run, printed separately) so neither side
        # pays them in the timed part.
        plain_pydicom(files[:2], args.size)
        preprocess_dataset(DatasetSpec(images=files[0], masks_root=masks), settings, tmp / "warm")
        start = time.perf_counter()
        warm_dir = tmp / "warm-pool"
        warm_dir.mkdir()
        for f in files[:2]:
            (warm_dir / f.name).symlink_to(f)
        preprocess_dataset(DatasetSpec(images=warm_dir, masks_root=masks), settings, tmp / "warm2", workers=2)
        pool_startup = time.perf_counter() - start

        start = time.perf_counter()
        plain_pydicom(files, args.size)
        plain = len(files) / (time.perf_counter() - start)

        results = {}
        for workers in sorted({1, args.workers}):
            for with_masks in ([True, False] if masks else [False]):
                spec = DatasetSpec(images=images, masks_root=masks if with_masks else None)
                out = tmp / f"out-{workers}-{with_masks}"
                start = time.perf_counter()
                result = preprocess_dataset(spec, settings, out, workers=workers)
                elapsed = time.perf_counter() - start
                assert not result.failures, result.failures
                results[(workers, with_masks)] = len(files) / elapsed

    print(f"files: {len(files)} DICOM, {args.height}x{args.width} -> {args.size}x{args.size}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"plain pydicom read + resize (1 process)     : {plain:8.1f} images/s")
    print(f"(worker pool start-up, once per run: {pool_startup:.1f} s, not included below)")
    for (workers, with_masks), rate in results.items():
        what = "image + 5 masks" if with_masks else "image only     "
        print(f"medseg preprocess, {what}, {workers} worker(s): {rate:8.1f} images/s  "
              f"({rate / plain:.2f} x plain)")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    main()
