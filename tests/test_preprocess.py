"""Folder preprocessing: outputs, manifest, bad inputs, atomic writes, privacy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dicom_factory import PATIENT_ID, PATIENT_NAME, make_dicom, make_sr, synthetic_image
from medseg.atomic import atomic_path
from medseg.nifti import load_nifti_2d
from medseg.preprocessing.geometry import ResizePadGeometry, to_original
from medseg.preprocessing.manifest import MANIFEST_COLUMNS, OPTIONAL_COLUMNS, manifest_fingerprint, read_manifest
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
from medseg.structures import DEFAULT_LABELS, SCR_STRUCTURES, labels_from_fractions, labels_from_packed, unpack_masks


def _masks_for(shape):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    h, w = shape
    return {
        "heart": ((rr - 0.6 * h) / (0.15 * h)) ** 2 + ((cc - 0.55 * w) / (0.15 * w)) ** 2 <= 1,
        "right_lung": (rr > 0.2 * h) & (rr < 0.8 * h) & (cc > 0.1 * w) & (cc < 0.4 * w),
        "left_lung": (rr > 0.2 * h) & (rr < 0.8 * h) & (cc > 0.6 * w) & (cc < 0.9 * w),
        "right_clavicle": (rr > 0.18 * h) & (rr < 0.24 * h) & (cc > 0.1 * w) & (cc < 0.45 * w),
        "left_clavicle": (rr > 0.18 * h) & (rr < 0.24 * h) & (cc > 0.55 * w) & (cc < 0.9 * w),
    }


def write_case(root: Path, case_id: str, shape=(96, 80), mask_shape=None, with_masks=True) -> Path:
    pixels = synthetic_image(*shape)
    path = make_dicom(root / "images" / f"{case_id}.dcm", pixels, pixel_spacing=(0.5, 0.5))
    if with_masks:
        for name, mask in _masks_for(mask_shape or shape).items():
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name / f"{case_id}.gif")
    return path


def _spec(root: Path) -> DatasetSpec:
    return DatasetSpec(images=root / "images", masks_root=root / "masks")


def test_preprocess_writes_images_labels_manifest(tmp_path):
    (tmp_path / "images").mkdir()
    write_case(tmp_path, "A1", shape=(96, 80))
    write_case(tmp_path, "A2", shape=(64, 64))
    out = tmp_path / "out"
    result = preprocess_dataset(_spec(tmp_path), PreprocessSettings(size=48), out)
    assert not result.failures
    manifest = read_manifest(out / "manifest.csv")
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, *OPTIONAL_COLUMNS]
    assert manifest["case_id"].tolist() == ["A1", "A2"]
    row = manifest.iloc[0]
    assert (row.original_rows, row.original_cols) == (96, 80)
    assert (row.resized_rows, row.resized_cols, row.pad_top, row.pad_left) == (48, 40, 0, 4)
    assert row.spacing_source == "PixelSpacing"

    image, spacing = load_nifti_2d(out / row.image)
    assert image.shape == (48, 48) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert spacing == pytest.approx((1.0, 1.0))  # 96 rows at 0.5 mm -> 48 rows at 1 mm
    assert image[:, :4].max() == 0.0  # padding

    packed, _ = load_nifti_2d(out / row.label)
    masks = unpack_masks(packed, row.structures.split("|"))
    # Map the preprocessed labels back: they cover the original masks.
    geometry = ResizePadGeometry.from_record(row.to_dict())
    truth = _masks_for((96, 80))
    for name in SCR_STRUCTURES:
        back = to_original(masks[name][np.newaxis].astype(np.float32), geometry)[0] >= 0.5
        dice = 2 * (back & truth[name]).sum() / (back.sum() + truth[name].sum())
        assert dice > 0.85, name
    # Clavicle overlaps lung in the stored labels (multi-label).
    assert (masks["left_clavicle"] & masks["left_lung"]).any()
    # The partial-volume fractions (soft labels) are the masks before the
    # half-pixel threshold: thresholded they give the stored bits back.
    fractions, fraction_spacing = load_nifti_2d(out / row.label_fractions)
    assert fractions.shape == (48, 48, len(SCR_STRUCTURES)) and fractions.dtype == np.uint8
    assert fraction_spacing == pytest.approx(spacing)
    assert ((fractions > 0) & (fractions < 255)).any()  # boundary pixels are shares
    for index, name in enumerate(row.structures.split("|")):
        assert np.array_equal(fractions[:, :, index] >= 128, masks[name]), name
    assert len(manifest_fingerprint(out / "manifest.csv")) == 64
    # label_fractions came later and derives from the same masks: a manifest
    # with it keeps the fingerprint of one written before it (checkpoints resume).
    pd.read_csv(out / "manifest.csv").drop(columns=["label_fractions"]).to_csv(out / "before.csv", index=False)
    assert manifest_fingerprint(out / "before.csv") == manifest_fingerprint(out / "manifest.csv")
    # spacing_source "given" was called "config": a manifest written since the
    # rename keeps the fingerprint its checkpoints recorded (training resumes).
    frame = pd.read_csv(out / "manifest.csv")
    for source, name in (("config", "old.csv"), ("given", "new.csv"), ("assumed", "other.csv")):
        frame.assign(spacing_source=source).to_csv(out / name, index=False)
    assert manifest_fingerprint(out / "old.csv") == manifest_fingerprint(out / "new.csv")
    assert manifest_fingerprint(out / "old.csv") != manifest_fingerprint(out / "other.csv")


def test_scr_masks_at_half_resolution_are_accepted(tmp_path):
    (tmp_path / "images").mkdir()
    write_case(tmp_path, "B1", shape=(128, 128), mask_shape=(64, 64))
    result = preprocess_dataset(_spec(tmp_path), PreprocessSettings(size=64), tmp_path / "out")
    assert not result.failures and len(result.rows) == 1


def test_bad_inputs_are_listed_and_the_rest_goes_through(tmp_path):
    root = tmp_path
    write_case(root, "GOOD1")
    write_case(root, "GOOD2")
    images = root / "images"
    (images / "notes.txt").write_text("not an image\n")
    good = (images / "GOOD1.dcm").read_bytes()
    (images / "TRUNC.dcm").write_bytes(good[: len(good) // 2])
    make_sr(images / "REPORT.dcm")
    (images / "JPCLN999.IMG").write_bytes(b"\0" * 1000)
    write_case(root, "NOMASK", with_masks=False)
    write_case(root, "BADSIZE", shape=(96, 80), mask_shape=(90, 80))

    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", "preprocess", "--images", str(images), "--masks", str(root / "masks"),
         "--size", "32", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1, proc.stderr
    manifest = read_manifest(out / "manifest.csv")
    assert manifest["case_id"].tolist() == ["GOOD1", "GOOD2"]
    failures = pd.read_csv(out / "failures.csv")
    by_file = {Path(f).name: problem for f, problem in zip(failures.file, failures.problem)}
    assert set(by_file) == {"TRUNC.dcm", "JPCLN999.IMG", "NOMASK.dcm", "BADSIZE.dcm"}
    assert "truncated" in by_file["TRUNC.dcm"].lower()
    # A structured report and a text file found in the folder are not
    # images: skipped and listed, not failures.
    skipped = pd.read_csv(out / "skipped.csv")
    assert [Path(f).name for f in skipped.file] == ["REPORT.dcm", "notes.txt"]
    assert skipped.reason.tolist() == ["not an image: Basic Text SR Storage", "a .txt file"]
    assert "8388608 bytes" in by_file["JPCLN999.IMG"]
    assert "without its mask" in by_file["NOMASK.dcm"]
    assert "does not match" in by_file["BADSIZE.dcm"]
    # The end-of-run summary lists every failure on stderr.
    summary = proc.stderr[proc.stderr.index("4 of 6 inputs failed (2 non-image files skipped"):]
    for name in by_file:
        assert name in summary
    # No temporary files left behind.
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    # Patient fields in the DICOM files reach neither outputs nor logs.
    texts = [proc.stderr, proc.stdout] + [p.read_text() for p in out.glob("*.csv")]
    names = [p.name for p in out.rglob("*")]
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe", "Jane"):
        assert not any(secret in t for t in texts + names)


def test_tolerate_failures_exit_zero(tmp_path):
    write_case(tmp_path, "OK1")
    (tmp_path / "images" / "junk.dcm").write_text("x")  # (a junk.txt would be skipped, not failed)
    cmd = [sys.executable, "-m", "medseg", "-q", "preprocess", "--images", str(tmp_path / "images"),
           "--masks", str(tmp_path / "masks"), "--size", "32", "--out", str(tmp_path / "out"), "--tolerate-failures"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert len(pd.read_csv(tmp_path / "out" / "failures.csv")) == 1


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "manifest.csv"
    target.write_text("old complete content\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old complete content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_same_stem_in_a_subfolder_gets_its_own_case_and_no_borrowed_mask(tmp_path):
    write_case(tmp_path, "DUP")
    (tmp_path / "images" / "sub").mkdir()
    make_dicom(tmp_path / "images" / "sub" / "DUP.dcm", synthetic_image(96, 80))
    result = preprocess_dataset(DatasetSpec(images=tmp_path / "images"), PreprocessSettings(size=32), tmp_path / "o1")
    assert sorted(r["case_id"] for r in result.rows) == ["DUP", "sub_DUP"] and not result.failures
    # masks/<structure>/DUP.gif could be either's: neither takes it.
    result = preprocess_dataset(_spec(tmp_path), PreprocessSettings(size=32), tmp_path / "o2")
    assert not result.rows and len(result.failures) == 2
    assert all("other inputs of this run are called 'DUP' too" in f.problem for f in result.failures)


def test_case_id_from_uid(tmp_path):
    path = make_dicom(tmp_path / "images" / "Doe_Jane.dcm", synthetic_image(64, 64))
    import pydicom

    uid = pydicom.dcmread(path).SOPInstanceUID
    spec = DatasetSpec(images=tmp_path / "images", case_id_from="sop_instance_uid")
    result = preprocess_dataset(spec, PreprocessSettings(size=32), tmp_path / "out")
    assert result.rows[0]["case_id"] == uid
    assert (tmp_path / "out" / "images" / f"{uid}.nii.gz").is_file()


def test_workers_give_same_result(tmp_path):
    for i in range(4):
        write_case(tmp_path, f"W{i}")
    one = preprocess_dataset(_spec(tmp_path), PreprocessSettings(size=32), tmp_path / "o1", workers=1)
    two = preprocess_dataset(_spec(tmp_path), PreprocessSettings(size=32), tmp_path / "o2", workers=2)
    assert [r["case_id"] for r in one.rows] == [r["case_id"] for r in two.rows]
    a, _ = load_nifti_2d(tmp_path / "o1" / "images" / "W3.nii.gz")
    b, _ = load_nifti_2d(tmp_path / "o2" / "images" / "W3.nii.gz")
    assert np.array_equal(a, b)


def test_real_jsrt_png_with_scr_masks(jsrt_root, tmp_path):
    """Two real JSRT PNG cases (white-is-zero) with SCR masks."""
    images = tmp_path / "images"
    images.mkdir()
    for case in ("JPCLN001", "JPCNN001"):
        (images / f"{case}.png").symlink_to(jsrt_root / "images" / f"{case}.png")
    from medseg.ingest import ReadOptions

    spec = DatasetSpec(images=images, masks_root=jsrt_root / "masks",
                       read_options=ReadOptions(invert=True, pixel_spacing_mm=0.35))
    result = preprocess_dataset(spec, PreprocessSettings(size=128), tmp_path / "out")
    assert not result.failures
    row = result.rows[0]
    assert (row["original_rows"], row["scr_fold"]) == (1024, 1)
    image, _ = load_nifti_2d(tmp_path / "out" / row["image"])
    packed, _ = load_nifti_2d(tmp_path / "out" / row["label"])
    masks = unpack_masks(packed, SCR_STRUCTURES)
    lungs = masks["left_lung"] | masks["right_lung"]
    # After inversion the lungs are dark and the heart/mediastinum bright.
    assert image[lungs].mean() + 0.15 < image[masks["heart"]].mean()


def test_soft_labels_keep_the_thin_clavicles_that_thresholding_loses(jsrt_root, tmp_path):
    """At 256 px, masks thresholded at half a pixel cost the SCR clavicles
    ~0.045 Jaccard when scored back at the masks' 1024 px (0.955 over the
    first 40 cases); the stored partial-volume fractions lose ~0.01 (0.989)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "JPCLN001.png").symlink_to(jsrt_root / "images" / "JPCLN001.png")
    from medseg.ingest import ReadOptions

    spec = DatasetSpec(images=images, masks_root=jsrt_root / "masks",
                       read_options=ReadOptions(invert=True, pixel_spacing_mm=0.35))
    out = tmp_path / "out"
    row = preprocess_dataset(spec, PreprocessSettings(size=256), out).rows[0]
    geometry = ResizePadGeometry.from_record(row)
    structures = row["structures"].split("|")
    packed, _ = load_nifti_2d(out / row["label"])
    fractions, _ = load_nifti_2d(out / row["label_fractions"])
    binary = labels_from_packed(packed, structures)
    soft = labels_from_fractions(fractions, structures)
    assert set(np.unique(binary)) <= {0.0, 1.0} and 0 < soft.min() + 1e-6 and len(np.unique(soft)) > 10
    truth = np.zeros((1024, 1024), bool)
    for name in ("left_clavicle", "right_clavicle"):
        truth |= np.asarray(Image.open(jsrt_root / "masks" / name / "JPCLN001.gif")) > 0
    clavicles = list(DEFAULT_LABELS).index("clavicles")

    def jaccard_back(target):
        back = to_original(target[clavicles][np.newaxis], geometry)[0] >= 0.5
        return (back & truth).sum() / (back | truth).sum()

    assert jaccard_back(soft) > 0.98
    assert jaccard_back(soft) > jaccard_back(binary) + 0.02
