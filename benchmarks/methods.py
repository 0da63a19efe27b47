"""The lecture's methods on real radiographs: networks and decoder upsampling
compared on JSRT/SCR with one budget, and their checkerboard artifacts.

    .venv/bin/python benchmarks/methods.py train --jobs 2     # trains + scores every method (fold 0)
    .venv/bin/python benchmarks/methods.py report             # writes docs/methods.md and its figures

``train`` runs ``benchmarks/jsrt.py`` once per method (same recipe,
``config/jsrt-cpu.yaml``, with the network, upsampling, preset and epochs
below; held-out fold 0 of the workflow's 5-fold split, scored at the masks'
1024x1024), each job pinned to its own core; every training and every
benchmark row is an MLflow run tagged ``medseg.comparison=methods`` (and
``medseg.network`` / ``medseg.upsample``), so the MLflow UI groups them.
``report`` reads the rows, loads each trained model, measures the
checkerboard score (:mod:`medseg.evaluation.checkerboard`) of the output
probabilities and of the input gradient at initialisation and after
training on one held-out radiograph, times prediction, and writes the table
and two figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "results" / "jsrt-benchmark"
TABLE = WORK / "methods.jsonl"
DOC = ROOT / "docs" / "methods.md"
FIGURES = ROOT / "docs" / "figures"
COMPARISON = "methods"

# (network, upsample): the decoders inside one network (segnet: no skips, so
# the decoder alone carries position), then the other architectures.
METHODS = [
    ("segnet", "max_unpool"), ("segnet", "bed_of_nails"), ("segnet", "resize_nearest"),
    ("segnet", "resize_bilinear"), ("segnet", "transposed"), ("segnet", "transposed_k3s2"),
    ("segnet", "pixel_shuffle"),
    ("basic_unet", "resize_bilinear"), ("unet", "transposed"), ("fcn8s", "transposed"),
    ("deeplabv3", "resize_bilinear"),
]
PRESET = "cpu_small"
EPOCHS = 20


def method_name(network: str, upsample: str) -> str:
    return f"methods-{network}-{upsample}"


def train(args: argparse.Namespace) -> None:
    todo = [m for m in METHODS if not args.only or method_name(*m) in args.only or m[0] in args.only]
    cores = list(range(args.jobs))
    free = list(cores)
    lock = threading.Lock()

    def one(method: tuple[str, str]) -> int:
        with lock:
            core = free.pop(0)
        try:
            network, upsample = method
            command = ["taskset", "-c", str(core), sys.executable, str(ROOT / "benchmarks" / "jsrt.py"),
                       "--config", str(ROOT / "config" / "jsrt-cpu.yaml"), "--folds", "0",
                       "--name", method_name(*method), "--table", str(args.table),
                       "--set", f"train.network={network}", "--set", f"train.upsample={upsample}",
                       "--set", f"train.preset={args.preset}", "--set", f"train.epochs={args.epochs}",
                       "--tag", f"medseg.comparison={COMPARISON}"]
            log = WORK / f"{method_name(*method)}.log"
            started = time.perf_counter()
            print(f"[core {core}] {method_name(*method)}: started (log {log})", flush=True)
            with log.open("w") as handle:
                rc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
            print(f"[core {core}] {method_name(*method)}: rc {rc} after {time.perf_counter() - started:.0f} s",
                  flush=True)
            return rc
        finally:
            with lock:
                free.append(core)

    WORK.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, todo))
    failed = [method_name(*m) for m, rc in zip(todo, codes) if rc]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train and score every method on fold 0")
    p_train.add_argument("--jobs", type=int, default=2, help="methods side by side, one core each")
    p_train.add_argument("--only", nargs="+", help="method names or networks to run")
    p_train.add_argument("--epochs", type=int, default=EPOCHS)
    p_train.add_argument("--preset", default=PRESET)
    p_train.add_argument("--table", type=Path, default=TABLE)
    p_report = sub.add_parser("report", help="write docs/methods.md and its figures")
    p_report.add_argument("--table", type=Path, default=TABLE)
    p_report.add_argument("--only", nargs="+", help="method names or networks to report (default: all)")
    p_report.add_argument("--reuse", action="store_true",
                          help="redraw figures and text from the last report's measurements")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)
    else:
        from methods_report import report  # noqa: PLC0415  (heavy imports only here)

        report(args.table, args.only, args.reuse)


if __name__ == "__main__":
    main()
