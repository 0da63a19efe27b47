"""No patient data in any output: every file `medseg predict`, `medseg
evaluate` and the workflow write, and everything they print, is searched for
the phantom DICOMs' patient name, ID and birth date (medseg.phantoms.write:
PatientName "Phantom^Secret<k>", PatientID "SECRETID<5 digits>",
PatientBirthDate "19700101"), in the forms they could take.

DICOM SEG files are the one exception: they belong to the patient's study in
the PACS and must carry its patient module, so they are checked to be SEG
objects of the right patient instead of searched.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from PIL import Image

MEDSEG = [sys.executable, "-m", "medseg"]

# Case-insensitive. Not "secret" alone: MLflow's database has "secrets" tables.
PATIENT_FIELDS = re.compile(
    rb"phantom\s*[\^,]\s*secret"  # Phantom^Secret1, "Phantom, Secret1"
    rb"|secret\s*\^?\s*phantom"  # Secret1 Phantom
    rb"|secret\s*-?\s*id"  # SECRETID00001
    rb"|secret\s*\d"  # Secret1 (the given name on its own)
    rb"|19700101|1970-01-01|1970/01/01|1970\.01\.01|01/01/1970|01\.01\.1970",  # birth date
    re.IGNORECASE,
)
GZIP_MAGIC, DICOM_MAGIC = b"\x1f\x8b", b"DICM"


def _views(name: str, data: bytes, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """The bytes of a file and every decoded form a string could hide in:
    gzip (.nii.gz), zip members (torch .pt, MLflow artifacts), parquet cells,
    PNG text chunks (zTXt/iTXt are compressed)."""
    yield name, data
    if depth > 3:
        return
    if data[:2] == GZIP_MAGIC:
        yield from _views(f"{name} (gunzipped)", gzip.decompress(data), depth + 1)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield from _views(f"{name}!{member}", archive.read(member), depth + 1)
    if data[:4] == b"PAR1":
        frame = pd.read_parquet(io.BytesIO(data))
        yield f"{name} (parquet cells)", (frame.to_csv(index=False) + " ".join(map(str, frame.columns))).encode()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(data)) as img:
            yield f"{name} (PNG text)", repr(img.info).encode()


def find_patient_fields(texts: dict[str, bytes]) -> list[str]:
    """'name: match (context)' for every patient field found in ``texts``."""
    found = []
    for name, data in texts.items():
        for view, content in _views(name, data):
            for match in PATIENT_FIELDS.finditer(content):
                context = content[max(0, match.start() - 40):match.end() + 40]
                found.append(f"{view}: {match.group().decode(errors='replace')!r} in {context!r}")
    return found


def _source_dicom(seg_path: Path, base: Path) -> Path:
    """The scan a seg.dcm was made from, named in its case's prediction.json."""
    source = Path(json.loads((seg_path.parent / "prediction.json").read_text())["source"])
    return source if source.is_absolute() else base / source


def scan_outputs(root: Path, base: Path, skip=lambda path: False) -> tuple[dict[str, bytes], list[Path]]:
    """Every file under ``root`` to search ({relative name: bytes}, the name is
    searched too), and the DICOM SEG files, after checking each is a SEG of
    its source scan's patient. The DICOM SRs (CTR reports) are checked the
    same way and not searched either: both carry the patient by standard.
    ``skip(path)``: inputs that are not outputs."""
    texts: dict[str, bytes] = {}
    segs: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if skip(path):
            continue
        data = path.read_bytes()
        name = str(path.relative_to(root))
        texts[f"file name {name}"] = name.encode()
        if data[128:132] == DICOM_MAGIC:
            ds = pydicom.dcmread(io.BytesIO(data))
            if ds.Modality in ("SEG", "SR"):
                source_path = _source_dicom(path, base)
                if not str(source_path).startswith(("http:/", "https:/")):  # retrieved from a DICOMweb server
                    source = pydicom.dcmread(source_path, stop_before_pixels=True)
                    assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName, name
                    assert ds.StudyInstanceUID == source.StudyInstanceUID, name
                if ds.Modality == "SEG":
                    segs.append(path)
                continue
        texts[name] = data
    return texts, segs


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([*MEDSEG, *map(str, args)], capture_output=True, env=env, timeout=900, check=False,
                          **kwargs)


# --------------------------------------------------------------------------- the search itself


def test_the_search_finds_patient_fields_in_every_form(tmp_path):
    """The search is only as good as what it can see: each form a field could
    take, in each container, is found; ordinary outputs are not flagged."""
    import numpy as np

    from medseg.nifti import save_nifti_2d

    forms = ["Phantom^Secret3", "PHANTOM^SECRET3", "Secret3", "Phantom, Secret3", "SECRETID00003", "secretid00003",
             "19700101", "1970-01-01", "01.01.1970"]
    for form in forms:
        assert find_patient_fields({"text": f"name={form};".encode()}), form
    payload = "Phantom^Secret3 SECRETID00003 19700101"
    files = {
        "prediction.json": json.dumps({"patient": payload}).encode(),
        "labels.nii.gz": gzip.compress(b"header " + payload.encode()),
    }
    pd.DataFrame({"case_id": ["PHANTOM0003"], "name": [payload]}).to_parquet(tmp_path / "t.parquet",
                                                                              compression="snappy")
    files["results.parquet"] = (tmp_path / "t.parquet").read_bytes()
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", payload, zip=True)  # zTXt: compressed
    Image.new("RGB", (4, 4)).save(tmp_path / "o.png", pnginfo=info)
    files["overlay.png"] = (tmp_path / "o.png").read_bytes()
    with zipfile.ZipFile(tmp_path / "m.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", payload)
    files["model.pt"] = (tmp_path / "m.pt").read_bytes()
    save_nifti_2d(tmp_path / "clean.nii.gz", np.zeros((8, 8), np.uint8), (1.0, 1.0))
    for name in ("labels.nii.gz", "overlay.png", "model.pt"):  # compressed: only a decoding search sees it
        assert payload.encode() not in files[name], name
    for name, data in files.items():
        found = find_patient_fields({name: data})
        assert len(found) >= 3, (name, found)  # name, ID and birth date
    # Ordinary outputs: case IDs, the phantom manufacturer, MLflow's "secrets" tables, dates.
    clean = b"PHANTOM0003 medseg phantom CREATE TABLE secrets (secret_id) 20000101 2026-01-01"
    assert find_patient_fields({"clean": clean, "clean.nii.gz": (tmp_path / "clean.nii.gz").read_bytes()}) == []


# --------------------------------------------------------------------------- predict and evaluate


@pytest.fixture(scope="module")
def predicted(model_and_scans, tmp_path_factory) -> dict:
    """`medseg predict` (with DICOM SEG) on the 4 phantom DICOMs, then
    `medseg evaluate` against their masks, logging to an MLflow store."""
    model, scans = model_and_scans
    raw = model.parent.parent / "raw"  # conftest: tmp/model/best.pt, tmp/raw/{images,masks}
    tmp = tmp_path_factory.mktemp("patient-data")
    # The fixture's inputs really carry the fields searched for.
    sources = sorted(scans.glob("*.dcm"))
    assert len(sources) == 4
    for source in sources:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        assert str(ds.PatientName).startswith("Phantom^Secret") and ds.PatientID.startswith("SECRETID")
        assert ds.PatientBirthDate == "19700101"
        assert find_patient_fields({source.name: source.read_bytes()})
    predict = _run("predict", scans, "--model", model, "--out", tmp / "predictions")
    assert predict.returncode == 0, predict.stderr[-3000:]
    evaluate = _run("evaluate", "--predictions", tmp / "predictions", "--truth", raw / "masks",
                    "--tracking-uri", f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}", "--out", tmp / "evaluation",
                    cwd=tmp)
    assert evaluate.returncode in (0, 1), evaluate.stderr[-3000:]  # 1: some case could not be scored
    assert (tmp / "evaluation" / "summary.txt").is_file()
    return {"tmp": tmp, "predict": predict, "evaluate": evaluate, "scans": scans}


def test_predict_outputs_and_messages_hold_no_patient_data(predicted):
    out = predicted["tmp"] / "predictions"
    texts, segs = scan_outputs(out, out)
    cases = sorted(p.stem for p in predicted["scans"].glob("*.dcm"))
    # What was searched: every kind of file predict writes.
    names = set(texts)
    for expected in ("results.csv", "results.parquet", "failures.csv"):
        assert expected in names, sorted(names)
    for case in cases:
        for expected in ("prediction.json", "overlay.png", "labels.nii.gz", "masks/heart.png"):
            assert f"{case}/{expected}" in names, sorted(names)
    assert sorted(p.parent.name for p in segs) == cases  # one SEG per DICOM scan, of its own patient
    assert sorted(p.parent.name for p in out.glob("*/sr.dcm")) == cases  # and one CTR report (SR)
    texts["predict stdout"] = predicted["predict"].stdout
    texts["predict stderr"] = predicted["predict"].stderr
    assert predicted["predict"].stderr  # the log was captured, so it was searched
    found = find_patient_fields(texts)
    assert not found, f"{len(found)} patient fields in outputs:\n" + "\n".join(found)


def test_evaluate_outputs_and_messages_hold_no_patient_data(predicted):
    tmp = predicted["tmp"]
    texts = {}
    for folder in ("evaluation", "mlflow"):
        found, segs = scan_outputs(tmp / folder, tmp)
        assert segs == []
        texts.update({f"{folder}/{name}": data for name, data in found.items()})
    names = set(texts)
    for expected in ("evaluation/cases.csv", "evaluation/summary.csv", "evaluation/summary.txt",
                     "evaluation/boxplots.png", "evaluation/worst_cases.png", "mlflow/mlflow.db"):
        assert expected in names, sorted(names)
    assert any(name.startswith("mlflow/mlartifacts/") for name in names), sorted(names)  # the logged copies
    texts["evaluate stdout"] = predicted["evaluate"].stdout
    texts["evaluate stderr"] = predicted["evaluate"].stderr
    # The comparison line was printed (so stdout was searched); DICOM scans are not JSRT: no published figures.
    assert b"No comparison with published results" in predicted["evaluate"].stdout
    found = find_patient_fields(texts)
    assert not found, f"{len(found)} patient fields in outputs:\n" + "\n".join(found)


# --------------------------------------------------------------------------- the workflow


def assert_workflow_run_holds_no_patient_data(workdir: Path) -> None:
    """Every file of a whole workflow run (results, logs, benchmarks, MLflow
    database and artifacts, Snakemake's own logs and metadata, report.html)
    except the phantom scans themselves, the run's input, holds no patient
    field. Called by tests/test_workflow.py once the report is made."""
    assert (workdir / "report.html").is_file()
    raw_images = {p for p in workdir.glob("results/*/raw/images/*") if p.is_file()}
    for path in raw_images:  # the fake PACS: it has to carry the fields
        assert pydicom.dcmread(path, stop_before_pixels=True).PatientID.startswith("SECRETID"), path
    assert len(raw_images) == 12

    sources = {workdir / name for name in ("Snakefile", "workflow", "config")}  # copies of the checkout

    def skip(path: Path) -> bool:
        return path in raw_images or any(s == path or s in path.parents for s in sources)

    texts, segs = scan_outputs(workdir, workdir, skip)
    names = set(texts)
    assert "results/mlflow.db" in names and any(n.startswith("results/mlartifacts/") for n in names), sorted(names)
    for expected in ("report.html", "results/e2e/logs/train_fold0.log", "results/e2e/predictions/fold0/results.parquet",
                     "results/e2e/evaluation/fold0/summary.txt", "results/e2e/models/summary.json"):
        assert expected in names, sorted(names)
    assert any(name.startswith(".snakemake/log/") for name in names)
    assert len(segs) >= 4  # the held-out scans of both folds, each of its own patient
    found = find_patient_fields(texts)
    assert not found, f"{len(found)} patient fields in outputs:\n" + "\n".join(found)
