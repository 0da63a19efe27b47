"""The Snakemake workflow: config validation and real runs."""

from __future__ import annotations

import json
import os
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
    for rule in ("phantoms", "preprocess", "splits", "preview", "resolved_config", "cv_start", "train", "cv_finish",
                 "test_cases", "predict", "evaluate"):
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


E2E_CONFIG = (
    "dataset=e2e", "phantoms={'n': 8, 'seed': 3, 'height': 160, 'width': 128}", "preprocess={'size': 64}",
    "splits={'k': 2}",
    "train={'preset': 'cpu_tiny', 'epochs': 2, 'samples_per_epoch': 8, 'batch_size': 4, 'overlay_every': 1}",
)


def test_end_to_end_on_phantoms(workdir):
    run_snakemake(workdir, "--config", *E2E_CONFIG)
    results = workdir / "results" / "e2e"
    manifest = pd.read_csv(results / "preprocessed" / "manifest.csv")
    assert len(manifest) == 8
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
    for rule in ("phantoms", "preprocess", "splits", "preview", "cv_start", "train_fold0", "cv_finish"):
        assert (results / "logs" / f"{rule}.log").is_file()
        assert (results / "benchmarks" / f"{rule}.tsv").is_file()
    # Training ran, tracked in the embedded MLflow store, nested under the CV run.
    assert "epoch 2/2" in (results / "logs" / "train_fold0.log").read_text()
    fold = json.loads((results / "models" / "fold0" / "model.json").read_text())
    summary = json.loads((results / "models" / "summary.json").read_text())
    assert summary["model_uri"] == "models:/medseg-e2e@candidate" and summary["best_fold"] == 0
    from medseg.tracking import client_for

    client = client_for(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("medseg-e2e", "candidate").version) == fold["model_version"]
    child = client.get_run(fold["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    assert "cv_mean_val_dice_mean" in client.get_run(summary["parent_run_id"]).data.metrics
    # Prediction on the fold's held-out scans, at their original geometry, with DICOM SEG.
    test_cases = splits["folds"][0]["test"]
    predictions = pd.read_csv(results / "predictions" / "fold0" / "results.csv")
    assert sorted(predictions.case_id) == sorted(test_cases)
    assert set(predictions.rows) == {160} and set(predictions.cols) == {128}
    assert predictions.model_uri.str.startswith("models:/medseg-e2e/").all()
    for case in test_cases:
        assert (results / "predictions" / "fold0" / case / "seg.dcm").is_file()
    # Evaluation against the phantom masks, logged to MLflow linked to the training run.
    evaluation = pd.read_csv(results / "evaluation" / "fold0" / "cases.csv")
    assert sorted(set(evaluation.case_id)) == sorted(test_cases)
    assert set(evaluation.label) == {"heart", "lungs", "clavicles"}
    assert "Frid-Adar" in (results / "evaluation" / "fold0" / "summary.txt").read_text()
    runs = client.search_runs([child.info.experiment_id], "tags.`medseg.role` = 'evaluation'")
    assert len(runs) == 1 and runs[0].data.tags["training_run_id"] == fold["run_id"]
    # The self-contained HTML report.
    report = subprocess.run([*SNAKEMAKE, "--profile", "workflow/profiles/default", "--cores", "1", "--config",
                             *E2E_CONFIG, "--report", "report.html"], cwd=workdir, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (workdir / "report.html").stat().st_size > 50_000
    assert "preprocess 8/8" in (results / "logs" / "preprocess.log").read_text()
    # Phantom DICOMs carry fake patient fields; none may reach logs or outputs.
    texts = [p.read_text(errors="ignore") for p in results.rglob("*") if p.suffix in {".log", ".csv", ".json", ".tsv"}]
    names = [p.name for p in results.rglob("*")]
    for secret in ("Phantom^Secret", "SECRETID", "Secret"):
        assert not any(secret in t for t in texts + names)
    # A second run has nothing to do.
    again = run_snakemake(workdir, "-n", "--config", *E2E_CONFIG)
    assert "Nothing to be done" in again.stdout + again.stderr
    # A prediction setting reruns prediction and evaluation, never training.
    changed = run_snakemake(workdir, "-n", "--config", *E2E_CONFIG, "predict={'threshold': 0.6}")
    jobs = changed.stdout + changed.stderr
    assert "rule predict:" in jobs and "rule evaluate:" in jobs
    assert "rule train:" not in jobs and "rule cv_start:" not in jobs


def test_jsrt_config_on_real_fold(workdir, jsrt_root):
    # Preprocessing only (training on the real fold is benchmarks/jsrt.py's job).
    run_snakemake(workdir, "--configfile", "config/jsrt.yaml", "--config", f"data_root={jsrt_root}",
                  "preprocess={'size': 64}", "--", "results/jsrt-scr/splits.json", "results/jsrt-scr/preprocessed/preview.png")
    results = workdir / "results" / "jsrt-scr"
    manifest = pd.read_csv(results / "preprocessed" / "manifest.csv")
    n_images = len(list((jsrt_root / "images").glob("*.png")))
    assert len(manifest) == n_images == 124
    assert set(manifest.scr_fold.astype(int)) == {1}
    assert set(manifest.photometric) == {"white-is-zero (inverted)"}


def test_rerun_after_killed_training_resumes(workdir):
    """A train job killed mid-way (as a preempted cluster job) is resumed by
    the next snakemake run from its last.pt, in the same MLflow run."""
    config = ("dataset=resume", *E2E_CONFIG[1:-1],
              "train={'preset': 'cpu_tiny', 'epochs': 3, 'samples_per_epoch': 8, 'batch_size': 4}")
    env = {**os.environ, "MEDSEG_TEST_KILL_AFTER_EPOCH": "1"}
    killed = subprocess.run([*SNAKEMAKE, "--profile", "workflow/profiles/default", "--cores", "2", "--config", *config],
                            cwd=workdir, capture_output=True, text=True, env=env)
    assert killed.returncode != 0
    fold_dir = workdir / "results" / "resume" / "models" / "fold0"
    assert (fold_dir / "last.pt").exists() and not (fold_dir / "model.json").exists()
    run_snakemake(workdir, "--config", *config)
    log = (workdir / "results" / "resume" / "logs" / "train_fold0.log").read_text()
    assert "resuming from" in log and "at epoch 2" in log
    assert "epoch 3/3" in log and "epoch 1/3" not in log
    assert json.loads((fold_dir / "model.json").read_text())["best_epoch"] >= 1
