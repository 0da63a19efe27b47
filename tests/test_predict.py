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


def _truth(raw: Path, case: str, columns_step: int = 1) -> dict[str, np.ndarray]:
    """The phantom's own ground truth per label, at the scan's geometry
    (columns averaged in groups of ``columns_step``, as the scan's pixels)."""
    masks = {}
    for label, sources in DEFAULT_LABELS.items():
        union = np.zeros((0, 0), dtype=bool)
        for name in sources:
            with Image.open(raw / "masks" / name / f"{case}.gif") as gif:
                mask = np.asarray(gif.convert("L")) > 127
            union = mask if union.size == 0 else union | mask
        if columns_step > 1:
            h, w = union.shape
            union = union.reshape(h, w // columns_step, columns_step).mean(axis=2) >= 0.5
        masks[label] = union
    return masks


def _with_non_square_pixels(source: Path, dest: Path, columns_step: int) -> None:
    """The scan with every ``columns_step`` columns averaged into one: the
    same anatomy on pixels ``columns_step`` times wider than tall
    (Pixel Spacing row\\column = s\\columns_step*s)."""
    ds = pydicom.dcmread(source)
    stored = ds.pixel_array.astype(np.float64)
    h, w = stored.shape
    ds.PixelData = np.round(stored.reshape(h, w // columns_step, columns_step).mean(axis=2)).astype("<u2").tobytes()
    ds.Columns = w // columns_step
    row, col = (float(v) for v in ds.PixelSpacing)
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{row:g}", f"{col * columns_step:g}"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dest, enforce_file_format=True)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def truth_run(model_and_scans, tmp_path_factory):
    """One `medseg predict` over the 4 unseen phantom scans (160x128, 1.4 mm;
    MONOCHROME1 and MONOCHROME2) and non-square-pixel versions of two of them
    (160x64, 1.4 x 2.8 mm). Returns (output folder, input folder,
    {case ID: (truth masks per label at the scan's geometry, (row, column) spacing in mm)})."""
    model, scans = model_and_scans
    raw = model.parent.parent / "raw"
    tmp = tmp_path_factory.mktemp("truth-run")
    inputs = tmp / "in"
    inputs.mkdir()
    expected = {}
    for source in sorted(scans.glob("*.dcm")):
        (inputs / source.name).write_bytes(source.read_bytes())
        expected[source.stem] = (_truth(raw, source.stem), (1.4, 1.4))
    for source in sorted(scans.glob("*.dcm"))[:2]:  # one MONOCHROME1, one MONOCHROME2
        name = f"{source.stem}-wide"
        _with_non_square_pixels(source, inputs / f"{name}.dcm", 2)
        expected[name] = (_truth(raw, source.stem, columns_step=2), (1.4, 2.8))
    _predict(model, [inputs], tmp / "out")
    return tmp / "out", inputs, expected


def test_predicted_masks_match_truth_at_scan_geometry(truth_run):
    """Masks and CTR agree with the phantoms' own truth at each scan's size and
    aspect, for MONOCHROME1 and MONOCHROME2, a non-square image (160x128) and
    non-square pixels (1.4 x 2.8 mm): a flipped, shifted, transposed or
    polarity-inverted prediction fails."""
    from medseg.inference.ctr import cardiothoracic_ratio

    out, inputs, expected = truth_run
    photometric = {pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation
                   for f in inputs.iterdir()}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    table = pd.read_csv(out / "results.csv").set_index("case_id")
    assert sorted(table.index) == sorted(expected)
    for case, (truth, spacing) in expected.items():
        predicted = {}
        for label in DEFAULT_LABELS:
            with Image.open(out / case / "masks" / f"{label}.png") as png:
                predicted[label] = np.asarray(png) > 0
            assert predicted[label].shape == truth[label].shape, (case, label)
        dice = {label: _dice(predicted[label], truth[label]) for label in DEFAULT_LABELS}
        # The test model reaches lungs 0.96-0.98 and heart 0.94-0.97 here; a
        # flip, a shift by a few pixels or an inverted polarity falls below.
        assert dice["lungs"] > 0.93 and dice["heart"] > 0.9, (case, dice)
        # CTR: within 0.03 here; a column of 2.8 mm moves it by ~0.013.
        truth_ctr = cardiothoracic_ratio(truth["heart"], truth["lungs"], spacing).ctr
        assert table.loc[case, "ctr"] == pytest.approx(truth_ctr, abs=0.04), case
        # Areas in mm2 (0.95-1.12 of the truth's here): a pixel spacing read wrongly is off by 2x.
        for label in ("heart", "lungs"):
            truth_mm2 = truth[label].sum() * spacing[0] * spacing[1]
            assert table.loc[case, f"area_mm2_{label}"] == pytest.approx(truth_mm2, rel=0.2), (case, label)
        assert table.loc[case, "spacing_row_mm"] == pytest.approx(spacing[0]), case
        assert table.loc[case, "spacing_col_mm"] == pytest.approx(spacing[1]), case


def test_predict_outputs_at_original_geometry(truth_run):
    """Every output at the scan's own grid and spacing; the DICOM SEG
    references its source and holds the PNG masks."""
    from medseg.inference.dicom_seg import read_dicom_seg

    out, inputs, expected = truth_run
    table = pd.read_csv(out / "results.csv")
    parquet = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(table, parquet, check_dtype=False)
    assert len(table) == len(expected)
    for column in ("case_id", "area_mm2_heart", "area_mm2_lungs", "area_mm2_clavicles", "ctr", "qc_flags",
                   "model_uri", "seconds"):
        assert column in table.columns
    assert table[["area_mm2_lungs", "ctr", "seconds"]].notna().all().all()
    for case in table.case_id:
        case_dir = out / case
        rows, cols = expected[case][0]["lungs"].shape  # 160x128, or 160x64 for wide pixels
        for label in DEFAULT_LABELS:
            with Image.open(case_dir / "masks" / f"{label}.png") as png:
                assert png.size == (cols, rows)
                assert set(np.unique(np.asarray(png))) <= {0, 255}
        stack = nib.load(case_dir / "labels.nii.gz")
        # NIfTI stores (x, y, z, t, label): a 2D vector image, one component per label.
        assert stack.shape == (cols, rows, 1, 1, len(DEFAULT_LABELS))
        # NIfTI zooms are (x, y): column spacing first.
        assert stack.header.get_zooms()[:2] == pytest.approx(expected[case][1][::-1])
        with Image.open(case_dir / "overlay.png") as png:
            # The scan at its own size, then the band with case ID, CTR, QC flags and legend.
            assert png.mode == "RGB" and png.width == cols and png.height > rows
        source = pydicom.dcmread(inputs / f"{case}.dcm")
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
    assert sorted(Path(f).name for f in failures.file) == ["TRUNC"]
    assert "1 of 3 inputs failed (2 non-image files skipped" in proc.stderr
    # The structured report and the notes are no scans: skipped and listed, not failures.
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert sorted(Path(f).name for f in skipped.file) == ["REPORT.dcm", "notes.txt"]


def test_stray_non_image_files_in_a_folder_are_skipped_not_failed(model_and_scans, tmp_path):
    """A clean export folder with the usual litter (notes, .DS_Store,
    Thumbs.db, a DICOMDIR, desktop.ini): every scan predicted, the litter
    counted in one line and listed in skipped.csv, exit status 0. Named
    explicitly, such a file still fails (exit 1), saying it is no image."""
    model, scans = model_and_scans
    inputs = tmp_path / "in"
    (inputs / "series").mkdir(parents=True)
    good = sorted(scans.iterdir())[:2]
    for f in good:
        (inputs / "series" / f.stem).write_bytes(f.read_bytes())  # PACS style: no extension
    litter = {"notes.txt": b"patient list elsewhere", ".DS_Store": b"\0\0\0\1Bud1", "series/Thumbs.db": b"\xd0\xcf",
              "DICOMDIR": b"not a real one", "series/desktop.ini": b"[.ShellClassInfo]"}
    for name, data in litter.items():
        (inputs / name).write_bytes(data)
    proc = _predict(model, [inputs], tmp_path / "out", "--no-seg")
    assert "skipped 5 files that are not images" in proc.stderr
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 2
    assert pd.read_csv(tmp_path / "out" / "failures.csv").empty
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert sorted(Path(f).relative_to(inputs).as_posix() for f in skipped.file) == sorted(litter)
    explicit = _predict(model, [inputs / "series" / "Thumbs.db", good[0]],
                        tmp_path / "explicit", "--no-seg", check=False)
    assert explicit.returncode == 1
    failures = pd.read_csv(tmp_path / "explicit" / "failures.csv")
    assert [Path(f).name for f in failures.file] == ["Thumbs.db"]
    assert "not an image: a .db file" in failures.problem[0]


def _display_png(dicom: Path, path: Path, scale: int = 1, white_is_zero: bool = False) -> Path:
    """The scan as an 8-bit PNG export: display polarity (bone bright), or
    stored white-is-zero (bone dark, like the JSRT PNGs); ``scale`` times
    the pixels on each axis (a film digitised finer)."""
    from medseg.ingest import load_image
    from medseg.preprocessing.intensity import normalise_intensity

    pixels = normalise_intensity(load_image(dicom).pixels)
    if white_is_zero:
        pixels = 1.0 - pixels
    pixels = np.kron(pixels, np.ones((scale, scale), dtype=np.float32))
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path)
    return path


def test_png_exports_read_without_spacing_or_polarity_are_explained(model_and_scans, tmp_path):
    """The new user's trial: PNG exports predicted without --pixel-spacing or
    --invert. A finely digitised PNG (0.175 mm pixels, taken as the assumed
    1.0 mm) is flagged not_frontal_chest; an export stored white-is-zero gives
    garbage. Neither passes silently: spacing_source tells the file's own
    spacing from a given and an assumed one, one warning for the batch says
    how many had no spacing and what to give, and each flag's qc_reasons say
    the spacing was assumed / the image looks inverted (--invert). Given the
    right options, the same files are plausible chests."""
    model, scans = model_and_scans
    dicom = sorted(scans.glob("*.dcm"))[0]  # 160x128, 1.4 mm in its header
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "DICOM.dcm").write_bytes(dicom.read_bytes())
    _display_png(dicom, inputs / "FINE.png", scale=8)  # 1280x1024 at 1.4 / 8 = 0.175 mm
    _display_png(dicom, inputs / "WHITE_IS_ZERO.png", white_is_zero=True)

    proc = _predict(model, [inputs], tmp_path / "out", "--no-seg")
    table = pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False).set_index("case_id")
    sources = table.spacing_source.to_dict()
    assert sources["FINE"] == sources["WHITE_IS_ZERO"] == "assumed"
    assert sources["DICOM"] not in ("given", "assumed", "config", "default")  # from the file's metadata
    assert (table.spacing_plane["FINE"], table.spacing_row_mm["FINE"]) == ("default", 1.0)
    meta = json.loads((tmp_path / "out" / "FINE" / "prediction.json").read_text())
    assert meta["spacing_source"] == "assumed" and meta["qc_reasons"] == table.qc_reasons["FINE"]

    warnings = [line for line in proc.stderr.splitlines() if "no pixel spacing" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "WARNING" in warnings[0] and "2 of 3 inputs had no pixel spacing" in warnings[0]
    assert "1.0 mm was assumed" in warnings[0] and "--pixel-spacing MM" in warnings[0]

    assert "not_frontal_chest" in table.qc_flags["FINE"].split("|")
    fine = table.qc_reasons["FINE"]
    assert "mm wide, outside" in fine and "pixel spacing assumed" in fine and "--pixel-spacing MM" in fine
    inverted = table.qc_reasons["WHITE_IS_ZERO"]
    assert {"not_frontal_chest", "implausible_anatomy"} & set(table.qc_flags["WHITE_IS_ZERO"].split("|"))
    assert "the image looks inverted" in inverted and "predict it with --invert" in inverted
    assert len([line for line in proc.stderr.splitlines() if "look inverted" in line or "looks inverted" in line]) == 1
    assert "invert" not in table.qc_reasons["DICOM"] and "assumed" not in table.qc_reasons["DICOM"]

    # With the true spacing, the fine PNG is a plausible chest, the spacing "given", and no warning.
    given = _predict(model, [inputs / "FINE.png"], tmp_path / "given", "--no-seg", "--pixel-spacing", "0.175")
    row = pd.read_csv(tmp_path / "given" / "results.csv", keep_default_na=False).iloc[0]
    assert row.spacing_source == "given" and row.spacing_row_mm == 0.175
    assert "not_frontal_chest" not in row.qc_flags and np.isfinite(row.ctr), row.qc_reasons
    assert "no pixel spacing" not in given.stderr
    # With --invert, the white-is-zero export is a plausible chest too.
    _predict(model, [inputs / "WHITE_IS_ZERO.png"], tmp_path / "inverted", "--no-seg", "--invert",
             "--pixel-spacing", "1.4")
    row = pd.read_csv(tmp_path / "inverted" / "results.csv", keep_default_na=False).iloc[0]
    assert not {"not_frontal_chest", "implausible_anatomy"} & set(row.qc_flags.split("|")), row.qc_reasons
    # A given spacing 10x off: the batch "succeeds", so one warning must say so.
    wrong = _predict(model, [inputs / "FINE.png"], tmp_path / "wrong", "--no-seg", "--pixel-spacing", "1.75")
    row = pd.read_csv(tmp_path / "wrong" / "results.csv", keep_default_na=False).iloc[0]
    assert "not_frontal_chest" in row.qc_flags and "as given (--pixel-spacing)" in row.qc_reasons
    lines = [line for line in wrong.stderr.splitlines() if "failed a size rule" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "1 of 1 scan failed" in lines[0], wrong.stderr[-2000:]


def test_rerun_with_other_settings_leaves_no_stale_outputs(model_and_scans, tmp_path):
    """A scan predicted again with other settings keeps no output of the
    earlier prediction (a SEG beside masks made without one), and a batch
    with no finished scan leaves no earlier results.parquet beside its
    header-only results.csv (found by a fresh user's trial)."""
    model, scans = model_and_scans
    dicom = sorted(scans.glob("*.dcm"))[0]
    out = tmp_path / "out"
    _predict(model, [dicom], out)
    seg = out / dicom.stem / "seg.dcm"
    assert seg.exists() and (out / "results.parquet").exists()
    _predict(model, [dicom], out, "--no-seg")
    assert not seg.exists()
    assert pd.read_csv(out / "results.csv").dicom_seg.tolist() == [False]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = _predict(model, [broken], out, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (out / "results.csv").read_text() == "case_id\n" and not (out / "results.parquet").exists()
    assert "1 scan folder(s)" in proc.stderr and "from earlier runs are not in it" in proc.stderr


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


def test_pipelined_run_killed_mid_write_reruns_to_complete_results(model_and_scans, tmp_path):
    """Issue 14: reading ahead and writing behind in threads must keep a run
    resumable. Killed while scans are being written (a folder without its
    prediction.json), the rerun predicts exactly the unfinished scans,
    leaves the finished ones untouched, and ends with every scan once,
    each output complete and readable, and no temporary file."""
    from medseg.inference.dicom_seg import read_dicom_seg
    from medseg.nifti import load_nifti_2d

    model, scans = model_and_scans
    many = tmp_path / "many"
    many.mkdir()
    sources = sorted(scans.glob("*.dcm"))
    for i in range(48):  # distinct files (the phantoms cycle)
        (many / f"SCAN{i:03d}.dcm").write_bytes(sources[i % len(sources)].read_bytes())
    out = tmp_path / "out"
    proc = subprocess.Popen([*MEDSEG, "predict", str(many), "--model", str(model), "--out", str(out),
                             "--batch-size", "4", "--workers", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def partial() -> list[Path]:
        return [d for d in out.glob("SCAN*") if d.is_dir() and not (d / "prediction.json").exists()]

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("*/prediction.json"))) >= 4 and partial():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {d.parent.name: d.stat().st_mtime_ns for d in out.glob("*/prediction.json")}
    assert 4 <= len(finished) < 48 and partial(), "not killed while a scan was being written"

    rerun = _predict(model, [many], out, "--batch-size", "4", "--workers", "2")
    assert f"{len(finished)} already done" in rerun.stderr
    assert f"{48 - len(finished)} new" in rerun.stderr
    table = pd.read_csv(out / "results.csv")
    assert sorted(table.case_id) == [f"SCAN{i:03d}" for i in range(48)]  # each once
    assert not list(out.rglob(".tmp-*")) and not partial()
    for case in table.case_id:
        case_dir = out / case
        meta = json.loads((case_dir / "prediction.json").read_text())
        assert meta["source"] == str((many / f"{case}.dcm").resolve())  # its own scan, not another's
        for label in DEFAULT_LABELS:
            with Image.open(case_dir / "masks" / f"{label}.png") as png:
                png.load()
        assert load_nifti_2d(case_dir / "labels.nii.gz")[0].shape[-1] == len(DEFAULT_LABELS)
        assert set(read_dicom_seg(case_dir / "seg.dcm")) == set(DEFAULT_LABELS)
        if case in finished:  # finished before the kill: not predicted again
            assert (case_dir / "prediction.json").stat().st_mtime_ns == finished[case]


def test_ctrl_c_says_how_to_continue_and_exits_130(model_and_scans, tmp_path):
    """Bug report (fresh-user trial): Ctrl-C printed a traceback and exited
    1, the code of "some inputs failed". Now: one line saying how to go on,
    exit status 130, the finished scans kept whole."""
    model, scans = model_and_scans
    many = tmp_path / "many"
    many.mkdir()
    source = sorted(scans.glob("*.dcm"))[0].read_bytes()
    for i in range(40):
        (many / f"SCAN{i:03d}.dcm").write_bytes(source)
    out = tmp_path / "out"
    proc = subprocess.Popen([*MEDSEG, "predict", str(many), "--model", str(model), "--out", str(out),
                             "--batch-size", "2", "--backend", "pytorch"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob("*/prediction.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: the scans finished so far are kept" in stderr and "Traceback" not in stderr
    assert not list(out.rglob(".tmp-*"))


def test_real_legacy_cr_end_to_end(model_and_scans, tmp_path):
    """The real ACR-NEMA CR (no preamble, MONOCHROME1, 10-bit) goes all the way through."""
    from conftest import shared_data_dir

    real = shared_data_dir() / "dicom" / "CR-MONO1-10-chest.dcm"
    if not real.exists():
        from requirements_switch import skip_or_fail

        skip_or_fail(f"{real} not present")
    model, _ = model_and_scans
    _predict(model, [real], tmp_path)
    table = pd.read_csv(tmp_path / "results.csv")
    assert table.case_id.tolist() == ["CR-MONO1-10-chest"]
    assert (table.rows[0], table.cols[0]) == (440, 440)
    case_dir = tmp_path / "CR-MONO1-10-chest"
    with Image.open(case_dir / "overlay.png") as png:
        assert png.width == 440 and png.height > 440  # the scan, then its caption band
    from medseg.inference.dicom_seg import read_dicom_seg

    seg = pydicom.dcmread(case_dir / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        "1.2.392.200036.9125.0.19950720112207"
    assert set(read_dicom_seg(case_dir / "seg.dcm")) == set(DEFAULT_LABELS)


class _ConvStandIn(torch.nn.Module):
    """Translation-equivariant stand-in network: a fixed random 5x5
    convolution and a sigmoid, 3 output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 5, padding=2)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def _stand_in_batch(size: int = 48) -> np.ndarray:
    """(2, 1, size, size) images with structure everywhere (no symmetric blob
    a shift could hide in)."""
    rng = np.random.default_rng(3)
    return rng.random((2, 1, size, size), dtype=np.float32)


@pytest.mark.parametrize("shift", [(3, -2), (-4, 0), (0, 5)])
def test_tta_shift_is_undone_exactly(monkeypatch, shift):
    """TTA with one known shift and a translation-equivariant network equals
    plain prediction exactly away from the border: a missing or reversed
    inverse shift moves the probabilities and fails."""
    from medseg.inference import predict
    from medseg.inference.model import LoadedModel

    model = LoadedModel(_ConvStandIn().eval(), ["heart", "lungs", "clavicles"], 48)
    batch = _stand_in_batch()
    monkeypatch.setattr(predict, "TTA_SHIFTS", (shift,))
    monkeypatch.setattr(predict, "TTA_SCALES", ())
    plain = predict.predict_probabilities(model, batch, False, torch.device("cpu"))
    tta = predict.predict_probabilities(model, batch, True, torch.device("cpu"))
    # Border: the shift's zero fill plus the 5x5 kernel's reach (2 px).
    margin = max(map(abs, shift)) + 2
    inner = (Ellipsis, slice(margin, -margin), slice(margin, -margin))
    np.testing.assert_allclose(tta[inner], plain[inner], rtol=0, atol=1e-6)


def test_tta_zoom_is_undone(monkeypatch):
    """The zoom-out's inverse puts the probabilities back in place: with a
    pointwise stand-in network on a smooth image, TTA differs from plain
    prediction only by interpolation error (a missing or wrong inverse moves
    the edges by pixels and fails)."""
    from medseg.inference import predict
    from medseg.inference.model import LoadedModel

    size = 64
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    smooth = 0.5 + 0.5 * np.sin(xx / 5.0) * np.cos(yy / 7.0)  # edges everywhere
    batch = smooth[None, None]

    class Pointwise(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.repeat(1, 3, 1, 1)

    model = LoadedModel(Pointwise(), ["heart", "lungs", "clavicles"], size)
    monkeypatch.setattr(predict, "TTA_SHIFTS", ())
    monkeypatch.setattr(predict, "TTA_SCALES", (0.9,))
    plain = predict.predict_probabilities(model, batch, False, torch.device("cpu"))
    tta = predict.predict_probabilities(model, batch, True, torch.device("cpu"))
    inner = (Ellipsis, slice(4, -4), slice(4, -4))
    # TTA averages plain and zoomed: the zoomed half may differ by ~interpolation.
    assert np.abs(tta - plain)[inner].max() < 0.03
    # The same check catches a zoom left in place (no inverse).
    monkeypatch.setattr(predict, "_zoom_back", lambda p, scale: p)
    broken = predict.predict_probabilities(model, batch, True, torch.device("cpu"))
    assert np.abs(broken - plain)[inner].max() > 0.1


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
    unsplit = _predict(model, [scans, broken], whole, "--no-seg", check=False)
    assert unsplit.returncode == 1 and "1 of 5 inputs failed" in unsplit.stderr, unsplit.stderr[-2000:]
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
    assert (chunked / "overlays.png").exists()
    summary = (chunked / "summary.txt").read_text()
    assert "4 scans predicted, 1 input failed" in summary and "overlays.png shows 4 of 4 scans." in summary


# --------------------------------------------------------------------------- batch tables and pictures


def test_ctr_histogram_has_an_edge_at_one_half_and_counts_it_left():
    from medseg.inference.predict import ctr_histogram

    counts, edges = ctr_histogram([0.45, 0.5, 0.5000001, 0.62])
    assert 0.5 in edges.tolist()  # exactly, not 0.49999999
    np.testing.assert_allclose(np.diff(edges), 0.025)
    assert edges[0] == pytest.approx(0.2) and edges[-1] == pytest.approx(0.9)
    half = edges.tolist().index(0.5)
    assert counts[half - 1] == 1 and counts[half] == 1  # 0.5 itself is not above 0.5
    assert counts.sum() == 4 and counts.dtype.kind == "i"
    # Values outside 0.2-0.9 widen the range rather than vanish; 0.5 stays an edge.
    counts, edges = ctr_histogram([0.1, 1.3])
    assert edges[0] <= 0.1 and edges[-1] >= 1.3 and counts.sum() == 2 and 0.5 in edges.tolist()


def test_ctr_distribution_whole_scan_counts_and_k_of_n_in_the_title():
    from medseg.inference.predict import ctr_distribution_figure

    table = pd.DataFrame({"case_id": list("abcde"), "ctr": [0.45, 0.5, 0.53, 0.61, float("nan")]})
    fig = ctr_distribution_figure(table)
    ax = fig.axes[0]
    title = ax.get_title()
    assert "2 of 4 scans above 0.5" in title and "1 scan without a CTR" in title
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks  # 1 scan per bin: no 0.2 steps
    bars = [p for p in ax.patches if hasattr(p, "get_data")]  # the histogram's StepPatch
    values, edges = bars[0].get_data()[:2]
    assert 0.5 in edges.tolist() and values.sum() == 4
    assert any(line.get_xdata()[0] == 0.5 for line in ax.get_lines())  # the threshold line
    import matplotlib.pyplot as plt

    plt.close(fig)
    empty = ctr_distribution_figure(pd.DataFrame({"case_id": []}))
    assert "0 of 0 scans above 0.5" in empty.axes[0].get_title()
    plt.close(empty)


def _fake_finished_scans(out: Path, n: int) -> list[str]:
    """``n`` finished scan folders as predict leaves them (prediction.json,
    overlay.png), with full-precision measurements."""
    ids = [f"CASE{i:03d}" for i in range(n)]
    for i, case in enumerate(ids):
        (out / case).mkdir(parents=True)
        Image.fromarray(np.full((40, 30, 3), 20 * (i % 12), dtype=np.uint8)).save(out / case / "overlay.png")
        meta = {"case_id": case, "rows": 40, "cols": 30, "spacing_row_mm": 0.143, "spacing_col_mm": 0.1430000001,
                "area_mm2_heart": 12345.678901, "area_mm2_lungs": 0.04999,
                "ctr": 0.3 + 0.0312345 * i if i else float("nan"),  # the first scan has no CTR
                "heart_width_mm": 101.23456, "thoracic_width_mm": 202.98765, "qc_flags": "low_confidence_heart",
                "seconds": 0.1234567, "labels": ["heart", "lungs"], "settings": {}}
        (out / case / "prediction.json").write_text(json.dumps(meta))
    return ids


def test_results_tables_rounded_prediction_json_full(tmp_path):
    from medseg.inference.predict import write_batch_tables

    ids = _fake_finished_scans(tmp_path, 3)
    table = write_batch_tables(tmp_path, [], ids)
    assert table.loc[1, "ctr"] == pytest.approx(0.3312345)  # returned at full precision
    text = (tmp_path / "results.csv").read_text()
    csv = pd.read_csv(tmp_path / "results.csv")
    assert csv.area_mm2_heart.tolist() == [12345.7] * 3 and csv.area_mm2_lungs.tolist() == [0.0] * 3
    assert csv.heart_width_mm.tolist() == [101.2] * 3 and csv.thoracic_width_mm.tolist() == [203.0] * 3
    assert csv.ctr.tolist()[1:] == [0.3312, 0.3625] and np.isnan(csv.ctr[0])
    assert csv.seconds.tolist() == [0.123] * 3
    assert "0.1430000001" in text and "12345.678901" not in text  # spacing exact, measurements rounded
    # results.parquet holds the same (rounded) table; prediction.json keeps full precision.
    pd.testing.assert_frame_equal(csv, pd.read_parquet(tmp_path / "results.parquet"), check_dtype=False)
    assert json.loads((tmp_path / "CASE001" / "prediction.json").read_text())["ctr"] == 0.3312345
    # Reading the table back (as gather_chunks does with chunk tables) keeps every case ID.
    assert pd.read_csv(tmp_path / "results.csv", dtype={"case_id": str}).case_id.tolist() == ids


def test_overlay_sheet_samples_twelve_and_summary_says_k_of_n(tmp_path):
    from medseg.batch import Failure
    from medseg.inference.predict import overlay_sample, write_batch_tables

    ids = _fake_finished_scans(tmp_path, 15)
    sample = overlay_sample(ids)
    assert len(sample) == 12 and sample[0] == ids[0] and sample[-1] == ids[-1]  # spread over the batch
    assert overlay_sample(ids[:5]) == ids[:5]
    write_batch_tables(tmp_path, [Failure("bad.dcm", "not an image")], ids)
    with Image.open(tmp_path / "overlays.png") as png:
        assert png.width > 400 and png.height > 300
    summary = (tmp_path / "summary.txt").read_text()
    assert "15 scans predicted, 1 input failed" in summary
    # CTRs 0.3 + 0.0312345 i for i = 1..14: above 0.5 from i = 7; CASE000 has none.
    assert "CTR above 0.5 in 8 of 14 scans with a CTR. 1 without one" in summary
    assert "overlays.png shows 12 of 15 scans." in summary
    # Numbers and words only: the report's captions include it as reStructuredText.
    from docutils.core import publish_parts

    html = publish_parts(summary, writer="html", settings_overrides={"report_level": 2, "halt_level": 2})
    assert "12 of 15 scans" in html["body"]


def test_overlay_caption_and_legend_follow_the_ctr():
    from medseg.inference.ctr import HEART_LINE_COLOUR, THORAX_LINE_COLOUR, CtrResult
    from medseg.inference.predict import overlay_caption, overlay_legend
    from medseg.visualise import LABEL_COLOURS

    measured = CtrResult(0.51234, 100.0, 195.2, (30, 10, 40), (20, 2, 60), ["cardiomegaly"])
    assert overlay_caption("JPCLN001", measured, ["cardiomegaly", "low_confidence_heart"]) == [
        "JPCLN001", "CTR 0.512", "QC: cardiomegaly, low_confidence_heart"]
    legend = overlay_legend(["heart", "lungs", "clavicles"], measured)
    assert [(e.name, e.colour, e.line) for e in legend] == [
        ("heart", LABEL_COLOURS["heart"], False), ("lungs", LABEL_COLOURS["lungs"], False),
        ("clavicles", LABEL_COLOURS["clavicles"], False), ("heart width", HEART_LINE_COLOUR, True),
        ("thorax width", THORAX_LINE_COLOUR, True)]
    # Withheld (not a frontal chest): no value, no lines, so no line in the legend either.
    gated = CtrResult(float("nan"), 100.0, 195.2, None, None, [])
    assert overlay_caption("X", gated, ["not_frontal_chest"]) == ["X", "CTR: none", "QC: not_frontal_chest"]
    assert overlay_caption("X", None, []) == ["X", "CTR: none", "QC: no flags"]
    assert [e.name for e in overlay_legend(["heart", "lungs"], gated)] == ["heart", "lungs"]
    # The thorax line is told apart from the clavicle fill, also where it lies over the lungs.
    clavicle_over_lung = 0.65 * (0.65 * 0.5 + 0.35 * np.array(LABEL_COLOURS["lungs"])) + 0.35 * np.array(
        LABEL_COLOURS["clavicles"])
    assert np.abs(np.array(THORAX_LINE_COLOUR) - clavicle_over_lung).max() > 0.5
