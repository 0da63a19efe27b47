"""The Snakemake workflow: config validation and real runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.fixture
def workdir(tmp_path, repo_root) -> Path:
    """A copy of the workflow's files, so runs do not touch the checkout."""
    for name in ("Snakefile", "workflow", "config"):
        src = repo_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*SNAKEMAKE, "--profile", "workflow/profiles/default", "--cores", "2", *args],
        cwd=workdir, capture_output=True, text=True,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_dry_run_default_config(workdir):
    proc = run_snakemake(workdir, "-n")
    out = proc.stdout + proc.stderr
    for rule in ("phantoms", "preprocess", "splits", "preview"):
        assert rule in out


@pytest.mark.parametrize(
    "override, named",
    [
        ("preprocess={'sizee': 3}", "sizee"),  # misspelled key
        ("phantoms={'n': 'many'}", "'n'"),  # wrong type
        ("splits={'scheme': 'random'}", "scheme"),  # not an allowed value
        ("colour=red", "colour"),  # unknown top-level key
    ],
)
def test_schema_errors_name_the_key(workdir, override, named):
    proc = run_snakemake(workdir, "-n", "--config", override, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error validating config" in out
    assert named in out


def test_folder_source_needs_data_root(workdir):
    proc = run_snakemake(workdir, "-n", "--configfile", "config/jsrt.yaml", check=False)
    assert proc.returncode != 0 and "data_root" in proc.stdout + proc.stderr


def test_labels_must_use_known_structures(workdir):
    proc = run_snakemake(workdir, "-n", "--config", "labels={'lungs': ['left_lung', 'spleen']}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "labels.lungs" in out and "spleen" in out


def test_end_to_end_on_phantoms(workdir):
    run_snakemake(
        workdir, "--config", "dataset=e2e", "phantoms={'n': 5, 'seed': 3, 'height': 160, 'width': 128}",
        "preprocess={'size': 64}", "splits={'k': 2}",
    )
    results = workdir / "results" / "e2e"
    manifest = pd.read_csv(results / "preprocessed" / "manifest.csv")
    assert len(manifest) == 5
    assert set(manifest.original_rows) == {160} and set(manifest.original_cols) == {128}
    assert set(manifest.photometric) == {"MONOCHROME1 (inverted)", "MONOCHROME2"}
    assert len(pd.read_csv(results / "preprocessed" / "failures.csv")) == 0
    for row in manifest.itertuples():
        assert (results / "preprocessed" / row.image).is_file()
        assert (results / "preprocessed" / row.label).is_file()
    splits = json.loads((results / "splits.json").read_text())
    assert len(splits["folds"]) == 2
    assert sorted(c for f in splits["folds"] for c in f["test"]) == sorted(manifest.case_id)
    assert (results / "preprocessed" / "preview.png").stat().st_size > 10_000
    for rule in ("phantoms", "preprocess", "splits", "preview"):
        assert (results / "logs" / f"{rule}.log").is_file()
        assert (results / "benchmarks" / f"{rule}.tsv").is_file()
    assert "preprocess 5/5" in (results / "logs" / "preprocess.log").read_text()
    # Phantom DICOMs carry fake patient fields; none may reach logs or outputs.
    texts = [p.read_text(errors="ignore") for p in results.rglob("*") if p.suffix in {".log", ".csv", ".json", ".tsv"}]
    names = [p.name for p in results.rglob("*")]
    for secret in ("Phantom^Secret", "SECRETID", "Secret"):
        assert not any(secret in t for t in texts + names)
    # A second run has nothing to do.
    again = run_snakemake(workdir, "-n", "--config", "dataset=e2e", "phantoms={'n': 5, 'seed': 3, 'height': 160, 'width': 128}",
                          "preprocess={'size': 64}", "splits={'k': 2}")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_jsrt_config_on_real_fold(workdir, jsrt_root):
    run_snakemake(workdir, "--configfile", "config/jsrt.yaml", "--config", f"data_root={jsrt_root}",
                  "preprocess={'size': 64}")
    results = workdir / "results" / "jsrt-scr"
    manifest = pd.read_csv(results / "preprocessed" / "manifest.csv")
    n_images = len(list((jsrt_root / "images").glob("*.png")))
    assert len(manifest) == n_images == 124
    assert set(manifest.scr_fold.astype(int)) == {1}
    assert set(manifest.photometric) == {"white-is-zero (inverted)"}
