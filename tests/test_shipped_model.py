"""The model shipped inside the package: `medseg predict` works on a fresh
install with no training and no MLflow store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import shared_data_dir
from PIL import Image
from requirements_switch import skip_or_fail

from medseg.models import DEFAULT_MODEL, default_model, shipped_model, shipped_models

MEDSEG = [sys.executable, "-m", "medseg"]


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*MEDSEG, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_shipped_model_is_complete_small_and_listed():
    model = shipped_model(DEFAULT_MODEL)
    assert model is not None and default_model() == DEFAULT_MODEL
    assert [m.name for m in shipped_models()] == [DEFAULT_MODEL]
    model.verify()  # the weights are the card's (not an LFS pointer or a stale file)
    assert model.checkpoint.stat().st_size < 25e6
    card = model.card
    assert card["labels"] == ["heart", "lungs", "clavicles"] and card["size"] == 256
    cv = card["cross_validation"]
    assert set(cv["structures"]) == {"lungs", "heart", "clavicles"} and cv["n_cases"] >= 20
    assert all(0.5 < cv["structures"][k]["jaccard"] <= 1 for k in cv["structures"])
    assert "research" in card["terms"] and "JSRT" in card["terms"]
    from medseg.inference.model import load_model

    # The card itself is a model reference too (it names its weights).
    assert load_model(str(model.checkpoint.with_suffix(".json"))).uri.startswith(f"{DEFAULT_MODEL} (shipped")
    listing = _run("models")
    assert listing.returncode == 0, listing.stderr
    assert f"{DEFAULT_MODEL}  (default --model)" in listing.stdout
    assert f"{cv['structures']['lungs']['jaccard']:.3f}" in listing.stdout  # the CV figures ...
    assert "research and education only" in listing.stdout  # ... and the data's terms


def _jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / (pred | truth).sum())


def test_predict_without_model_uses_the_shipped_one_on_jsrt_radiographs(jsrt_root, tmp_path):
    """A fresh install's first command: `medseg predict SCANS --out DIR`, no
    --model, no store. On two JSRT radiographs (inverted PNGs, 0.35 mm) the
    masks match SCR's. These cases were among the 124 the shipped model was
    trained on: this checks the pipeline around it (polarity, geometry,
    the contract), the cross-validation figures in its card check accuracy."""
    scans = tmp_path / "scans"
    scans.mkdir()
    cases = ["JPCLN001", "JPCNN011"]
    for case in cases:
        shutil.copy(jsrt_root / "images" / f"{case}.png", scans)
    out = tmp_path / "out"
    proc = _run("predict", scans, "--out", out, "--invert", "--pixel-spacing", "0.35", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--model not given: using {DEFAULT_MODEL}" in proc.stderr
    assert not (tmp_path / "results" / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    table = pd.read_csv(out / "results.csv").set_index("case_id")
    assert sorted(table.index) == cases
    assert table["model_uri"].str.startswith(f"{DEFAULT_MODEL} (shipped").all()
    for case in cases:
        truth = {name: np.array(Image.open(jsrt_root / "masks" / name / f"{case}.gif")) > 0
                 for name in ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle")}
        pred = {name: np.array(Image.open(out / case / "masks" / f"{name}.png")) > 0
                for name in ("heart", "lungs", "clavicles")}
        assert _jaccard(pred["lungs"], truth["left_lung"] | truth["right_lung"]) > 0.93, case
        assert _jaccard(pred["heart"], truth["heart"]) > 0.85, case
        assert _jaccard(pred["clavicles"], truth["left_clavicle"] | truth["right_clavicle"]) > 0.70, case
        meta = json.loads((out / case / "prediction.json").read_text())
        assert meta["labels"] == ["heart", "lungs", "clavicles"] and meta["original_shape"] == [1024, 1024]


def test_shipped_model_on_a_real_legacy_cr_it_never_saw(tmp_path):
    """A real chest CR from another scanner and decade (ACR-NEMA,
    MONOCHROME1, 10-bit): two lungs, a heart between them, a plausible CTR."""
    path = shared_data_dir() / "dicom" / "CR-MONO1-10-chest.dcm"
    if not path.is_file():
        skip_or_fail(f"legacy CR not present at {path}")
    out = tmp_path / "out"
    proc = _run("predict", path, "--out", out, "--no-seg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = pd.read_csv(out / "results.csv").iloc[0]
    flags = str(row["qc_flags"]) if isinstance(row["qc_flags"], str) else ""
    assert not any(f.startswith("missing_") or f == "lungs_not_two_components" for f in flags.split("|")), flags
    assert 0.35 < row["ctr"] < 0.6, row["ctr"]
