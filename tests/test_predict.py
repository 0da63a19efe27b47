"""Batch prediction: original geometry, DICOM SEG, results table, bad inputs, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image

from dicom_factory import make_sr
from medseg.structures import DEFAULT_LABELS

MEDSEG = [sys.executable, "-m", "medseg"]


def _predict(model: Path, inputs, out: Path, *extra, check=True):
    proc = subprocess.run([*MEDSEG, "predict", *map(str, inputs), "--model", str(model), "--out", str(out), *extra],
                          capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_predict_outputs_at_original_geometry(model_and_scans, tmp_path):
    model, scans = model_and_scans
    _predict(model, [scans], tmp_path)
    table = pd.read_csv(tmp_path / "results.csv")
    parquet = pd.read_parquet(tmp_path / "results.parquet")
    assert len(table) == len(parquet) == 4
    for column in ("case_id", "area_mm2_heart", "area_mm2_lungs", "area_mm2_clavicles", "ctr", "qc_flags",
                   "model_uri", "seconds"):
        assert column in table.columns
    assert table[["area_mm2_lungs", "ctr", "seconds"]].notna().all().all()
    assert (table.area_mm2_lungs > 0).all()
    for case in table.case_id:
        case_dir = tmp_path / case
        # Non-square 160x128 input -> non-square 160x128 masks.
        for label in DEFAULT_LABELS:
            with Image.open(case_dir / "masks" / f"{label}.png") as png:
                assert png.size == (128, 160)
                assert set(np.unique(np.asarray(png))) <= {0, 255}
        stack = nib.load(case_dir / "labels.nii.gz")
        assert stack.shape[:2] == (128, 160)  # NIfTI stores (x, y)
        assert stack.header.get_zooms()[:2] == pytest.approx((1.4, 1.4))
        with Image.open(case_dir / "overlay.png") as png:
            assert png.size == (128, 160) and png.mode == "RGB"
        # DICOM SEG references the source and holds the same masks.
        from medseg.inference.dicom_seg import read_dicom_seg

        source = pydicom.dcmread(scans / f"{case}.dcm")
        seg = pydicom.dcmread(case_dir / "seg.dcm")
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
        referenced = seg.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
        assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        seg_masks = read_dicom_seg(case_dir / "seg.dcm")
        for label in DEFAULT_LABELS:
            png = np.asarray(Image.open(case_dir / "masks" / f"{label}.png")) > 0
            assert np.array_equal(seg_masks[label], png), label
        # No patient field in the table or output names.
        assert "Secret" not in json.dumps(table.astype(str).to_dict()) and "Secret" not in case


def test_bad_inputs_listed_rest_predicted(model_and_scans, tmp_path):
    model, scans = model_and_scans
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted(scans.iterdir())[:2]
    for f in good:
        (inputs / f.name).write_bytes(f.read_bytes())
    (inputs / "notes.txt").write_text("not a scan")
    (inputs / "TRUNC").write_bytes(good[0].read_bytes()[:5000])
    make_sr(inputs / "REPORT.dcm")
    proc = _predict(model, [inputs], tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 2
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert sorted(Path(f).name for f in failures.file) == ["TRUNC", "notes.txt"]
    assert "2 of 4 inputs failed (1 non-image files skipped" in proc.stderr
    # The structured report is no scan: skipped and listed, not a failure.
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert [Path(f).name for f in skipped.file] == ["REPORT.dcm"]


def test_interrupted_run_finishes_on_rerun(model_and_scans, tmp_path):
    model, scans = model_and_scans
    many = tmp_path / "many"
    many.mkdir()
    source = sorted(scans.iterdir())[0].read_bytes()
    for i in range(40):  # same pixels, distinct files
        (many / f"SCAN{i:03d}.dcm").write_bytes(source)
    out = tmp_path / "out"
    proc = subprocess.Popen([*MEDSEG, "predict", str(many), "--model", str(model), "--out", str(out),
                             "--batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/prediction.json"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list(out.glob("*/prediction.json")))
    assert 4 <= finished_before < 40, "the run was not interrupted half way"
    rerun = _predict(model, [many], out, "--batch-size", "2")
    assert f"{finished_before} already done" in rerun.stderr
    table = pd.read_csv(out / "results.csv")
    assert sorted(table.case_id) == [f"SCAN{i:03d}" for i in range(40)]  # each once
    assert not list(out.rglob(".tmp-*"))  # no partial files left
    for case in table.case_id:
        assert (out / case / "seg.dcm").is_file() and (out / case / "labels.nii.gz").is_file()


def test_real_legacy_cr_end_to_end(model_and_scans, tmp_path):
    """The real ACR-NEMA CR (no preamble, MONOCHROME1, 10-bit) goes all the way through."""
    from conftest import shared_data_dir

    real = shared_data_dir() / "dicom" / "CR-MONO1-10-chest.dcm"
    if not real.exists():
        pytest.skip(f"{real} not present")
    model, _ = model_and_scans
    _predict(model, [real], tmp_path)
    table = pd.read_csv(tmp_path / "results.csv")
    assert table.case_id.tolist() == ["CR-MONO1-10-chest"]
    assert (table.rows[0], table.cols[0]) == (440, 440)
    case_dir = tmp_path / "CR-MONO1-10-chest"
    with Image.open(case_dir / "overlay.png") as png:
        assert png.size == (440, 440)
    from medseg.inference.dicom_seg import read_dicom_seg

    seg = pydicom.dcmread(case_dir / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        "1.2.392.200036.9125.0.19950720112207"
    assert set(read_dicom_seg(case_dir / "seg.dcm")) == set(DEFAULT_LABELS)


def test_tta_agrees_with_plain_prediction(model_and_scans):
    """Shift/zoom test-time augmentation undoes its transforms: the averaged
    probabilities still line up with the plain ones (a wrong inverse would
    move the masks)."""
    from medseg.inference.model import load_model
    from medseg.inference.predict import PredictSettings, _prepare, predict_probabilities
    from medseg.ingest.inputs import collect_inputs

    model_path, scans = model_and_scans
    model = load_model(str(model_path))
    files = collect_inputs([scans]).files
    batch = np.stack([_prepare(f, model, PredictSettings()).tensor for f in files])
    plain = predict_probabilities(model, batch, False, torch.device("cpu")) >= 0.5
    tta = predict_probabilities(model, batch, True, torch.device("cpu")) >= 0.5
    lungs = model.labels.index("lungs")
    dice = 2 * (plain[:, lungs] & tta[:, lungs]).sum() / (plain[:, lungs].sum() + tta[:, lungs].sum())
    assert plain.shape == tta.shape and dice > 0.9


@pytest.mark.parametrize("n_files, count", [(0, 3), (2, 3), (7, 3), (1000, 8)])
def test_chunks_cover_every_file_once_in_order(n_files, count):
    from medseg.inference.predict import Chunk

    files = [Path(f"scan{i:04d}.dcm") for i in range(n_files)]
    parts = [Chunk(i, count).select(files) for i in range(count)]
    assert [f for part in parts for f in part] == files
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert Chunk.parse("2/8") == Chunk(2, 8) and Chunk(2, 8).name == "chunk-2-of-8"
    for bad in ("3/3", "1-4", "a/4"):
        with pytest.raises(ValueError):
            Chunk.parse(bad)


def test_chunked_predict_then_gather_equals_one_run(model_and_scans, tmp_path):
    """Two chunk jobs + gather give the tables of one unsplit run; gathering
    before every chunk has finished is refused, naming the missing chunk."""
    model, scans = model_and_scans
    (scans.parent / "bad").mkdir(exist_ok=True)
    broken = scans.parent / "bad" / "broken.dcm"
    broken.write_bytes(b"not a dicom file")
    whole = tmp_path / "whole"
    _predict(model, [scans, broken], whole, "--no-seg", check=False)
    chunked = tmp_path / "chunked"
    first = _predict(model, [scans, broken], chunked, "--no-seg", "--chunk", "0/2")
    assert not (chunked / "results.csv").exists()
    early = subprocess.run([*MEDSEG, "gather-predictions", str(chunked), "--chunks", "2"], capture_output=True,
                           text=True)
    assert early.returncode == 2 and "failures.chunk-1-of-2.csv" in early.stderr
    second = _predict(model, [scans, broken], chunked, "--no-seg", "--chunk", "1/2", check=False)
    assert first.returncode == 0 and second.returncode == 1  # the broken file is in the last chunk
    gathered = subprocess.run([*MEDSEG, "gather-predictions", str(chunked), "--chunks", "2"], capture_output=True,
                              text=True)
    assert gathered.returncode == 0, gathered.stderr[-2000:]
    columns = ["case_id", "rows", "cols", "ctr", "area_mm2_heart"]
    pd.testing.assert_frame_equal(pd.read_csv(whole / "results.csv")[columns],
                                  pd.read_csv(chunked / "results.csv")[columns])
    assert list(pd.read_csv(chunked / "failures.csv").file) == [str(broken)]
    assert (chunked / "ctr_distribution.png").exists()
