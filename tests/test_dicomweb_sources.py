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
from http_stub import stub_server  # noqa: F401 - fixture

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
    (f"{ROOT}/studies/1.2.3/instances", DicomWebSource(ROOT, Level.INSTANCES, study="1.2.3")),  # PS3.18 10.6
    ("http://127.0.0.1:8042/studies/9.9", DicomWebSource("http://127.0.0.1:8042", None, study="9.9")),
])
def test_a_source_url_names_its_server_root_and_what_to_read(url, expected):
    assert is_dicomweb_source(url)
    assert DicomWebSource.parse(url) == expected


@pytest.mark.parametrize("url, problem", [
    ("https://alice:secret@pacs/dicom-web/studies/1.2", "never in a URL"),
    ("https://pacs/dicom-web/series?Modality=", "Modality has no value"),
    ("https://pacs/dicom-web/studies?StudyDate=%20&ModalitiesInStudy=CR", "StudyDate has no value"),
    ("https://pacs/dicom-web", "names no data"),
    ("https://pacs/dicom-web/studies/1.2/frames/1", "expected <root>/studies"),
    ("ftp://pacs/dicom-web/studies/1.2", "not a DICOMweb URL"),
    ("https://pacs/dicom-web/studies?StudyDate=20240101&limit=10", "limit is not a search filter"),
    ("https://pacs/dicom-web/studies?StudyData=20240101", "StudyData is not a DICOM attribute"),
    ("https://pacs/dicom-web/series?modality=MR", "modality is not a DICOM attribute"),
    # Third fresh-user trial: each of these reached the server, or echoed a
    # patient ID, or searched for the last of two values only.
    ("http://127.0.0.1:99999/dicom-web/studies/1.2", "http://127.0.0.1:99999/...: not a valid port"),
    ("https://pacs/dicom-web/studies/SECRETID00001", "the studies segment is not a DICOM UID"),
    ("https://pacs/dicom-web/studies/1.2/series/SECRET-9/instances/3.4", "the series segment is not a DICOM UID"),
    ("https://pacs/dicom-web/studies;PatientID=SECRETID00001", "';' in the path"),
    ("https://pacs/dicom-web/studies?SECRETID00001", "every query part is key=value"),
    ("https://pacs/dicom-web/studies?ModalitiesInStudy=CR&ModalitiesInStudy=DX",
     "ModalitiesInStudy is given more than once"),
    ("https://pacs/dicom-web/studies?PatientBirthDate=1970-01-01", "PatientBirthDate: a date is YYYYMMDD"),
    # Fourth trial: a month 13, a range backwards, a key as keyword and tag.
    ("https://pacs/dicom-web/studies?StudyDate=20261315", "StudyDate: a date is YYYYMMDD \\(a real one\\)"),
    ("https://pacs/dicom-web/studies?StudyDate=20260131-20260101", "StudyDate: a date is"),
    ("https://pacs/dicom-web/studies?PatientName=A*&00100010=B", "PatientName is given more than once"),
])
def test_bad_source_urls_are_refused_without_echoing_secrets(url, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        DicomWebSource.parse(url)
    assert "secret" not in str(caught.value).lower() and "1970" not in str(caught.value)


def test_dates_and_ranges_are_accepted():
    for value in ("20240101", "20240101-20240131", "20240101-", "-20240131", "20240229"):
        assert DicomWebSource.parse(f"{ROOT}/studies?StudyDate={value}").filters == {"StudyDate": value}


def test_filters_a_server_need_not_match_are_named():
    """A server ignores a filter it does not match (Orthanc: PixelData): the
    search reads more than meant; medseg names such keys (PS3.18 10.6.1.2.3)."""
    assert DicomWebSource.parse(f"{ROOT}/studies?PixelData=X&ModalitiesInStudy=CR").optional_filters == ["PixelData"]
    assert DicomWebSource.parse(f"{ROOT}/series?Modality=CR&00100020=X&StudyDate=20240101").optional_filters == []


def test_a_list_file_line_must_be_an_instance_url(tmp_path):
    """Third fresh-user trial: a study or search URL in a list file was taken
    for one instance, failed at retrieval and put the query (a patient name)
    into the log and failures.csv."""
    listing = tmp_path / "list.txt"
    for line in (f"{ROOT}/studies?PatientName=Phantom?Secret1", f"{ROOT}/studies/1.2",
                 f"{ROOT}/studies/1.2/series/3.4", f"{ROOT}/studies/SECRETID1/series/3.4/instances/5.6",
                 f"{ROOT}/studies/1.2/series/3.4/instances/5.6?PatientID=SECRETID1",
                 f"{ROOT}/studies/1.2/series/3.4/instances/5.6#SECRETID1"):
        listing.write_text(f"{ROOT}/studies/1.2/series/3.4/instances/5.6\n{line}\n")
        with pytest.raises(ValueError, match=r"list.txt:2: ") as caught:
            collect_inputs([listing], remote=lambda text: ([], []))
        assert "Secret" not in str(caught.value) and "SECRETID" not in str(caught.value)
    # Fourth trial: a mistyped URL line was taken for a path (its query, a
    # patient ID, echoed as "file not found"), also as a list's only line;
    # a BOM (Notepad) made the first URL a path.
    for line in ("http:/pacs/dicom-web/studies?PatientID=SECRETID1", "HTTPS//pacs/x", "ftp://pacs/x",
                 "pacs:8042/dicom-web/studies?PatientID=SECRETID1"):
        for content in (f"{line}\n", f"{ROOT}/studies/1.2/series/3.4/instances/5.6\n{line}\n"):
            listing.write_text(content)
            with pytest.raises(ValueError, match=r"list.txt:\d: .*(mistyped URL|not ftp://)") as caught:
                collect_inputs([listing], remote=lambda text: ([], []))
            assert "SECRETID" not in str(caught.value)
    listing.write_bytes(f"\ufeff{ROOT}/studies/1.2/series/3.4/instances/5.6\r\n".encode())
    [entry] = collect_inputs([listing], remote=lambda text: ([], [])).files
    assert entry.url == f"{ROOT}/studies/1.2/series/3.4/instances/5.6"


def test_a_search_without_filter_or_study_is_the_whole_archive():
    assert DicomWebSource.parse(f"{ROOT}/studies").whole_archive
    assert DicomWebSource.parse(f"{ROOT}/series/").whole_archive
    assert DicomWebSource.parse(f"{ROOT}/instances").whole_archive
    for narrower in ("series?Modality=CR", "studies/1.2/series", "studies/1.2/instances", "studies/1.2"):
        assert not DicomWebSource.parse(f"{ROOT}/{narrower}").whole_archive, narrower


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
    assert credentials_from_environment(env) == ({"": {"username": "alice", "password": "s3cr=t"}},
                                                 f"auth file {auth}")
    assert credentials_from_environment({ENV_TOKEN: "tok"})[0] == {"": {"token": "tok"}}
    assert credentials_from_environment({ENV_USER: "bob", ENV_PASSWORD: ""})[0] == {
        "": {"username": "bob", "password": ""}}
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
    # Found by the second fresh-user trial: a key given twice was last-wins
    # (which one was meant?); a BOM from a Windows editor broke the first key.
    auth.write_text("[https://pacs/dicom-web]\nusername = alice\npassword = pw-first\npassword = pw-second\n")
    with pytest.raises(ValueError, match=r"line 4: password is given twice in \[https://pacs/dicom-web\]") as caught:
        read_auth_file(auth)
    assert "pw-" not in str(caught.value)
    auth.write_bytes("\ufefftoken = t\n".encode("utf-8"))
    assert read_auth_file(auth) == {"": {"token": "t"}}


def test_an_unreachable_server_is_given_up_after_a_check():
    """A server that refused a connection (after medseg's retries) is checked
    before the next request; still not there, every later request fails at
    once: a batch of thousands does not wait once per scan."""
    import time

    from medseg.tracking_server import free_port

    connection = Connection(timeout=(2, 2))
    base = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    with pytest.raises(DicomWebError, match="unreachable") as caught:
        connection.call(base, "search for studies", lambda c: c.search_for_studies())
    assert caught.value.unreachable
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(DicomWebError, match=r"stopped answering \(a request got no answer, nor a check .*\): "
                                                 r"not tried \(search for studies\)") as caught:
            connection.call(base, "search for studies", lambda c: c.search_for_studies())
        assert caught.value.unreachable and time.monotonic() - started < 1.0


def test_a_server_that_answers_the_check_is_asked_again(web_page_server):
    """A request that got no answer (a slow instance) does not give the
    server up when it answers the check after it."""
    connection = Connection(timeout=(2, 2))
    base = f"http://{web_page_server}/dicom-web"
    connection._no_answer(base)  # as after a read timeout
    with pytest.raises(DicomWebError, match="answered something that is not DICOMweb"):  # the request was sent
        connection.call(base, "search for studies", lambda c: c.search_for_studies())
    assert base not in connection._gone


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


def test_auth_file_sections_keep_each_servers_credentials_to_that_server(tmp_path, caplog):
    """A token for the PACS is not sent to the --push-url server: sections
    give credentials per DICOMweb root; quotes around a value are dropped;
    a token beside a username in one section, or a folder, is refused."""
    auth = tmp_path / "pacs.auth"
    auth.write_text("# default\ntoken = 'pacs-token'\n\n[https://research.example.org/dicom-web/]\n"
                    "username = \"alice\"\npassword = p#ss w0rd\n")
    auth.chmod(0o600)
    servers = read_auth_file(auth)
    assert servers == {"": {"token": "pacs-token"},
                       "https://research.example.org/dicom-web": {"username": "alice", "password": "p#ss w0rd"}}
    connection = Connection(servers, source=f"auth file {auth}")
    assert connection.credentials_for(ROOT) == ({"token": "pacs-token"}, f"auth file {auth}")
    creds, source = connection.credentials_for("https://research.example.org/dicom-web")
    assert creds["username"] == "alice" and source.endswith("[https://research.example.org/dicom-web]")
    assert connection.credentials_for("https://research.example.org/dicom-web-other")[0] == {"token": "pacs-token"}
    # Scheme and host case and a default port do not matter; a section no server falls under is reported.
    assert connection.credentials_for("HTTPS://Research.example.org:443/dicom-web")[0]["username"] == "alice"
    assert connection.unmatched_sections([ROOT]) == ["https://research.example.org/dicom-web"]
    assert connection.unmatched_sections([ROOT, "https://research.example.org/dicom-web/"]) == []
    # Sections only: no credentials for any other server.
    auth.write_text("[https://research.example.org/dicom-web]\ntoken = t\n")
    assert Connection(read_auth_file(auth)).credentials_for(ROOT)[0] == {}
    auth.write_text("token = t\nusername = u\npassword = p\n")
    with pytest.raises(ValueError, match="both a token and a username"):
        read_auth_file(auth)
    auth.write_text("[ftp://x]\ntoken = t\n")
    with pytest.raises(ValueError, match="line 1: a section"):
        read_auth_file(auth)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="is a folder"):
        credentials_from_environment({}, auth_file=tmp_path)
    assert "readable by other users" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert credentials_from_environment({ENV_TOKEN: "t", ENV_USER: "u", ENV_PASSWORD: "p"})[0] == {
            "": {"token": "t"}}
    assert "the token is used" in caplog.text


def test_credentials_over_plain_http_to_another_host_are_warned_about(caplog):
    connection = Connection({"token": "t"})
    with caplog.at_level(logging.WARNING):
        connection.client("http://127.0.0.1:8042/dicom-web")  # loopback: no warning
        connection.client("http://pacs.example.org/dicom-web")
        connection.client("http://pacs.example.org/dicom-web")
        Connection().client("http://pacs.example.org/dicom-web")  # no credentials, nothing to leak
    assert caplog.text.count("plain http") == 1 and "pacs.example.org" in caplog.text


def test_the_read_timeout_comes_from_the_environment():
    from medseg.dicomweb import DEFAULT_TIMEOUT, ENV_TIMEOUT, timeout_from_environment

    assert timeout_from_environment({}) == DEFAULT_TIMEOUT
    assert timeout_from_environment({ENV_TIMEOUT: "120"}) == (DEFAULT_TIMEOUT[0], 120.0)
    for bad in ("0", "-5", "soon", "inf"):
        with pytest.raises(ValueError, match=ENV_TIMEOUT):
            timeout_from_environment({ENV_TIMEOUT: bad})


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers (a hung server)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
    sock.close()


def test_a_server_that_accepts_but_never_answers_is_not_waited_on_silently(silent_server, caplog):
    """No retry after a read timeout (it would only wait again), a line
    while waiting; the next request is preceded by a short check, and once
    that gets no answer either the rest fail at once, whatever the number
    of threads asking (the second trial: two reading threads each waited
    out two timeouts, ~125 s, before giving up)."""
    import threading
    import time

    connection = Connection(timeout=(2, 1.0))
    connection.still_waiting_after = 0.3
    connection.check_timeout = 0.5
    started = time.monotonic()
    errors = []

    def ask() -> None:
        try:
            connection.call(silent_server, "search for studies", lambda c: c.search_for_studies())
        except DicomWebError as err:
            errors.append(err)

    with caplog.at_level(logging.WARNING):
        readers = [threading.Thread(target=ask) for _ in range(2)]  # two reading threads, both in flight
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join()
        assert len(errors) == 2 and all("did not answer within 1.0 s (search for studies)" in str(e) for e in errors)
        assert all(e.unreachable for e in errors)
        assert caplog.text.count("still waiting for DICOMweb server") == 2
        readers = [threading.Thread(target=ask) for _ in range(2)]  # each one's next scan
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join()
    assert len(errors) == 4 and all("stopped answering" in str(e) for e in errors[2:])
    assert time.monotonic() - started < 1.0 + 0.5 + 1.5  # one timeout and one check, not two timeouts per thread
    assert caplog.text.count("stopped answering: the scans still to read") == 1
    started = time.monotonic()
    with pytest.raises(DicomWebError, match="stopped answering"):
        connection.call(silent_server, "retrieve instance 1.2", lambda c: c.search_for_studies())
    assert time.monotonic() - started < 0.2


@pytest.fixture
def web_page_server():
    """An HTTP server that answers every request with an HTML page (a
    login portal or a proxy, not DICOMweb)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b"<html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_that_is_not_dicomweb_or_a_failed_tls_handshake_is_said_plainly(web_page_server):
    connection = Connection()
    base = f"http://{web_page_server}/app"
    with pytest.raises(DicomWebError, match=r"answered something that is not DICOMweb .*the server's DICOMweb root"):
        connection.check(base)
    with pytest.raises(DicomWebError, match=r"TLS connection failed .*REQUESTS_CA_BUNDLE") as caught:
        connection.check(f"https://{web_page_server}/dicom-web")  # https to a plain http server
    assert caught.value.unreachable
    # requests' own message names the URL: query values (a patient) are redacted.
    with pytest.raises(DicomWebError) as caught:
        connection.call(f"https://{web_page_server}/dicom-web", "search for studies",
                        lambda c: c.search_for_studies(search_filters={"PatientID": "SECRETID9"}))
    assert "SECRETID9" not in str(caught.value) and "PatientID=..." in str(caught.value)


@pytest.fixture
def model_free_seg_folder(tmp_path):
    """A scan's output folder holding a seg.dcm (written from a synthetic CR,
    no model needed)."""
    import numpy as np
    from dicom_factory import make_dicom, synthetic_image

    from medseg.inference.dicom_seg import write_dicom_seg

    source = make_dicom(tmp_path / "src.dcm", synthetic_image(64, 48))
    masks = {"heart": np.zeros((64, 48), bool), "lungs": np.ones((64, 48), bool)}
    case_dir = tmp_path / "1.2.826.0.1.3680043.8.498.1"
    write_dicom_seg(source, masks, case_dir / "seg.dcm", model_name="unet-test", model_version="1")
    return case_dir


def test_wildcards_reach_the_server_as_they_are(stub_server):
    """Found by the second fresh-user trial: dicomweb-client sent * and ? as
    %2A and %3F, which Orthanc (DICOMweb plugin 1.7) does not decode, so
    PatientName=Smith* matched nothing. Both are allowed in a query as they
    are (RFC 3986 3.4); ^ stays encoded."""
    connection = Connection()
    base = f"{stub_server['url']}/dicom-web"
    connection.call(base, "search for studies", lambda c: c.search_for_studies(
        search_filters={"PatientName": "Phan?om^Sec*", "StudyDate": "20240101-20240131"}))
    [(method, target)] = stub_server["requests"]
    assert method == "GET" and "PatientName=Phan?om%5ESec*" in target and "StudyDate=20240101-20240131" in target


def test_a_server_warning_is_logged_without_query_values(stub_server, caplog):
    """PS3.18 6.7.1.2: a server cutting a search short says so in a Warning
    header; medseg says it on once, query values redacted (dicomweb-client's
    own line quoted the header as it was)."""
    stub_server["answer"] = lambda method, target: (200, {
        "Content-Type": "application/dicom+json",
        "Warning": '299 pacs: "The number of results exceeded the maximum supported by the server" SECRETID7'}, b"[]")
    with caplog.at_level(logging.WARNING):
        Connection().call(f"{stub_server['url']}/dicom-web", "search for studies", lambda c: c.search_for_studies(
            search_filters={"PatientID": "SECRETID7"}))
    assert "exceeded the maximum supported by the server" in caplog.text and "PatientID=..." in caplog.text
    assert "SECRETID7" not in caplog.text and caplog.text.count("exceeded the maximum") == 1


def test_refusals_say_what_to_do(stub_server, tmp_path):
    """Found by the second fresh-user trial: a web server's root (Orthanc's
    without /dicom-web) answered a bare "HTTP 400"; an auth file without a
    section for the server got "set MEDSEG_DICOMWEB_TOKEN" while a file was
    set."""
    base = stub_server["url"]
    stub_server["answer"] = lambda method, target: (400, {"Content-Type": "text/plain"}, b"bad request")
    with pytest.raises(DicomWebError, match=r"HTTP 400 Bad Request while trying to check the server .*; is "
                                            rf"{base} the server's DICOMweb root\? \(Orthanc: "):
        Connection().check(base)
    stub_server["answer"] = lambda method, target: (401, {"Content-Type": "text/plain"}, b"no")
    auth = tmp_path / "pacs.auth"
    auth.write_text("[https://other.example.org/dicom-web]\ntoken = t\n")
    auth.chmod(0o600)
    connection = Connection(read_auth_file(auth), source=f"auth file {auth}")
    with pytest.raises(DicomWebError, match=rf"needs credentials \(HTTP 401 Unauthorized\) .*auth file {auth} has no "
                                            rf"section for it .*add \[{base}/dicom-web\]") as caught:
        connection.check(f"{base}/dicom-web")
    assert ENV_TOKEN not in str(caught.value)


def test_a_store_answered_without_acknowledgement_is_checked(stub_server, tmp_path, model_free_seg_folder):
    """Found by the second fresh-user trial: a server answering the STOW-RS
    with `[]` gave an AttributeError text. An answer that does not list an
    instance as stored is no proof: the server is asked, and a scan whose
    results it does not hold fails naming the scan, not a result's UID."""
    from medseg.inference.push import PUSHED_RECORD, push_scan

    base = f"{stub_server['url']}/dicom-web"
    case_dir = model_free_seg_folder
    with pytest.raises(DicomWebError, match=rf"answered the store of scan {case_dir.name} without storing its SEG "
                                            r"\(not found after it\)"):
        push_scan(Connection(), base, case_dir)
    assert [m for m, _ in stub_server["requests"]] == ["GET", "POST", "GET"]  # asked, stored, asked again
    assert not (case_dir / PUSHED_RECORD).exists()
