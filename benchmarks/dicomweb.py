"""Pull, predict and push N phantom scans through a real Orthanc (issue 15).

Starts Orthanc with its DICOMweb plugin on loopback in a temporary folder
(tests/orthanc_server.py; Debian's ``orthanc`` and ``orthanc-dicomweb``,
installed by scripts/install-system-packages.sh), uploads N phantom CR
scans, then times, each as its own ``medseg predict`` process:

1. the same scans from a local folder (no network: the baseline);
2. ``medseg predict <root>/studies?ModalitiesInStudy=CR --push``: QIDO-RS
   search, WADO-RS retrieval, prediction, STOW-RS of each scan's SEG and SR;
3. the same command again (everything done: what a rerun costs).

It prints the seconds and scans/s of each, the share of the pull-predict-push
run spent storing (its "push" log lines), and checks that the server holds
N SEG and N SR afterwards.

    .venv/bin/python benchmarks/dicomweb.py [--n 100] [--model MODEL] [--height 512 --width 448]

MODEL: anything ``medseg predict --model`` takes; default the demo's model
(results/phantoms/models/fold0/model.json, after ``make demo``), else the
model shipped with medseg.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Orthanc test server

from orthanc_server import OrthancServer  # noqa: E402

from medseg.models import default_model  # noqa: E402
from medseg.phantoms.write import write_phantom_dataset  # noqa: E402

DEMO_MODEL = REPO / "results/phantoms/models/fold0/model.json"


def timed_predict(args: list[str], log: Path) -> float:
    """Seconds of one ``medseg predict`` run (its log in ``log``); raises on failure."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "medseg", "predict", *args], stdout=handle,
                                stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"medseg predict exited {result.returncode}; see {log}:\n" + log.read_text()[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="scans (default 100)")
    parser.add_argument("--model", help="model reference (default: the demo's model, else the shipped model)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=448)
    args = parser.parse_args()
    model = args.model or (str(DEMO_MODEL) if DEMO_MODEL.exists() else default_model())

    with tempfile.TemporaryDirectory(prefix="medseg-dicomweb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"writing {args.n} phantom scans ({args.height}x{args.width})", flush=True)
        write_phantom_dataset(tmp / "scans", n=args.n, seed=3, shape=(args.height, args.width))
        files = sorted((tmp / "scans" / "images").glob("*.dcm"))
        env_model = ["--model", model]
        with OrthancServer(tmp / "orthanc") as server:
            started = time.perf_counter()
            server.upload(files)
            print(f"Orthanc {server.url}: {len(files)} scans uploaded in {time.perf_counter() - started:.1f} s",
                  flush=True)

            # A first run of a model may export it to ONNX (cached): not part of either figure.
            warm = timed_predict([str(files[0]), "--out", str(tmp / "warm-up"), *env_model], tmp / "warm-up.log")
            print(f"warm-up run (1 scan; exports the model to ONNX on its first use): {warm:.1f} s", flush=True)
            local = timed_predict([str(tmp / "scans" / "images"), "--out", str(tmp / "local"), *env_model],
                                  tmp / "local.log")
            source = f"{server.dicomweb_url}/studies?ModalitiesInStudy=CR"
            log = tmp / "pacs.log"
            pacs = timed_predict([source, "--out", str(tmp / "pacs"), "--push", *env_model], log)
            text = log.read_text()
            pushes = re.findall(r"push (\d+)/(\d+) scans .*? ([\d.]+) s$", text, flags=re.M)
            push_seconds = float(pushes[-1][2]) if pushes else float("nan")
            again = timed_predict([source, "--out", str(tmp / "pacs"), "--push", *env_model], tmp / "again.log")

            client = server.dicomweb_client()
            counts: dict[str, int] = {}
            for item in client.search_for_instances(fields=["Modality"]):
                modality = item["00080060"]["Value"][0]
                counts[modality] = counts.get(modality, 0) + 1

    n = len(files)
    print(f"\nmodel: {model}; {n} scans {args.height}x{args.width}; {os.cpu_count()} CPU cores")
    print(f"{'run':<42}{'seconds':>9}{'scans/s':>9}")
    print(f"{'local folder (no network)':<42}{local:>9.1f}{n / local:>9.2f}")
    print(f"{'DICOMweb pull + predict + push (SEG, SR)':<42}{pacs:>9.1f}{n / pacs:>9.2f}")
    print(f"{'  of which storing (STOW-RS)':<42}{push_seconds:>9.1f}")
    print(f"{'rerun (all done, nothing stored)':<42}{again:>9.1f}")
    print(f"server holds: {counts} (expected CR, SEG and SR {n} each)")
    if counts != {"CR": n, "SEG": n, "SR": n}:
        raise SystemExit("the server does not hold one SEG and one SR per scan")


if __name__ == "__main__":
    main()
