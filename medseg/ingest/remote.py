"""Scans read from a DICOMweb server: which instances a source names
(QIDO-RS), and each instance's retrieval (WADO-RS) into a local file.

A source (:class:`medseg.dicomweb.DicomWebSource`) becomes inputs like a
folder does: one :class:`medseg.ingest.inputs.InputFile` per image instance,
whose ``url`` is the instance's WADO-RS URL and whose ``name`` is its SOP
Instance UID (never patient data); non-image instances (structured reports,
SEG, presentation states, ... , medseg's own results stored back included)
are skipped like non-image files in a folder. Instances are listed sorted by
Study, Series and SOP Instance UID, so chunk jobs split a source the same way.

An instance is retrieved only when the run gets to it (the reading threads of
:func:`medseg.inference.predict.predict_files`), into a file of the output
folder that is removed once its results are written: a batch of ten thousand
scans never holds them all on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.atomic import atomic_path
from medseg.dicomweb import Connection, DicomWebSource, Level, instance_url
from medseg.ingest.inputs import InputFile, Skipped

log = logging.getLogger(__name__)

# QIDO-RS result attributes (tags as the JSON model of PS3.18 F.2 keys them).
_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS, _MODALITY = "0020000D", "0020000E", "00080018", "00080016", "00080060"
# Folder of the output folder where instances are retrieved to (hidden: no
# case ID starts with a dot).
RETRIEVED_FOLDER = ".retrieved"


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


# Results asked for per QIDO-RS request.
SEARCH_PAGE = 1000


def _search_all(connection: Connection, base: str, what: str, search) -> list[dict]:
    """Every result of a QIDO-RS search, page by page (``search(client,
    {"limit": n, "offset": k})``).

    Not dicomweb-client's ``get_remaining``: it asks again until a page comes
    back empty, which never happens with a server that ignores ``offset``
    (Orthanc 1.10's DICOMweb plugin does for a study search by
    ModalitiesInStudy) - it looped, holding ever more results. Here paging
    also stops at a page that brings no result not seen before. A short page
    does not end it: servers cap pages at their own maximum whatever the
    limit asked for, so a short page is no sign of the last one.
    """
    import json

    results: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = connection.call(base, what, lambda c: search(c, {"limit": SEARCH_PAGE, "offset": offset}))
        new = []
        for item in page:
            key = json.dumps(item, sort_keys=True)
            if key not in seen:
                seen.add(key)
                new.append(item)
        if not new:
            return results
        results += new
        offset += len(page)


def list_instances(connection: Connection, source: DicomWebSource) -> tuple[list[InputFile], list[Skipped]]:
    """The image instances a source names, as inputs (module docstring).

    Returns:
        (inputs sorted by Study, Series, SOP Instance UID, each with ``url``
        set and ``name`` = SOP Instance UID; the non-image instances skipped).

    Raises:
        medseg.dicomweb.DicomWebError: a search was refused or the server
            could not be reached (nothing is listed then).
    """
    base = source.base_url
    filters = dict(source.filters)
    fields = ["SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID"]

    def instances(study: str | None, series: str | None, extra: dict) -> list[dict]:
        what = "search for instances" + (" of a study" if study else "")
        return _search_all(connection, base, what, lambda c, page: c.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, fields=fields, search_filters=extra or None,
            **page))

    found: list[dict] = []
    if source.search == Level.STUDIES:
        studies = _search_all(connection, base, "search for studies", lambda c, page: c.search_for_studies(
            search_filters=filters or None, **page))
        for study in sorted({uid for s in studies if (uid := _value(s, _STUDY_UID))}):
            found += instances(study, None, {})
    elif source.search == Level.SERIES:
        series_found = _search_all(connection, base, "search for series", lambda c, page: c.search_for_series(
            study_instance_uid=source.study, search_filters=filters or None, fields=["StudyInstanceUID"], **page))
        pairs = sorted({(st, se) for s in series_found
                        if (st := _value(s, _STUDY_UID) or source.study) and (se := _value(s, _SERIES_UID))})
        for study, series in pairs:
            found += instances(study, series, {})
    elif source.search == Level.INSTANCES:
        found = instances(source.study, source.series, filters)
    else:
        if source.instance:
            filters["SOPInstanceUID"] = source.instance
        found = instances(source.study, source.series, filters)

    files: list[InputFile] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    rows = []
    for item in found:
        study = _value(item, _STUDY_UID) or source.study
        series = _value(item, _SERIES_UID) or source.series
        sop = _value(item, _SOP_UID)
        if not (study and series and sop) or sop in seen:
            continue
        seen.add(sop)
        rows.append((study, series, sop, _value(item, _SOP_CLASS), _value(item, _MODALITY)))
    from medseg.ingest.dicom import is_image_sop_class

    for study, series, sop, sop_class, modality in sorted(rows):
        url = instance_url(base, study, series, sop)
        if sop_class and not is_image_sop_class(sop_class):
            from pydicom.uid import UID

            skipped.append(Skipped(url, f"not an image: {UID(sop_class).name}"))
            continue
        files.append(InputFile(Path(f"{sop}.dcm"), sop, explicit=True, url=url))
    if not files and not skipped:
        log.warning("DICOMweb source %s: no instances found", source.display())
    return files, skipped


def local_copy(out_dir: Path, entry: InputFile) -> InputFile:
    """``entry`` with ``path`` set to where its instance is retrieved inside
    ``out_dir`` (:data:`RETRIEVED_FOLDER`/<case ID>.dcm); other entries unchanged."""
    from dataclasses import replace

    if not entry.url:
        return entry
    return replace(entry, path=out_dir / RETRIEVED_FOLDER / f"{entry.case_id}.dcm")


def retrieve(connection: Connection, entry: InputFile) -> Path:
    """Retrieve ``entry``'s instance (WADO-RS, as stored: no transcoding) into
    ``entry.path``, written whole or not at all.

    Raises:
        medseg.dicomweb.DicomWebError: refused, not found, or unreachable.
        ValueError: ``entry`` has no ``url``.
    """
    from dicomweb_client.uri import URI

    if not entry.url:
        raise ValueError(f"{entry.name} is not a DICOMweb input")
    uri = URI.from_string(entry.url, permissive=True)
    dataset = connection.call(uri.base_url, f"retrieve instance {uri.sop_instance_uid}", lambda c: c.retrieve_instance(
        uri.study_instance_uid, uri.series_instance_uid, uri.sop_instance_uid,
        media_types=(("application/dicom", "*"),)))
    # Owner-only: the copies are whole source images, patient data included,
    # and a killed run leaves them until the next run finishes their scans.
    entry.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with atomic_path(entry.path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)  # Part 10, as a PACS export would be
        Path(tmp).chmod(0o600)  # owner-only even when the folder is copied out
    return entry.path


__all__ = ["RETRIEVED_FOLDER", "list_instances", "local_copy", "retrieve"]
