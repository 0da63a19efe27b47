"""Every input gets exactly one result or one failure, under its own case ID.

Inputs of the kinds real exports have: the same file name in two site
folders, a DICOM file-set (PS3.10, written by pydicom's FileSet) where every
image is called IM000000 next to a DICOMDIR, non-ASCII file names and names
that differ only in a space. Invariant checked for ingest, preprocess,
predict and the chunked path: result rows + failure rows == inputs, and each
row's outputs come from that row's source.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.fileset import FileSet

from dicom_factory import make_dicom, make_sr, synthetic_image
from medseg.ingest import load_image
from medseg.ingest.inputs import (
    InputFile, assign_case_ids, base_case_id, collect_inputs, is_safe_case_id, lookup_keys,
)
from medseg.nifti import load_nifti_2d
from medseg.preprocessing.manifest import read_manifest
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, canonical_image, preprocess_dataset
from medseg.structures import SCR_STRUCTURES, unpack_masks

MEDSEG = [sys.executable, "-m", "medseg"]


def _run(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MEDSEG, *map(str, args)], capture_output=True, text=True)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def _masks(shape, shift: int) -> dict[str, np.ndarray]:
    """Box masks whose position depends on ``shift``: tells cases apart."""
    h, w = shape
    rr, cc = np.mgrid[:h, :w]
    top = h // 5 + shift
    return {
        "heart": (rr > h // 2 + shift) & (rr < 4 * h // 5) & (cc > w // 3) & (cc < 2 * w // 3),
        "right_lung": (rr > top) & (rr < 4 * h // 5) & (cc > w // 10) & (cc < 2 * w // 5),
        "left_lung": (rr > top) & (rr < 4 * h // 5) & (cc > 3 * w // 5) & (cc < 9 * w // 10),
        "right_clavicle": (rr > top - 4) & (rr < top) & (cc > w // 10) & (cc < w // 2),
        "left_clavicle": (rr > top - 4) & (rr < top) & (cc > w // 2) & (cc < 9 * w // 10),
    }


def _write_masks(root: Path, key: str, masks: dict[str, np.ndarray]) -> None:
    for name, mask in masks.items():
        path = root / name / f"{key}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)


# --------------------------------------------------------------------------- the naming rule


@pytest.mark.parametrize(("name", "expected"), [
    ("JPCLN001.png", "JPCLN001"),
    ("siteA/IM0001.dcm", "siteA_IM0001"),
    ("PT000000/ST000000/SE000000/IM000000", "PT000000_ST000000_SE000000_IM000000"),
    ("1.2.840.113619.2.55.3.4", "1.2.840.113619.2.55.3.4"),  # UID-named file: no extension to strip
    ("case.nii.gz", "case"),
])
def test_readable_names_are_kept(name, expected):
    assert base_case_id(name) == expected


def test_lossy_names_get_a_stable_hash():
    ids = {n: base_case_id(n) for n in ("patient 1.png", "patient_1.png", "胸部.png", "心臓.png", "Müller.dcm")}
    assert ids["patient_1.png"] == "patient_1"
    assert ids["patient 1.png"].startswith("patient_1-") and len(ids["patient 1.png"]) == len("patient_1-") + 8
    assert ids["胸部.png"].startswith("case-") and ids["心臓.png"].startswith("case-")
    assert ids["Müller.dcm"].startswith("Muller-")
    assert len(set(ids.values())) == 5 and all(is_safe_case_id(i) for i in ids.values())
    assert {n: base_case_id(n) for n in ids} == ids  # same name, same ID, every time


def test_assigned_ids_are_unique_stable_and_order_independent():
    names = ["a.png", "a.dcm", "A.png", "x/a.png", "x_a.png", "b c.png", "b_c.png", "b?c.png", "IM1", "im1"]
    files = [InputFile(Path(f"/data/{folder}/{n}"), n) for folder in ("s1", "s2") for n in names]
    ids = [f.case_id for f in assign_case_ids(files)]
    assert len({i.casefold() for i in ids}) == len(files)
    assert all(is_safe_case_id(i) for i in ids)
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    again = {f.path: f.case_id for f in assign_case_ids(shuffled)}
    assert [again[f.path] for f in files] == ids
    # The same name under two folders is told apart by the folders.
    pair = assign_case_ids([InputFile(Path("/d/siteA/IM0001.dcm"), "IM0001.dcm"),
                            InputFile(Path("/d/siteB/IM0001.dcm"), "IM0001.dcm")])
    assert [f.case_id for f in pair] == ["siteA_IM0001", "siteB_IM0001"]


def test_mask_keys_shared_by_two_inputs_are_never_used():
    files = assign_case_ids([InputFile(Path("/d/siteA/IM1.dcm"), "siteA/IM1.dcm"),
                             InputFile(Path("/d/siteB/IM1.dcm"), "siteB/IM1.dcm"),
                             InputFile(Path("/d/solo.dcm"), "solo.dcm")])
    assert lookup_keys(files) == [("siteA/IM1", "siteA_IM1"), ("siteB/IM1", "siteB_IM1"), ("solo",)]


# --------------------------------------------------------------------------- preprocess


def _two_sites(root: Path) -> dict[str, Path]:
    """siteA/IM0001.dcm and siteB/IM0001.dcm: different pixels and shapes."""
    a = make_dicom(root / "images" / "siteA" / "IM0001.dcm", synthetic_image(96, 80), pixel_spacing=(0.5, 0.5))
    b = make_dicom(root / "images" / "siteB" / "IM0001.dcm", synthetic_image(80, 96)[::-1].copy(),
                   pixel_spacing=(0.6, 0.6))
    return {"siteA": a, "siteB": b}


def _assert_rows_match_sources(out: Path, spec: DatasetSpec, size: int) -> pd.DataFrame:
    """Each manifest row's image NIfTI holds its own source's pixels."""
    manifest = read_manifest(out / "manifest.csv")
    for row in manifest.itertuples():
        _, _, expected = canonical_image(load_image(row.source, spec.read_options), size)
        stored, _ = load_nifti_2d(out / row.image)
        np.testing.assert_allclose(stored, expected[0], atol=1e-6, err_msg=row.case_id)
    return manifest


def test_preprocess_same_name_in_two_folders_with_mirrored_masks(tmp_path):
    sources = _two_sites(tmp_path)
    shapes = {"siteA": (96, 80), "siteB": (80, 96)}
    for site, shift in (("siteA", 0), ("siteB", 8)):
        _write_masks(tmp_path / "masks", f"{site}/IM0001", _masks(shapes[site], shift))
    spec = DatasetSpec(tmp_path / "images", tmp_path / "masks")
    result = preprocess_dataset(spec, PreprocessSettings(size=32), tmp_path / "out")
    assert len(result.rows) + len(result.failures) == 2 and not result.failures
    manifest = _assert_rows_match_sources(tmp_path / "out", spec, 32)
    assert manifest.case_id.tolist() == ["siteA_IM0001", "siteB_IM0001"]
    assert manifest.input_name.tolist() == ["siteA/IM0001.dcm", "siteB/IM0001.dcm"]
    assert [Path(s) for s in manifest.source] == [sources["siteA"].resolve(), sources["siteB"].resolve()]
    # Each label file comes from its own site's masks.
    from medseg.preprocessing.geometry import ResizePadGeometry, to_preprocessed

    for row, (site, shift) in zip(manifest.itertuples(), (("siteA", 0), ("siteB", 8))):
        packed, _ = load_nifti_2d(tmp_path / "out" / row.label)
        masks = _masks(shapes[site], shift)
        geometry = ResizePadGeometry.fit(shapes[site], (0.5, 0.5) if site == "siteA" else (0.6, 0.6), 32)
        expected = to_preprocessed(np.stack([masks[s] for s in SCR_STRUCTURES]).astype(np.float32), geometry) >= 0.5
        got = unpack_masks(packed, SCR_STRUCTURES)
        for index, name in enumerate(SCR_STRUCTURES):
            assert np.array_equal(got[name], expected[index]), (site, name)


def test_preprocess_ambiguous_flat_masks_are_refused_not_mispaired(tmp_path):
    _two_sites(tmp_path)
    _write_masks(tmp_path / "masks", "IM0001", _masks((96, 80), 0))  # whose is it?
    result = preprocess_dataset(DatasetSpec(tmp_path / "images", tmp_path / "masks"), PreprocessSettings(size=32),
                                tmp_path / "out")
    assert not result.rows and len(result.failures) == 2
    assert all("other inputs of this run are called 'IM0001' too" in f.problem for f in result.failures)
    assert {Path(f.file).parent.name for f in result.failures} == {"siteA", "siteB"}


def _unicode_pngs(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = ["胸部.png", "心臓.png", "patient 1.png", "patient_1.png"]
    for k, name in enumerate(names):
        pixels = (np.arange(48 * 40).reshape(48, 40) * (k + 1) % 251).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return names


def test_preprocess_collapsing_file_names_keep_every_input(tmp_path):
    names = _unicode_pngs(tmp_path / "images")
    spec = DatasetSpec(tmp_path / "images")
    result = preprocess_dataset(spec, PreprocessSettings(size=32), tmp_path / "out")
    assert len(result.rows) == len(names) and not result.failures
    manifest = _assert_rows_match_sources(tmp_path / "out", spec, 32)
    assert sorted(manifest.input_name) == sorted(names)
    assert len(set(manifest.case_id)) == 4 and "patient_1" in set(manifest.case_id)
    # Rerun: the same IDs.
    again = preprocess_dataset(spec, PreprocessSettings(size=32), tmp_path / "again")
    assert sorted(r["case_id"] for r in again.rows) == sorted(manifest.case_id)


# --------------------------------------------------------------------------- DICOM file-set (PACS / CD export)


def _write_fileset(root: Path, tmp: Path) -> list[str]:
    """A PS3.10 file-set written by pydicom: 2 patients x 2 series, each image
    stored as PT*/ST*/SE*/IM000000 beside a DICOMDIR; returns the SOP Instance UIDs."""
    fs = FileSet()
    uids = []
    for patient in range(2):
        for series in range(2):
            shape = (64 + 16 * patient, 48 + 16 * series)  # each scan its own shape
            path = make_dicom(tmp / f"p{patient}s{series}.dcm", synthetic_image(*shape), modality="CR",
                              patient_id=f"PID{patient}", patient_name=f"Name^{patient}")
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(patient)])
            ds.SeriesNumber = series + 1
            ds.InstanceNumber = 1
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "120000", "1", ""
            fs.add(ds)
            uids.append(str(ds.SOPInstanceUID))
    fs.write(root)
    return uids


def test_dicom_fileset_every_image_once_dicomdir_skipped(model_and_scans, tmp_path):
    model, _ = model_and_scans
    export = tmp_path / "export"
    uids = _write_fileset(export, tmp_path)
    images = [p for p in export.rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(images) == 4 and len({p.name for p in images}) == 1  # every image has the same name
    make_sr(export / "PT000000" / "SR0001")  # another non-image object in the walk

    listed = collect_inputs([export])
    assert len(listed.files) == 4 and len(listed.skipped) == 2
    assert {Path(s.file).name for s in listed.skipped} == {"DICOMDIR", "SR0001"}
    assert any("DICOMDIR" in s.reason for s in listed.skipped)

    out = tmp_path / "pred"
    proc = _run("predict", export, "--model", model, "--out", out, "--no-seg", "--batch-size", "1")
    assert "DICOMDIR" in proc.stderr and "skipped" in proc.stderr and "corrupt" not in proc.stderr
    table = pd.read_csv(out / "results.csv")
    failures = pd.read_csv(out / "failures.csv")
    assert len(table) + len(failures) == 4 and failures.empty
    assert table.case_id.is_unique
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(Path(f).name for f in skipped.file) == ["DICOMDIR", "SR0001"]
    for row in table.itertuples():  # each row's geometry is its own source's
        ds = pydicom.dcmread(row.source, stop_before_pixels=True)
        assert (row.rows, row.cols) == (ds.Rows, ds.Columns)
        meta = json.loads((out / row.case_id / "prediction.json").read_text())
        assert meta["source"] == row.source
    # By SOP Instance UID: the same four scans, named by their UIDs.
    by_uid = tmp_path / "by-uid"
    _run("predict", export, "--model", model, "--out", by_uid, "--no-seg", "--case-id-from", "sop_instance_uid")
    assert sorted(pd.read_csv(by_uid / "results.csv", dtype={"case_id": str}).case_id) == sorted(uids)
    # Named explicitly, a DICOMDIR or SR is a failure (exit 1), not a skip.
    explicit = _run("predict", export / "DICOMDIR", export / "PT000000" / "SR0001", images[0], "--model", model,
                    "--out", tmp_path / "explicit", "--no-seg", check_rc=1)
    assert "2 of 3 inputs failed" in explicit.stderr
    # preprocess sees the same four.
    result = preprocess_dataset(DatasetSpec(export), PreprocessSettings(size=32), tmp_path / "pre")
    assert len(result.rows) == 4 and not result.failures and len(result.skipped) == 2


# --------------------------------------------------------------------------- predict, ingest, chunks


def _collision_inputs(root: Path, scans: Path) -> Path:
    """siteA/IM0001.dcm, siteB/IM0001.dcm (different shapes) + 4 PNGs whose
    names collapse when sanitised: 6 inputs."""
    phantoms = sorted(scans.iterdir())
    for site, source, flip in (("siteA", phantoms[0], False), ("siteB", phantoms[1], True)):
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array[:, ::-1] if flip else ds.pixel_array
        pixels = pixels[: pixels.shape[0] - 16] if flip else pixels  # a different shape per site
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.Rows, ds.Columns = pixels.shape
        (root / site).mkdir(parents=True, exist_ok=True)
        ds.save_as(root / site / "IM0001.dcm")
    _unicode_pngs(root / "png")
    return root


def _check_table(out: Path, n_inputs: int) -> pd.DataFrame:
    table = pd.read_csv(out / "results.csv", dtype={"case_id": str})
    failures = pd.read_csv(out / "failures.csv")
    assert len(table) + len(failures) == n_inputs, (table.case_id.tolist(), failures.to_dict("records"))
    assert table.case_id.is_unique and table.source.is_unique
    for row in table.itertuples():
        image = load_image(row.source)
        assert (row.rows, row.cols) == image.shape, row.case_id
        meta = json.loads((out / row.case_id / "prediction.json").read_text())
        assert meta["source"] == row.source and meta["case_id"] == row.case_id
        with Image.open(out / row.case_id / "masks" / "heart.png") as png:
            assert png.size == (image.shape[1], image.shape[0])
    return table


def test_predict_same_names_each_scan_once_batch_size_1(model_and_scans, tmp_path):
    model, scans = model_and_scans
    inputs = _collision_inputs(tmp_path / "in", scans)
    out = tmp_path / "out"
    proc = _run("predict", inputs, "--model", model, "--out", out, "--batch-size", "1", "--no-seg")
    assert "all 6 inputs succeeded" in proc.stderr
    table = _check_table(out, 6)
    assert {"siteA_IM0001", "siteB_IM0001", "png_patient_1"} <= set(table.case_id)
    # Rerun: every scan already done, nothing is paired with another's results.
    rerun = _run("predict", inputs, "--model", model, "--out", out, "--batch-size", "1", "--no-seg")
    assert "6 already done" in rerun.stderr
    assert _check_table(out, 6).case_id.tolist() == table.case_id.tolist()
    # Two files given on their own with the same name: two results.
    pair = tmp_path / "pair"
    _run("predict", inputs / "siteA" / "IM0001.dcm", inputs / "siteB" / "IM0001.dcm", "--model", model,
         "--out", pair, "--no-seg")
    assert sorted(_check_table(pair, 2).case_id) == ["siteA_IM0001", "siteB_IM0001"]


def test_chunked_predict_keeps_whole_batch_ids(model_and_scans, tmp_path):
    model, scans = model_and_scans
    inputs = _collision_inputs(tmp_path / "in", scans)
    broken = inputs / "broken.dcm"
    broken.write_bytes(b"DICM but not really")
    listing = tmp_path / "inputs.txt"
    _run("list-inputs", inputs, "--out", listing)
    lines = listing.read_text().splitlines()
    assert len(lines) == 7 and all(len(line.split("\t")) == 3 for line in lines)
    out = tmp_path / "chunked"
    for index in range(2):
        _run("predict", listing, "--model", model, "--out", out, "--no-seg", "--chunk", f"{index}/2", check_rc=None)
    _run("gather-predictions", out, "--chunks", 2)
    table = _check_table(out, 7)
    assert len(table) == 6
    # The IDs an unsplit run over the folder gives (collision-resolved over
    # the whole batch, not per chunk).
    whole = {f.case_id for f in collect_inputs([inputs]).files if f.path.name != "broken.dcm"}
    assert set(table.case_id) == whole and {"siteA_IM0001", "siteB_IM0001"} <= whole


def test_ingest_prints_one_line_per_input(tmp_path):
    names = _unicode_pngs(tmp_path / "png")
    make_dicom(tmp_path / "siteA" / "IM0001.dcm", synthetic_image(32, 32))
    make_dicom(tmp_path / "siteB" / "IM0001.dcm", synthetic_image(32, 40))
    proc = _run("ingest", tmp_path)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == len(names) + 2
    assert len({r["case_id"] for r in records}) == len(records)
    assert {r["input_name"] for r in records} >= {"siteA/IM0001.dcm", "siteB/IM0001.dcm", "png/胸部.png"}


def test_list_file_with_unsafe_or_repeated_case_ids_is_bad_usage(tmp_path):
    a = make_dicom(tmp_path / "a.dcm", synthetic_image(32, 32))
    b = make_dicom(tmp_path / "b.dcm", synthetic_image(32, 32))
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{a}\tsame\n{b}\tsame\n")
    proc = _run("list-inputs", bad, "--out", tmp_path / "x.txt", check_rc=2)
    assert "same" in proc.stderr and "more than one file" in proc.stderr
    bad.write_text(f"{a}\t../escape\n")
    assert "is not usable" in _run("ingest", bad, check_rc=2).stderr


# --------------------------------------------------------------------------- evaluate


def _hand_prediction(pred_dir: Path, case_id: str, source: str, name: str, masks: dict[str, np.ndarray]) -> None:
    """A prediction folder as `medseg predict` writes it (labels = SCR groups)."""
    from medseg.nifti import save_nifti_2d
    from medseg.structures import DEFAULT_LABELS, label_masks

    labels = label_masks(masks, DEFAULT_LABELS)
    case = pred_dir / case_id
    case.mkdir(parents=True)
    save_nifti_2d(case / "labels.nii.gz", np.stack(list(labels.values()), axis=-1).astype(np.uint8), (0.5, 0.5))
    (case / "prediction.json").write_text(json.dumps({
        "case_id": case_id, "labels": list(labels), "source": source, "input_name": name,
        "spacing_mm": [0.5, 0.5], "original_shape": list(next(iter(masks.values())).shape)}))


def test_evaluate_pairs_same_named_cases_with_their_own_truth(tmp_path):
    shape = (64, 64)
    truth = {"siteA": _masks(shape, 0), "siteB": _masks(shape, 10)}
    preds = tmp_path / "pred"
    for site, masks in truth.items():
        _write_masks(tmp_path / "mirrored", f"{site}/IM0001", masks)
        _hand_prediction(preds, f"{site}_IM0001", f"/data/{site}/IM0001.dcm", f"{site}/IM0001.dcm", masks)
    proc = _run("evaluate", "--predictions", preds, "--truth", tmp_path / "mirrored", "--out", tmp_path / "eval",
                "--no-mlflow")
    cases = pd.read_csv(tmp_path / "eval" / "cases.csv")
    assert sorted(set(cases.case_id)) == ["siteA_IM0001", "siteB_IM0001"]
    assert (cases.dice == 1.0).all(), proc.stderr  # swapped truth would score far lower
    # Flat truth named after the shared file name: neither case takes it.
    from medseg.evaluation.evaluate import evaluate_predictions

    _write_masks(tmp_path / "flat", "IM0001", truth["siteA"])
    table, problems = evaluate_predictions(preds, tmp_path / "flat")
    assert table.empty and [case for case, _ in problems] == ["siteA_IM0001", "siteB_IM0001"]
    assert all("other inputs of this run are called 'IM0001' too" in problem for _, problem in problems)


def test_two_runs_with_same_names_into_one_folder_never_share_results(model_and_scans, tmp_path):
    """`predict siteA/` then `predict siteB/` into the same --out: both name
    their scan IM0001; the second must not be taken as already done."""
    model, scans = model_and_scans
    inputs = _collision_inputs(tmp_path / "in", scans)
    out = tmp_path / "out"
    _run("predict", inputs / "siteA", "--model", model, "--out", out, "--no-seg")
    proc = _run("predict", inputs / "siteB", "--model", model, "--out", out, "--no-seg", check_rc=1)
    assert "0 already done, 1 failed" in proc.stderr
    failures = pd.read_csv(out / "failures.csv")
    assert [Path(f) for f in failures.file] == [inputs / "siteB" / "IM0001.dcm"]
    assert "holds the results of" in failures.problem[0] and "siteA" in failures.problem[0]
    assert pd.read_csv(out / "results.csv").empty


def test_long_output_like_and_nested_names(tmp_path):
    long_name = "y" * 245 + " z.png"  # legal (251 bytes) but too long with a hash and suffixes
    files = [InputFile(Path("/d") / long_name, long_name), InputFile(Path("/d/failures.csv.png"), "failures.csv.png"),
             InputFile(Path("/X1/sub/IM0002"), "sub/IM0002"), InputFile(Path("/X2/sub/IM0002"), "sub/IM0002")]
    ids = [f.case_id for f in assign_case_ids(files)]
    assert len(ids[0]) == 120 and ids[0].startswith("y" * 100)
    assert ids[1].startswith("failures.csv-")  # never the batch's own failures.csv
    assert ids[2:] == ["X1_sub_IM0002", "X2_sub_IM0002"]
    assert all(is_safe_case_id(i) for i in ids)


def test_rerun_reuses_results_only_for_the_same_file_model_and_settings(model_and_scans, tmp_path):
    """Resume keys on the file as it is and on how it was predicted; the
    --out folder inside the input folder is not read back as input; odd
    files get one result or one clear failure each."""
    model, scans = model_and_scans
    inputs = tmp_path / "in"
    inputs.mkdir()
    phantoms = sorted(scans.iterdir())
    (inputs / "y.dcm").write_bytes(phantoms[0].read_bytes())
    no_uid = pydicom.dcmread(phantoms[1])
    del no_uid.SOPInstanceUID
    no_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    no_uid.save_as(inputs / "no_uid.dcm")
    (inputs / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((64, 48), 90, np.uint8)).save(inputs / ("y" * 245 + " z.png"))
    out = inputs / "out"  # inside the input folder, as `predict . --out out` makes it
    first = _run("predict", inputs, "--model", model, "--out", out, check_rc=1)
    assert "no DICOM SEG written" in first.stderr  # the scan without a SOP Instance UID still gets its masks
    assert "empty file (0 bytes)" in pd.read_csv(out / "failures.csv").problem[0]
    table = _check_table(out, 4)
    assert len(table) == 3 and table.set_index("case_id").at["no_uid", "dicom_seg"] == False  # noqa: E712
    second = _run("predict", inputs, "--model", model, "--out", out, check_rc=1)
    assert "3 already done" in second.stderr and "4 scans" in second.stderr  # out/ not read as input
    # The same path now holds another scan: predicted again, not reused.
    (inputs / "y.dcm").write_bytes(phantoms[2].read_bytes())
    third = _run("predict", inputs, "--model", model, "--out", out, "--no-seg", check_rc=1)
    assert "predict y.dcm again" in third.stderr
    meta = json.loads((out / "y" / "prediction.json").read_text())
    assert meta["source_bytes"] == len(phantoms[2].read_bytes())
    assert pydicom.dcmread(phantoms[2]).Rows == meta["original_shape"][0]
    # Other settings: predicted again too.
    fourth = _run("predict", inputs, "--model", model, "--out", out, "--no-seg", "--threshold", "0.6", check_rc=1)
    assert "0 already done" in fourth.stderr
    _check_table(out, 4)
    # Other weights behind the same model path: predicted again.
    import torch

    changed = tmp_path / "model" / "best.pt"
    changed.parent.mkdir()
    state = torch.load(model, map_location="cpu", weights_only=False)
    state["model"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, changed)
    _run("predict", inputs, "--model", changed, "--out", out, "--no-seg", "--threshold", "0.6", check_rc=1)
    state["model"] = {k: v * 2 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, changed)
    fifth = _run("predict", inputs, "--model", changed, "--out", out, "--no-seg", "--threshold", "0.6", check_rc=1)
    assert "0 already done" in fifth.stderr
    # A later run with another --out does not read this one's outputs (inside the input folder).
    other = _run("predict", inputs, "--model", changed, "--out", tmp_path / "other", "--no-seg", check_rc=1)
    assert f"not read: {out} holds medseg outputs" in other.stderr
    _check_table(tmp_path / "other", 4)


def test_bad_usage_is_exit_2(model_and_scans, tmp_path):
    model, scans = model_and_scans
    assert "between 0 and 1" in _run("predict", scans, "--model", model, "--out", tmp_path / "o", "--threshold",
                                     "2", check_rc=2).stderr
    (tmp_path / "file").write_text("x")
    assert "is a file" in _run("predict", scans, "--model", model, "--out", tmp_path / "file", check_rc=2).stderr
    assert "is an input folder" in _run("predict", scans, "--model", model, "--out", scans, check_rc=2).stderr
    # A path no list line can hold is refused by name; the others are listed.
    (tmp_path / "in").mkdir()
    for name in ("a\ttab.png", "plain.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / name)
    proc = _run("list-inputs", tmp_path / "in", "--out", tmp_path / "list.txt", check_rc=1)
    assert "a\ttab.png: cannot be listed" in proc.stderr
    assert [line.split("\t")[1] for line in (tmp_path / "list.txt").read_text().splitlines()] == ["plain"]


def test_dicomdir_named_explicitly_says_what_it_is(tmp_path):
    _write_fileset(tmp_path / "export", tmp_path)
    proc = _run("ingest", tmp_path / "export" / "DICOMDIR", check_rc=1)
    assert "not an image: DICOMDIR" in proc.stderr and "corrupt" not in proc.stderr
