"""Running the real Snakemake workflow from tests, in a copy of its files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
REPO_ROOT = Path(__file__).resolve().parents[1]

# The demo workflow at test scale: 12 phantoms, 3-fold splits of which two
# folds are trained (parallel jobs on a cluster), each fold's held-out scans
# predicted in two chunks (config predict.chunks).
TEST_CONFIG = (
    "dataset=e2e",
    "phantoms={'n': 12, 'seed': 3, 'height': 160, 'width': 128}",
    "preprocess={'size': 64}",
    "splits={'k': 3}",
    "train_folds=[0, 1]",
    "train={'preset': 'cpu_tiny', 'epochs': 2, 'samples_per_epoch': 8, 'batch_size': 4, 'overlay_every': 1}",
    "predict={'chunks': 2}",
)


def copy_workflow(dest: Path) -> Path:
    """Snakefile, workflow/ and config/ copied into ``dest``, so runs do not touch the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config"):
        src = REPO_ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


def run_snakemake(workdir: Path, *args: str, check: bool = True, profile: str = "default",
                  env: dict[str, str] | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    """``snakemake --profile workflow/profiles/<profile> ARGS`` in ``workdir``
    (the local profile gets ``--cores 2``); with ``check``, a failure shows the output's tail."""
    cores = ["--cores", "2"] if profile == "default" else []
    proc = subprocess.run([*SNAKEMAKE, "--profile", f"workflow/profiles/{profile}", *cores, *args],
                          cwd=workdir, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def read_report(path: Path) -> dict:
    """What a self-contained Snakemake 9 ``report.html`` embeds, as Python objects.

    The report is a single page; its data sit in scripts of their own, each
    assigning JSON to a variable (``<script id="results">var results =
    {...};</script>``): ``results`` ({path: {"name", "labels", "caption"
    (HTML), "mime_type", "data_uri", ...}}), ``categories`` ({category:
    {subcategory: [path, ...]}}) and ``workflow_desc`` (the main page's HTML,
    a JSON string). Each value is decoded from where its assignment starts
    inside its script (the embedded JavaScript libraries have variables of
    the same names), so what follows it does not matter.

    Returns:
        {"results": ..., "categories": ..., "workflow_desc": ...}.
    """
    import json

    html = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    found = {}
    for script, name in (("results", "results"), ("categories", "categories"), ("workflow-desc", "workflow_desc")):
        match = re.search(rf'<script id="{script}">\s*var {name} = ', html)
        assert match, f"{path}: no script {script!r} assigning {name} (has the report's layout changed?)"
        found[name], _ = decoder.raw_decode(html, match.end())
    return found
