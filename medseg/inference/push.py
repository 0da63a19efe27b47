"""Store a scan's DICOM results (SEG, CTR structured report) on a DICOMweb
server with STOW-RS, once.

A scan's folder holds ``seg.dcm`` and ``sr.dcm`` (written by
:mod:`medseg.inference.predict` for DICOM sources). :func:`push_scan` stores
those the server does not hold yet: it asks (QIDO-RS, by SOP Instance UID)
before storing, every time (a record could be stale: the server may have
lost or deleted an instance since), so a rerun never stores an instance
twice, and records what the server acknowledged in the folder's
``pushed.json``. The SEG and SR UIDs derive from
the source, the model and the result
(:func:`medseg.inference.dicom_seg.result_uids`), so the same result written
into another output folder is found on the server too and not stored again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medseg.atomic import write_text_atomic
from medseg.dicomweb import Connection, DicomWebError

log = logging.getLogger(__name__)

# The DICOM results of a scan folder, in the order they are stored.
RESULT_FILES = ("seg.dcm", "sr.dcm")
PUSHED_RECORD = "pushed.json"


def _instances(case_dir: Path) -> list:
    import pydicom

    return [pydicom.dcmread(case_dir / name) for name in RESULT_FILES if (case_dir / name).is_file()]


def push_scan(connection: Connection, base_url: str, case_dir: str | Path) -> list[str]:
    """Store the scan's ``seg.dcm`` and ``sr.dcm`` on the server, unless it has them.

    Args:
        connection: credentials and clients (:class:`medseg.dicomweb.Connection`).
        base_url: the server's DICOMweb root.
        case_dir: the scan's output folder.

    Returns:
        SOP Instance UIDs stored by this call (empty: nothing new to store).

    Raises:
        medseg.dicomweb.DicomWebError: a search or the store was refused, or
            the server could not be reached; or the server answered that it
            did not store an instance (STOW-RS Failed SOP Sequence).
        FileNotFoundError: the folder holds no DICOM result to store.
    """
    case_dir = Path(case_dir)
    datasets = _instances(case_dir)
    if not datasets:
        raise FileNotFoundError(f"{case_dir}: no seg.dcm or sr.dcm to store (DICOM results are written for DICOM "
                                "sources, unless --no-seg)")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    # The server is always asked: pushed.json is a record, not proof (the
    # server may have lost or deleted an instance since).
    present: set[str] = set()
    for ds in datasets:
        study, uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        found = connection.call(base_url, f"search for instance {uid}", lambda c: c.search_for_instances(
            study_instance_uid=study, search_filters={"SOPInstanceUID": uid}))
        if any(_sop_uid(item) == uid for item in found):
            present.add(uid)
    to_store = [ds for ds in datasets if str(ds.SOPInstanceUID) not in present]
    if to_store:
        response = connection.call(base_url, f"store {len(to_store)} instance(s) of {case_dir.name}",
                                   lambda c: c.store_instances(to_store))
        failed = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in
                  getattr(response, "FailedSOPSequence", None) or []]
        if failed:
            raise DicomWebError(f"DICOMweb server {base_url} did not store {', '.join(failed)} (STOW-RS Failed "
                                "SOP Sequence)")
    write_text_atomic(case_dir / PUSHED_RECORD,
                      json.dumps({"server": base_url, "sop_instance_uids": uids}, indent=1) + "\n")
    return [str(ds.SOPInstanceUID) for ds in to_store]


def _sop_uid(item: dict) -> str | None:
    values = (item.get("00080018") or {}).get("Value") or []
    return str(values[0]) if values else None


__all__ = ["PUSHED_RECORD", "RESULT_FILES", "push_scan"]
