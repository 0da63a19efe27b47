"""The real Orthanc + DICOMweb test server of tests/orthanc_server.py, through
the ``dicomweb-client`` library: QIDO-RS search, WADO-RS retrieve, STOW-RS
store, HTTP basic authentication, and a restart keeping the stored instances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from orthanc_server import OrthancServer, orthanc, orthanc_factory  # noqa: F401 - fixtures
from pydicom.uid import generate_uid

from medseg.phantoms.write import write_phantom_dataset

SOP_INSTANCE_UID = "00080018"


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> list[Path]:
    """Two phantom CR images (each its own study and series)."""
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(folder, n=2, seed=0, shape=(128, 128))
    files = sorted((folder / "images").glob("*.dcm"))
    assert len(files) == 2
    return files


def _uids(results: list[dict]) -> set[str]:
    return {r[SOP_INSTANCE_UID]["Value"][0] for r in results}


def test_qido_finds_uploads_and_wado_returns_their_pixels(orthanc: OrthancServer, phantom_files):
    ids = orthanc.upload(phantom_files)
    assert len(set(ids)) == 2
    uploaded = [pydicom.dcmread(f) for f in phantom_files]

    client = DICOMwebClient(orthanc.dicomweb_url)
    found = client.search_for_instances()
    assert _uids(found) == {ds.SOPInstanceUID for ds in uploaded}
    # RetrieveURLs point back to this server (port included: DicomWeb.Host).
    assert all(r["00081190"]["Value"][0].startswith(orthanc.dicomweb_url + "/studies/") for r in found)
    # QIDO filters on SOPInstanceUID.
    one = client.search_for_instances(search_filters={"SOPInstanceUID": uploaded[1].SOPInstanceUID})
    assert _uids(one) == {uploaded[1].SOPInstanceUID}

    for ds in uploaded:
        got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.pixel_array.shape == (128, 128)
        np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)


def test_stow_stores_a_new_instance(orthanc: OrthancServer, phantom_files):
    orthanc.upload(phantom_files[:1])
    ds = pydicom.dcmread(phantom_files[0])
    original_uid = ds.SOPInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PixelData = (ds.pixel_array[::-1].copy()).tobytes()  # a different image

    client = DICOMwebClient(orthanc.dicomweb_url)
    response = client.store_instances([ds])
    referenced = [item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])]
    assert referenced == [ds.SOPInstanceUID]
    assert len(response.get("FailedSOPSequence", [])) == 0

    assert _uids(client.search_for_instances()) == {original_uid, ds.SOPInstanceUID}
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)
    assert not np.array_equal(got.pixel_array, pydicom.dcmread(phantom_files[0]).pixel_array)
    assert ds.SOPInstanceUID in orthanc.instance_uids()


def test_basic_authentication(orthanc_factory, phantom_files):
    server = orthanc_factory(users={"alice": "secret"})
    assert server.upload(phantom_files)  # upload() uses the user's credentials

    with pytest.raises(requests.HTTPError) as refused:
        DICOMwebClient(server.dicomweb_url).search_for_instances()
    assert refused.value.response.status_code == 401
    wrong = create_session_from_user_pass("alice", "wrong")
    with pytest.raises(requests.HTTPError) as refused:
        DICOMwebClient(server.dicomweb_url, session=wrong).search_for_instances()
    assert refused.value.response.status_code == 401

    session = create_session_from_user_pass("alice", "secret")
    found = DICOMwebClient(server.dicomweb_url, session=session).search_for_instances()
    assert _uids(found) == {pydicom.dcmread(f).SOPInstanceUID for f in phantom_files}


def test_restart_keeps_port_and_instances(orthanc: OrthancServer, phantom_files):
    orthanc.upload(phantom_files)
    url = orthanc.url
    client = DICOMwebClient(orthanc.dicomweb_url)
    # dicomweb-client retries ANY exception (connection refused included) 5
    # times with exponential back-off, about 30 s: off here.
    client.set_http_retry_params(retry=False)
    before = _uids(client.search_for_instances())
    assert len(before) == 2

    orthanc.stop()
    assert not orthanc.running
    with pytest.raises(requests.ConnectionError):
        client.search_for_instances()

    orthanc.start()
    assert orthanc.running and orthanc.url == url
    assert _uids(client.search_for_instances()) == before
