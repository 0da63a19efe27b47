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
            did not store an instance (STOW-RS Failed SOP Sequence), or
            answered without storing it. Messages name the scan (its
            folder's name), not the result's UIDs.
        FileNotFoundError: the folder holds no DICOM result to store.
    """
    case_dir = Path(case_dir)
    datasets = _instances(case_dir)
    if not datasets:
        raise FileNotFoundError(f"{case_dir}: no seg.dcm or sr.dcm to store (DICOM results are written for DICOM "
                                "sources, unless --no-seg)")
    scan = case_dir.name  # the scan's case ID (its SOP Instance UID for a DICOMweb source): what failures name
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    # The server is always asked: pushed.json is a record, not proof (the
    # server may have lost or deleted an instance since).
    to_store = [ds for ds in datasets if not _on_server(connection, base_url, ds, scan)]
    if to_store:
        what = f"store the {_kinds(to_store)} of scan {scan}"
        try:
            response = connection.call(base_url, what, lambda c: c.store_instances(to_store))
        except (AttributeError, TypeError, KeyError, IndexError):  # dicomweb-client read an answer that is no
            response = None  # dataset (e.g. []): whether it stored them is asked below
        failed = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in
                  getattr(response, "FailedSOPSequence", None) or []]
        if failed:
            kinds = _kinds(ds for ds in to_store if str(ds.SOPInstanceUID) in failed)
            raise DicomWebError(f"DICOMweb server {base_url} did not store the {kinds or 'results'} of scan {scan} "
                                "(STOW-RS Failed SOP Sequence)")
        acknowledged = {str(item.get("ReferencedSOPInstanceUID")) for item in
                        getattr(response, "ReferencedSOPSequence", None) or []}
        # An answer that does not list an instance as stored (an empty body,
        # not a STOW-RS response) is no proof: the server is asked.
        missing = [ds for ds in to_store if str(ds.SOPInstanceUID) not in acknowledged
                   and not _on_server(connection, base_url, ds, scan)]
        if missing:
            raise DicomWebError(f"DICOMweb server {base_url} answered the store of scan {scan} without storing its "
                                f"{_kinds(missing)} (not found after it); "
                                "run again to retry")
    write_text_atomic(case_dir / PUSHED_RECORD,
                      json.dumps({"server": base_url, "sop_instance_uids": uids}, indent=1) + "\n")
    return [str(ds.SOPInstanceUID) for ds in to_store]


def _kinds(datasets) -> str:
    """The results' kinds in words ("SEG and SR"), for messages."""
    return " and ".join(str(ds.Modality) for ds in datasets)


def _on_server(connection: Connection, base_url: str, ds, scan: str) -> bool:
    """The server holds ``ds`` (a QIDO-RS search by its SOP Instance UID within its study)."""
    study, uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    found = connection.call(base_url, f"search for the {ds.Modality} of scan {scan}", lambda c: c.search_for_instances(
        study_instance_uid=study, search_filters={"SOPInstanceUID": uid}))
    return any(_sop_uid(item) == uid for item in found)


def _sop_uid(item: dict) -> str | None:
    values = (item.get("00080018") or {}).get("Value") or []
    return str(values[0]) if values else None


__all__ = ["PUSHED_RECORD", "RESULT_FILES", "push_scan"]
