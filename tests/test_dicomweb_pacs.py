"""Pull, predict, push against a real PACS: Orthanc with its DICOMweb plugin
(tests/orthanc_server.py), driven through the `medseg` command line.

What a user of a hospital's DICOMweb endpoint relies on: a QIDO-RS search
names the scans, WADO-RS retrieves them, the DICOM SEG and the CTR structured
report (TID 1500) are stored back with STOW-RS referencing their source, a
rerun stores nothing twice, credentials never show in logs, wrong ones fail
at once, and a server that goes away mid-batch leaves a list of what is not
done that a rerun finishes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pandas as pd
import pydicom
import pytest
from cli_runner import run_in_process
from http_stub import stub_server  # noqa: F401 - fixture
from orthanc_server import OrthancServer, orthanc, orthanc_factory  # noqa: F401 - fixtures

from medseg.inference.dicom_sr import read_ctr_report
from medseg.phantoms.write import write_phantom_dataset

SOP_INSTANCE_UID, MODALITY = "00080018", "00080060"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def pacs_scans(tmp_path_factory) -> list[Path]:
    """Six phantom CR scans, each its own patient, study and series (patient
    names "Phantom^Secret<n>", IDs "SECRETID<n>": must never reach a log)."""
    folder = tmp_path_factory.mktemp("pacs-scans")
    write_phantom_dataset(folder, n=6, seed=11, shape=(160, 128), pixel_spacing_mm=1.4)
    files = sorted((folder / "images").glob("*.dcm"))
    assert len(files) == 6
    return files


def _predict_args(model: Path, *inputs, out: Path, extra=()) -> list:
    return ["predict", *inputs, "--out", out, "--model", model, "--backend", "pytorch", "--batch-size", "2",
            *extra]


def _by_modality(server: OrthancServer) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for item in server.dicomweb_client().search_for_instances(fields=["Modality"]):
        found.setdefault(item[MODALITY]["Value"][0], []).append(item)
    return found


def _uids(items: list[dict]) -> list[str]:
    return sorted(item[SOP_INSTANCE_UID]["Value"][0] for item in items)


def _no_patient_data(text: str) -> None:
    assert "Secret" not in text and "SECRETID" not in text


def test_pull_predict_push_then_rerun_stores_nothing_twice(model_and_scans, orthanc, pacs_scans, tmp_path,
                                                           capsys, caplog):
    model, _ = model_and_scans
    orthanc.upload(pacs_scans)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in pacs_scans)}
    out = tmp_path / "out"
    source = f"{orthanc.dicomweb_url}/series?Modality=CR"
    rc, log = run_in_process(_predict_args(model, source, out=out, extra=["--push"]), capsys, caplog)
    assert rc == 0, log[-3000:]
    _no_patient_data(log)
    assert "push 6/6 scans (6 stored, 0 already on the server, 0 failed)" in log

    table = pd.read_csv(out / "results.csv")
    assert sorted(table.input_name) == sorted(sources)
    assert table.dicom_seg.all() and table.dicom_sr.all()
    assert all(s.startswith(orthanc.dicomweb_url + "/studies/") for s in table.source)
    names = [p.name for p in out.rglob("*")]
    _no_patient_data(" ".join(names))
    assert not (out / ".retrieved").exists()  # retrieved copies removed once used

    stored = _by_modality(orthanc)
    assert len(stored["CR"]) == 6 and len(stored["SEG"]) == 6 and len(stored["SR"]) == 6
    client = orthanc.dicomweb_client()
    for row in table.itertuples():
        src = sources[row.input_name]
        record = json.loads((out / row.case_id / "pushed.json").read_text())
        seg_uid, sr_uid = record["sop_instance_uids"]
        assert record["server"] == orthanc.dicomweb_url
        seg = client.retrieve_instance(src.StudyInstanceUID, pydicom.dcmread(out / row.case_id / "seg.dcm")
                                       .SeriesInstanceUID, seg_uid)
        assert seg.SOPClassUID == SEG_STORAGE and seg.StudyInstanceUID == src.StudyInstanceUID
        (referenced,) = seg.ReferencedSeriesSequence
        assert referenced.SeriesInstanceUID == src.SeriesInstanceUID
        assert [i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence] == [src.SOPInstanceUID]

        sr_series = pydicom.dcmread(out / row.case_id / "sr.dcm").SeriesInstanceUID
        sr = client.retrieve_instance(src.StudyInstanceUID, sr_series, sr_uid)
        sr_path = tmp_path / f"{row.case_id}-sr.dcm"
        sr.save_as(sr_path, enforce_file_format=True)
        report = hd.sr.srread(sr_path)  # opens with highdicom as a TID 1500 report
        assert isinstance(report.content, hd.sr.MeasurementReport)
        read = read_ctr_report(sr_path)
        assert read["source_sop_instance_uid"] == src.SOPInstanceUID
        assert read["referenced_seg_sop_instance_uid"] == seg_uid
        evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                    for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
        assert (src.SeriesInstanceUID, src.SOPInstanceUID) in evidence and sr.StudyInstanceUID == src.StudyInstanceUID
        full = json.loads((out / row.case_id / "prediction.json").read_text())
        assert read["ctr"] == pytest.approx(full["ctr"], abs=1e-9)
        assert read["ctr"] == pytest.approx(row.ctr, abs=1e-4) and 0.2 < row.ctr < 0.8
        assert read["heart_width_mm"] == pytest.approx(full["heart_width_mm"], abs=1e-9)
        assert read["thoracic_width_mm"] == pytest.approx(full["thoracic_width_mm"], abs=1e-9)
        assert "|".join(read["qc_flags"]) == (full["qc_flags"] or "")

    # A search without a filter reads the whole archive (with --push it
    # writes into every study): refused unless asked for (second trial).
    rc, log = run_in_process(_predict_args(model, f"{orthanc.dicomweb_url}/studies", out=out, extra=["--push"]),
                             capsys, caplog)
    assert rc == 2 and "has no filter: it reads every image on the server" in log and "--whole-archive" in log
    # A rerun: everything finished and pushed; the server's SEG/SR are medseg's
    # own results, skipped as non-images, not predicted.
    rc, log = run_in_process(_predict_args(model, f"{orthanc.dicomweb_url}/studies", out=out,
                                           extra=["--push", "--whole-archive"]), capsys, caplog)
    assert rc == 0, log[-3000:]
    assert "12 other instance(s) skipped" in log
    assert "push 6/6 scans (0 stored, 6 already on the server, 0 failed)" in log
    assert {k: len(v) for k, v in _by_modality(orthanc).items()} == {"CR": 6, "SEG": 6, "SR": 6}
    # Without pushed.json the server is asked (QIDO-RS) and still nothing is stored twice.
    for record in out.glob("*/pushed.json"):
        record.unlink()
    rc, log = run_in_process(_predict_args(model, source, out=out, extra=["--push"]), capsys, caplog)
    assert rc == 0 and "(0 stored, 6 already on the server, 0 failed)" in log, log[-3000:]
    assert {k: len(v) for k, v in _by_modality(orthanc).items()} == {"CR": 6, "SEG": 6, "SR": 6}
    # Another output folder, same model and settings: the same results are the
    # same instances (UIDs derived from source, model and content), not stored again.
    rc, log = run_in_process(_predict_args(model, source, out=tmp_path / "again", extra=["--push"]), capsys, caplog)
    assert rc == 0 and "(0 stored, 6 already on the server, 0 failed)" in log, log[-3000:]
    assert {k: len(v) for k, v in _by_modality(orthanc).items()} == {"CR": 6, "SEG": 6, "SR": 6}
    # An SR deleted on the server (pushed.json still lists it): asked, not
    # trusted to the record, and stored again.
    lost = json.loads(next(out.glob("*/pushed.json")).read_text())["sop_instance_uids"][1]
    session = orthanc.session()
    [found] = session.post(f"{orthanc.url}/tools/lookup", data=lost, timeout=30).json()
    session.delete(f"{orthanc.url}/instances/{found['ID']}", timeout=30).raise_for_status()
    assert len(_by_modality(orthanc)["SR"]) == 5
    caplog.clear()
    rc, log = run_in_process(_predict_args(model, source, out=out, extra=["--push"]), capsys, caplog)
    assert rc == 0 and "(1 stored, 5 already on the server, 0 failed)" in log, log[-3000:]
    assert {k: len(v) for k, v in _by_modality(orthanc).items()} == {"CR": 6, "SEG": 6, "SR": 6}


def test_credentials_from_env_or_file_wrong_ones_fail_at_once(model_and_scans, orthanc_factory, pacs_scans,
                                                              tmp_path, monkeypatch, capsys, caplog):
    model, _ = model_and_scans
    server = orthanc_factory(users={"alice": "s3cret-pw"})
    server.upload(pacs_scans[:2])
    source = f"{server.dicomweb_url}/studies?ModalitiesInStudy=CR"
    for name in ("MEDSEG_DICOMWEB_AUTH_FILE", "MEDSEG_DICOMWEB_TOKEN", "MEDSEG_DICOMWEB_USER",
                 "MEDSEG_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)

    # No credentials: said what to set.
    out = tmp_path / "none"
    rc, log = run_in_process(_predict_args(model, source, out=out), capsys, caplog)
    assert rc == 2 and "needs credentials (HTTP 401" in log and "MEDSEG_DICOMWEB_TOKEN" in log, log[-2000:]
    # A wrong password: one clear line, before any scan, and no secret in it.
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", "alice")
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "wrong-pw-42")
    out = tmp_path / "wrong"
    rc, log = run_in_process(_predict_args(model, source, out=out), capsys, caplog)
    assert rc == 2, log[-2000:]
    assert log.count("refused the credentials from $MEDSEG_DICOMWEB_USER") == 1, log[-2000:]
    assert "wrong-pw-42" not in log and not (out / "results.csv").exists()
    assert not [p for p in out.glob("*") if p.is_dir()] if out.exists() else True
    # A token the server does not take: named by where it came from, never shown.
    monkeypatch.delenv("MEDSEG_DICOMWEB_USER")
    monkeypatch.delenv("MEDSEG_DICOMWEB_PASSWORD")
    monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "tok-very-secret")
    rc, log = run_in_process(_predict_args(model, source, out=out), capsys, caplog)
    assert rc == 2 and "refused the credentials from $MEDSEG_DICOMWEB_TOKEN" in log, log[-2000:]
    assert "tok-very-secret" not in log
    monkeypatch.delenv("MEDSEG_DICOMWEB_TOKEN")

    # The right password from a file: list-inputs, two chunk jobs that push, gather.
    auth = tmp_path / "pacs.auth"
    auth.write_text("# the PACS account\nusername = alice\npassword = s3cret-pw\n")
    auth.chmod(0o600)
    listing = tmp_path / "inputs.txt"
    rc, log = run_in_process(["list-inputs", source, "--out", listing, "--dicomweb-auth", auth], capsys, caplog)
    assert rc == 0, log[-2000:]
    lines = listing.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith(server.dicomweb_url + "/studies/") for line in lines)
    _no_patient_data(listing.read_text())
    # The list's server with a wrong password, or a --push-url server that is
    # down: said once, before any scan is predicted (the list names no search).
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", "alice")
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "wrong-pw-42")
    out = tmp_path / "early"
    caplog.clear()
    rc, log = run_in_process(_predict_args(model, listing, out=out), capsys, caplog)
    assert rc == 2 and log.count("refused the credentials from $MEDSEG_DICOMWEB_USER") == 1, log[-2000:]
    assert not list(out.glob("*/prediction.json"))
    monkeypatch.delenv("MEDSEG_DICOMWEB_USER")
    monkeypatch.delenv("MEDSEG_DICOMWEB_PASSWORD")
    from medseg.tracking_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    rc, log = run_in_process(_predict_args(model, listing, out=out, extra=[
        "--push-url", dead, "--dicomweb-auth", auth]), capsys, caplog)
    assert rc == 2 and f"DICOMweb server {dead} unreachable" in log, log[-2000:]
    assert not list(out.glob("*/prediction.json"))

    # Results stored on another server with its own account: the auth file's
    # section for it; the PACS account is never sent there (that server would
    # refuse it), nor the research one to the PACS.
    research = orthanc_factory(users={"bob": "b0b-pw"})
    auth.write_text(f"# the PACS account\nusername = alice\npassword = s3cret-pw\n\n[{research.dicomweb_url}]\n"
                    "username = bob\npassword = 'b0b-pw'\n")
    out = tmp_path / "chunked"
    for chunk in ("0/2", "1/2"):
        rc, log = run_in_process(_predict_args(model, listing, out=out, extra=[
            "--chunk", chunk, "--push-url", research.dicomweb_url, "--dicomweb-auth", auth]), capsys, caplog)
        assert rc == 0, log[-3000:]
        assert "s3cret-pw" not in log and "b0b-pw" not in log and "names no server" not in log
    rc, log = run_in_process(["gather-predictions", out, "--chunks", "2"], capsys, caplog)
    assert rc == 0, log[-2000:]
    assert len(pd.read_csv(out / "results.csv")) == 2
    # A section for a server the run does not use (localhost is not 127.0.0.1 to a URL) is said.
    typo = research.dicomweb_url.replace("127.0.0.1", "localhost")
    auth.write_text(f"username = alice\npassword = s3cret-pw\n[{typo}]\ntoken = t\n")
    caplog.clear()
    rc, log = run_in_process(_predict_args(model, listing, out=out, extra=["--dicomweb-auth", auth]), capsys, caplog)
    assert rc == 0 and f"section [{typo}] names no server of this run" in log, log[-2000:]
    stored = _by_modality(research)
    assert len(stored["SEG"]) == 2 and len(stored["SR"]) == 2
    assert set(_by_modality(server)) == {"CR"}


def test_server_gone_mid_batch_lists_scans_not_done_and_rerun_finishes(model_and_scans, orthanc, pacs_scans,
                                                                       tmp_path, monkeypatch, capsys, caplog):
    """Orthanc is stopped while scans are being retrieved, then (second run)
    while results are being stored: each run exits 1 listing what is not
    done; a run with the server back finishes, every SEG and SR stored once."""
    import medseg.inference.push as push_module
    import medseg.ingest.remote as remote_module

    model, _ = model_and_scans
    orthanc.upload(pacs_scans)
    source = f"{orthanc.dicomweb_url}/studies?ModalitiesInStudy=CR"
    out = tmp_path / "out"
    args = _predict_args(model, source, out=out, extra=["--push", "--workers", "1"])

    real_retrieve = remote_module.retrieve
    retrieved = []

    def retrieve_then_stop(connection, entry):
        retrieved.append(entry.name)
        if len(retrieved) == 3:
            orthanc.stop(kill=True)  # the PACS goes away (crashes) after two scans were retrieved
        return real_retrieve(connection, entry)

    monkeypatch.setattr(remote_module, "retrieve", retrieve_then_stop)
    rc, log = run_in_process(args, capsys, caplog)
    monkeypatch.setattr(remote_module, "retrieve", real_retrieve)
    assert rc == 1, log[-3000:]
    failures = pd.read_csv(out / "failures.csv")
    done = {json.loads(p.read_text())["input_name"] for p in out.glob("*/prediction.json")}
    assert len(done) == 2
    assert len(failures) == 6  # 4 not retrieved, 2 predicted but not stored
    assert failures.file.str.startswith(orthanc.dicomweb_url + "/studies/").all()
    assert failures.problem.str.contains("unreachable|stopped answering").all(), failures.problem.tolist()
    assert failures.problem.str.contains("not pushed").sum() == 2
    _no_patient_data(log)
    assert not list((out / ".retrieved").glob("*")) if (out / ".retrieved").exists() else True

    orthanc.start()
    real_push = push_module.push_scan
    pushed = []

    def push_then_stop(connection, base_url, case_dir):
        pushed.append(case_dir)
        if len(pushed) == 3:
            orthanc.stop(kill=True)  # gone again, now while results are being stored
        return real_push(connection, base_url, case_dir)

    monkeypatch.setattr(push_module, "push_scan", push_then_stop)
    rc, log = run_in_process(args, capsys, caplog)  # --workers 1: one push thread, a fixed order
    monkeypatch.setattr(push_module, "push_scan", real_push)
    assert rc == 1, log[-3000:]
    assert len(list(out.glob("*/prediction.json"))) == 6
    failures = pd.read_csv(out / "failures.csv")
    assert len(failures) == 4 and failures.problem.str.contains("not pushed").all(), failures.problem.tolist()
    # Said plainly: most "failed" inputs only await storing (third trial).
    assert "4 of the failed inputs have their results written and only their storing" in log
    assert "4 of those were predicted but not confirmed stored on the DICOMweb" in (out / "summary.txt").read_text()

    orthanc.start()
    assert {k: len(v) for k, v in _by_modality(orthanc).items()} == {"CR": 6, "SEG": 2, "SR": 2}
    # A copy a killed run had retrieved but not yet removed, of a finished scan.
    finished = next(out.glob("*/prediction.json")).parent.name
    (out / ".retrieved").mkdir(exist_ok=True)
    (out / ".retrieved" / f"{finished}.dcm").write_bytes(pacs_scans[0].read_bytes())
    rc, log = run_in_process(args, capsys, caplog)
    assert rc == 0, log[-3000:]
    assert "(4 stored, 2 already on the server, 0 failed)" in log
    stored = _by_modality(orthanc)
    assert {k: len(v) for k, v in stored.items()} == {"CR": 6, "SEG": 6, "SR": 6}
    assert len(set(_uids(stored["SEG"]))) == 6 and len(set(_uids(stored["SR"]))) == 6
    assert len(pd.read_csv(out / "results.csv")) == 6
    assert not (out / "failures.csv").exists() or pd.read_csv(out / "failures.csv").empty
    assert not (out / ".retrieved").exists()
    shutil.rmtree(out)


def test_study_search_that_ignores_offset_is_listed_once(orthanc, pacs_scans):
    """Orthanc 1.10 ignores ``offset`` in a study search by ModalitiesInStudy:
    paging until an empty page (dicomweb-client's get_remaining) never ended.
    Listing stops at a page with nothing new, each instance once."""
    from medseg.dicomweb import Connection, DicomWebSource
    from medseg.ingest.remote import list_instances

    orthanc.upload(pacs_scans[:3])
    client = orthanc.dicomweb_client()
    page = client.search_for_studies(search_filters={"ModalitiesInStudy": "CR"}, offset=3)
    assert len(page) == 3  # the server's quirk this guards against (not a medseg fact)
    files, skipped = list_instances(Connection(), DicomWebSource.parse(
        f"{orthanc.dicomweb_url}/studies?ModalitiesInStudy=CR"))
    assert len(files) == 3 and not skipped
    assert sorted(f.name for f in files) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in pacs_scans[:3])


def test_a_study_uid_that_names_nothing_is_bad_usage_even_beside_good_inputs(orthanc, pacs_scans, tmp_path,
                                                                             capsys, caplog):
    orthanc.upload(pacs_scans[:1])
    good = pydicom.dcmread(pacs_scans[0]).StudyInstanceUID
    listing = tmp_path / "list.txt"
    rc, log = run_in_process(["list-inputs", f"{orthanc.dicomweb_url}/studies/{good}",
                              f"{orthanc.dicomweb_url}/studies/1.2.3.999", "--out", listing], capsys, caplog)
    assert rc == 2 and "studies/1.2.3.999: no such study" in log, log[-2000:]
    assert not listing.exists()
    rc, log = run_in_process(["list-inputs", f"{orthanc.dicomweb_url}/studies/{good}", "--out", listing],
                             capsys, caplog)
    assert rc == 0 and len(listing.read_text().splitlines()) == 1, log[-2000:]


def test_patient_name_wildcards_find_scans_on_orthanc(orthanc, pacs_scans, tmp_path, capsys, caplog):
    """Found by the second fresh-user trial: PatientName=Phantom* found
    nothing on Orthanc (the * went as %2A, which its DICOMweb plugin does
    not decode). ^ must go encoded (RFC 3986), which Orthanc does not match:
    ? stands for it (README)."""
    orthanc.upload(pacs_scans)
    for query, expected in (("series?PatientName=Phantom*", 6), ("studies?PatientName=Phantom?Secret1", 1),
                            ("studies/{study}/instances", 1)):
        if "{study}" in query:
            query = query.format(study=pydicom.dcmread(pacs_scans[0], stop_before_pixels=True).StudyInstanceUID)
        listing = tmp_path / "list.txt"
        rc, log = run_in_process(["list-inputs", f"{orthanc.dicomweb_url}/{query}", "--out", listing], capsys, caplog)
        assert rc == 0, log[-2000:]
        assert len(listing.read_text().splitlines()) == expected, query
        _no_patient_data(log)


def test_ctrl_c_does_not_wait_for_a_server_that_holds_a_retrieve(model_and_scans, tmp_path, stub_server):
    """Found by the second fresh-user trial: Ctrl-C waited for the reads in
    flight, up to the read timeout (60 s), before medseg exited. A DICOMweb
    server that answers searches but never the retrieve (a stalled archive):
    SIGINT during the batch exits 130 at once, saying how to go on."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    study, series = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"
    instances = [{"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [series]},
                  "00080018": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.2{i}"]},
                  "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]}} for i in range(4)]
    release = threading.Event()

    def answer(method, target):
        if "/instances/" in target:  # a retrieve: held until the test ends
            release.wait(120)
            return 503, {}, b""
        first_page = "offset=0" in target or "offset" not in target
        return 200, {"Content-Type": "application/dicom+json"}, json.dumps(instances if first_page else []).encode()

    stub_server["answer"] = answer
    model, _ = model_and_scans
    source = f"{stub_server['url']}/dicom-web/studies/{study}/instances"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_DICOMWEB")}
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "predict", source, "--out", str(tmp_path / "out"),
                             "--model", str(model), "--backend", "pytorch", "--batch-size", "2", "--workers", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stderr:  # until the batch has started (its reads are then held by the server)
            lines.append(line)
            if "predicting 4 file(s)" in line:
                break
        time.sleep(1.0)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        waited = time.monotonic() - interrupted
    finally:
        release.set()
        proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted: the scans finished so far are kept" in log
    assert waited < 10, f"{waited:.1f} s after Ctrl-C"  # the read timeout is 60 s
