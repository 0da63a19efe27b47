"""DICOMweb sources and credentials without a server: what a URL names,
where credentials come from, and that neither leaks into messages."""

from __future__ import annotations

import logging

import pytest

from medseg.dicomweb import (
    ENV_AUTH_FILE, ENV_PASSWORD, ENV_TOKEN, ENV_USER, Connection, DicomWebError, DicomWebSource, Level,
    credentials_from_environment, is_dicomweb_source, make_session, read_auth_file, redact_url,
)
from medseg.ingest.inputs import collect_inputs

ROOT = "https://pacs.example.org:8443/dicom-web"


@pytest.mark.parametrize("url, expected", [
    (f"{ROOT}/studies/1.2.3", DicomWebSource(ROOT, None, study="1.2.3")),
    (f"{ROOT}/studies/1.2.3/series/4.5", DicomWebSource(ROOT, None, study="1.2.3", series="4.5")),
    (f"{ROOT}/studies/1.2.3/series/4.5/instances/6.7",
     DicomWebSource(ROOT, None, study="1.2.3", series="4.5", instance="6.7")),
    (f"{ROOT}/studies?ModalitiesInStudy=CR&StudyDate=20240101-20240131",
     DicomWebSource(ROOT, Level.STUDIES, filters={"ModalitiesInStudy": "CR", "StudyDate": "20240101-20240131"})),
    (f"{ROOT}/series?Modality=DX", DicomWebSource(ROOT, Level.SERIES, filters={"Modality": "DX"})),
    (f"{ROOT}/instances", DicomWebSource(ROOT, Level.INSTANCES)),
    (f"{ROOT}/studies/1.2.3/series?Modality=CR", DicomWebSource(ROOT, Level.SERIES, study="1.2.3",
                                                                filters={"Modality": "CR"})),
    (f"{ROOT}/studies/1.2.3?Modality=CR", DicomWebSource(ROOT, None, study="1.2.3", filters={"Modality": "CR"})),
    ("http://127.0.0.1:8042/studies/9.9", DicomWebSource("http://127.0.0.1:8042", None, study="9.9")),
])
def test_a_source_url_names_its_server_root_and_what_to_read(url, expected):
    assert is_dicomweb_source(url)
    assert DicomWebSource.parse(url) == expected


@pytest.mark.parametrize("url, problem", [
    ("https://alice:secret@pacs/dicom-web/studies/1.2", "never in a URL"),
    ("https://pacs/dicom-web", "names no data"),
    ("https://pacs/dicom-web/studies/1.2/frames/1", "expected <root>/studies"),
    ("ftp://pacs/dicom-web/studies/1.2", "not a DICOMweb URL"),
    ("https://pacs/dicom-web/studies?StudyDate=20240101&limit=10", "limit is not a search filter"),
    ("https://pacs/dicom-web/studies?StudyData=20240101", "StudyData is not a DICOM attribute"),
    ("https://pacs/dicom-web/series?modality=MR", "modality is not a DICOM attribute"),
])
def test_bad_source_urls_are_refused_without_echoing_secrets(url, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        DicomWebSource.parse(url)
    assert "secret" not in str(caught.value)


def test_logs_show_query_keys_not_values():
    """A QIDO query may search by patient: its values never reach a log line."""
    source = DicomWebSource.parse(f"{ROOT}/studies?PatientID=HOSP-12345&PatientName=DOE^JANE")
    assert source.display() == f"{ROOT}/studies?PatientID=...&PatientName=..."
    assert "12345" not in redact_url(f"{ROOT}/studies?PatientID=HOSP-12345")
    assert not is_dicomweb_source("/data/http_export/IM0001.dcm")


def test_credentials_come_from_a_file_before_the_environment(tmp_path):
    auth = tmp_path / "pacs.auth"
    auth.write_text("# reading account\nusername = alice\npassword = s3cr=t\n")
    auth.chmod(0o600)
    env = {ENV_TOKEN: "tok", ENV_AUTH_FILE: str(auth)}
    assert credentials_from_environment(env) == ({"username": "alice", "password": "s3cr=t"}, f"auth file {auth}")
    assert credentials_from_environment({ENV_TOKEN: "tok"})[0] == {"token": "tok"}
    assert credentials_from_environment({ENV_USER: "bob", ENV_PASSWORD: ""})[0] == {"username": "bob", "password": ""}
    assert credentials_from_environment({}) == ({}, "no credentials")
    with pytest.raises(ValueError, match="only one is set"):
        credentials_from_environment({ENV_USER: "bob"})


def test_a_token_is_sent_as_a_bearer_header_and_basic_auth_as_basic():
    assert make_session({"token": "abc"}).headers["Authorization"] == "Bearer abc"
    assert make_session({"username": "u", "password": "p"}).auth == ("u", "p")
    assert "Authorization" not in make_session({}).headers


def test_a_bad_auth_file_is_refused_without_quoting_it(tmp_path, caplog):
    auth = tmp_path / "pacs.auth"
    auth.write_text("user: alice hunter2\n")
    with pytest.raises(ValueError, match="line 1") as caught:
        read_auth_file(auth)
    assert "hunter2" not in str(caught.value)
    auth.write_text("username = alice\n")
    with pytest.raises(ValueError, match="needs"):
        read_auth_file(auth)
    with pytest.raises(ValueError, match="cannot read"):
        read_auth_file(tmp_path / "missing.auth")
    auth.write_text("token = t\n")
    auth.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        credentials_from_environment({}, auth_file=auth)
    assert "readable by other users" in caplog.text


def test_an_unreachable_server_is_given_up_after_a_few_tries():
    """Requests to a server that stopped answering fail at once after three
    in a row: a batch of thousands does not wait once per scan."""
    from medseg.tracking_server import free_port

    connection = Connection(timeout=(2, 2))
    base = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    for _ in range(Connection.give_up_after):
        with pytest.raises(DicomWebError, match="unreachable") as caught:
            connection.call(base, "search for studies", lambda c: c.search_for_studies())
        assert caught.value.unreachable
    with pytest.raises(DicomWebError, match="did not answer 3 requests in a row: not tried"):
        connection.call(base, "search for studies", lambda c: c.search_for_studies())


def test_list_files_carry_dicomweb_instances(tmp_path):
    """`medseg list-inputs` writes an instance's URL where a file's path
    goes; reading the list back gives the same input, case ID and name."""
    url = f"{ROOT}/studies/1.2/series/3.4/instances/5.6.7"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{url}\t5.6.7\t5.6.7\n")
    [entry] = collect_inputs([listing]).files
    assert (entry.url, entry.case_id, entry.name, entry.source) == (url, "5.6.7", "5.6.7", url)
    with pytest.raises(ValueError, match="no connection"):
        collect_inputs([url])
