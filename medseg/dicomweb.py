"""Connections to a DICOMweb server (a PACS, Orthanc, dcm4chee, a cloud
healthcare API): the source syntax, credentials, and errors in plain words.

The protocol itself (QIDO-RS search, WADO-RS retrieve, STOW-RS store) is the
``dicomweb-client`` library's; this module only decides what to ask for and
says what went wrong.

**Sources.** A DICOMweb source is a URL of the server's DICOMweb root
(``https://pacs.example.org/dicom-web``) followed by what to read:

- ``<root>/studies/<StudyInstanceUID>``: every image of a study;
- ``<root>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``: of a series;
- ``.../instances/<SOPInstanceUID>``: one image;
- ``<root>/studies?<QIDO-RS query>``, ``<root>/series?...``,
  ``<root>/instances?...``: every image of the studies, series or instances a
  QIDO-RS search finds, e.g. ``<root>/series?Modality=CR`` or
  ``<root>/studies?ModalitiesInStudy=DX&StudyDate=20240101-20240131``
  (PS3.18 10.6 query parameters: attribute keywords or tags).

Query parameters after a study or series URL narrow its instances
(``.../studies/1.2.3?Modality=CR``); ``<root>/studies/<uid>/instances``
searches a study's instances. A search with neither filter nor study
(``<root>/studies``) names the whole archive
(:attr:`DicomWebSource.whole_archive`; the command line refuses it unless
told ``--whole-archive``).

**Credentials** never come from the command line (it ends up in shell
history, ``ps`` and logs) and never in the URL: :func:`credentials_from_environment`
reads them from the environment or a file:

- ``MEDSEG_DICOMWEB_TOKEN``: a bearer token (``Authorization: Bearer ...``);
- ``MEDSEG_DICOMWEB_USER`` and ``MEDSEG_DICOMWEB_PASSWORD``: HTTP basic auth;
- ``MEDSEG_DICOMWEB_AUTH_FILE`` (or ``--dicomweb-auth FILE``): a file of
  ``key = value`` lines with ``token``, or ``username`` and ``password``
  (``#`` starts a comment line); ``[<DICOMweb root>]`` sections give
  credentials for one server only (:func:`read_auth_file`).

Query values can be patient data (``PatientID=...``): logs show a source as
:func:`DicomWebSource.display`, which names the query's keys, not its values.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

# dicomweb-client logs every request's URL at INFO, query values included
# (which can be patient data), and a server's Warning header as it is (a
# server may quote the query there): medseg says both itself, redacted
# (_log_server_warning); only dicomweb-client's errors reach medseg's logs.
logging.getLogger("dicomweb_client").setLevel(logging.ERROR)

ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"
ENV_USER = "MEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"
ENV_AUTH_FILE = "MEDSEG_DICOMWEB_AUTH_FILE"
ENV_TIMEOUT = "MEDSEG_DICOMWEB_TIMEOUT"
# Seconds to connect, and to wait for the next bytes of an answer (requests'
# read timeout is between bytes, not for the whole body): a server that
# went away or hangs is noticed in a minute, a slow WADO-RS of a large image
# that is streaming still finishes. MEDSEG_DICOMWEB_TIMEOUT replaces the
# second for a slow archive (near-line storage).
DEFAULT_TIMEOUT = (10.0, 60.0)

T = TypeVar("T")


class Level(str, Enum):
    """What a source's URL names: a QIDO-RS search at one level, or UIDs."""

    STUDIES = "studies"
    SERIES = "series"
    INSTANCES = "instances"


class DicomWebError(RuntimeError):
    """A DICOMweb request failed: the message names the server (never the
    credentials or query values) and what to do.

    Attributes:
        unreachable: the server could not be reached (connection refused,
            timed out, name not resolved), as opposed to an answer refusing
            the request.
        status: the HTTP status of the refusal, else None.
    """

    def __init__(self, message: str, *, unreachable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.status = status


def is_dicomweb_source(text: str | os.PathLike) -> bool:
    """True when ``text`` is an http(s) URL (a DICOMweb source), not a path."""
    return str(text).lower().startswith(("http://", "https://"))


# QIDO-RS query parameters that are not attribute filters (PS3.18 8.3.4):
# medseg pages and picks the fields itself.
_NOT_FILTERS = {"limit", "offset", "includefield", "fuzzymatching"}


# Attributes every QIDO-RS server must match (PS3.18 10.6.1.2.3, the Studies,
# Series and Instances tables of required matching attributes); a server may
# ignore a filter on any other, and the search then reads more than meant.
REQUIRED_MATCHING = frozenset({
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName", "PatientName",
    "PatientID", "StudyInstanceUID", "StudyID", "Modality", "SeriesInstanceUID", "SeriesNumber",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence.ScheduledProcedureStepID", "RequestAttributesSequence.RequestedProcedureID",
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber"})

# A tag as a query key (PS3.18 8.3.4.1): 8 hex digits, e.g. 00100010.
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
# A DICOM UID (PS3.5 9.1): digit groups joined by dots, at most 64 characters.
_UID_SYNTAX = re.compile(r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*")
# A DA query value (PS3.18 8.3.4.1, PS3.4 C.2.2.2.5): a date or a range.
_DATE_MATCH = re.compile(r"[0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8}")


def _keyword(key: str) -> str:
    """A filter key as DICOM keywords (a tag such as 00100010 -> PatientName)."""
    from pydicom.datadict import keyword_for_tag

    return ".".join(keyword_for_tag(int(part, 16)) or part if _TAG.fullmatch(part) else part
                    for part in key.split("."))


def _valid_date_range(value: str) -> bool:
    """A DA query value whose dates exist, a range's start not after its end."""
    import datetime

    try:
        dates = [datetime.datetime.strptime(d, "%Y%m%d") for d in value.split("-") if d]
    except ValueError:
        return False
    return dates == sorted(dates)


def _is_date_key(key: str) -> bool:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(key)
    return tag is not None and dictionary_VR(tag) == "DA"


def _is_attribute(key: str) -> bool:
    """A QIDO-RS filter key: a DICOM keyword or 8-digit hex tag, or a dotted
    sequence path of them (PS3.18 8.3.4.1)."""
    from pydicom.datadict import tag_for_keyword

    return all(tag_for_keyword(part) is not None or _TAG.fullmatch(part) for part in key.split("."))


@dataclass(frozen=True)
class DicomWebSource:
    """One DICOMweb source (module docstring): server root plus what to read.

    Attributes:
        base_url: the DICOMweb root, e.g. ``https://pacs/dicom-web`` (no
            trailing slash).
        search: the QIDO-RS level searched, or None when UIDs name the data.
        study, series, instance: the UIDs in the URL (None where absent).
        filters: QIDO-RS query parameters (keyword or tag -> value).
    """

    base_url: str
    search: Level | None = None
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    filters: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "DicomWebSource":
        """Parse a source URL (module docstring).

        Raises:
            ValueError: not http(s), credentials in the URL, or a path that
                names neither a search nor study/series/instance UIDs.
        """
        parts = urlsplit(str(text).strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not a DICOMweb URL (http:// or https://): {redact_url(text)}")
        if parts.username or parts.password:
            raise ValueError(f"credentials in the DICOMweb URL {redact_url(text)}: give them in {ENV_USER} and "
                             f"{ENV_PASSWORD}, {ENV_TOKEN} or an auth file ({ENV_AUTH_FILE}), never in a URL")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"DICOMweb URL {parts.scheme}://{parts.netloc.rpartition('@')[2]}/...: not a valid "
                             "port (1-65535)") from None
        if ";" in parts.path:  # path parameters: a mistyped '?' (a query that would be ignored)
            raise ValueError(f"DICOMweb URL {redact_url(text)}: ';' in the path; a search's filters follow '?'")
        query = [part for part in parts.query.split("&") if part]
        if any("=" not in part for part in query):  # never echoed: a value without its key (an ID)
            raise ValueError(f"DICOMweb URL {redact_url(text)}: every query part is key=value (e.g. Modality=CR); "
                             "one has no '='")
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        filters = dict(pairs)
        keywords = [_keyword(k) for k, _ in pairs]  # PatientName and 00100010 are one key
        repeated = sorted({k for k in keywords if keywords.count(k) > 1})
        if repeated:  # dict() kept the last value only: a search for one of them, silently
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(repeated)} is given more than once; a "
                             "search takes one value per key: give each value as a source of its own")
        paging = sorted(k for k in filters if k.lower() in _NOT_FILTERS)
        if paging:
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(paging)} is not a search filter; medseg "
                             "reads every result of a search, page by page (narrow it with attribute filters, e.g. "
                             "StudyDate=20240101-20240131)")
        empty = sorted(k for k, v in filters.items() if not v.strip())
        if empty:  # an unset shell variable: the server would match every value, i.e. the whole archive
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(empty)} has no value (the search would "
                             "match the whole archive); give a value or leave the key out")
        unknown = sorted(k for k in filters if not _is_attribute(k))
        if unknown:  # a server ignores a key it does not know: the search would match everything
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(unknown)} is not a DICOM attribute "
                             "keyword or tag (keywords are case-sensitive: StudyDate, Modality, ModalitiesInStudy, "
                             "AccessionNumber, ...)")
        bad_dates = sorted(k for k, v in filters.items() if _is_date_key(_keyword(k))
                           and not (_DATE_MATCH.fullmatch(v) and _valid_date_range(v)))
        if bad_dates:  # never echoed: PatientBirthDate is patient data
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(bad_dates)}: a date is YYYYMMDD (a real "
                             "one), a range YYYYMMDD-YYYYMMDD (start first), YYYYMMDD- or -YYYYMMDD (PS3.18 8.3.4.1)")
        segments = [s for s in parts.path.split("/") if s]
        root = f"{parts.scheme}://{parts.netloc}"
        # The last "studies" / "series" / "instances" segment that ends the
        # path, or that a UID follows, starts the resource part.
        for index, segment in enumerate(segments):
            if segment == "studies":
                base = root + "".join(f"/{s}" for s in segments[:index])
                rest = segments[index:]
                return cls._from_resource(text, base, rest, filters)
        if segments and segments[-1] in ("series", "instances"):
            base = root + "".join(f"/{s}" for s in segments[:-1])
            return cls(base, Level(segments[-1]), filters=filters)
        raise ValueError(f"DICOMweb URL {redact_url(text)} names no data: add /studies/<StudyInstanceUID>[/series/"
                         "<SeriesInstanceUID>], or a search such as /series?Modality=CR")

    @classmethod
    def _from_resource(cls, text: str, base: str, rest: list[str], filters: dict) -> "DicomWebSource":
        if rest == ["studies"]:
            return cls(base, Level.STUDIES, filters=filters)
        uids: dict[str, str] = {}
        expected = ["studies", "series", "instances"]
        pairs = [rest[i:i + 2] for i in range(0, len(rest), 2)]
        for position, pair in enumerate(pairs):
            if pair == ["instances"] and position == 1:  # ".../studies/<uid>/instances": the study's instances
                return cls(base, Level.INSTANCES, study=uids.get("studies"), filters=filters)
            if position >= len(expected) or pair[0] != expected[position]:
                break
            if len(pair) == 1:  # ".../studies/<uid>/series?..." : a search within the study
                if pair[0] == "series" or pair[0] == "instances":
                    return cls(base, Level(pair[0]), study=uids.get("studies"), series=uids.get("series"),
                               filters=filters)
                break
            if not _UID_SYNTAX.fullmatch(pair[1]):  # never echoed: a patient ID typed where a UID goes
                raise ValueError(f"DICOMweb URL {base}/{'/'.join(rest[:2 * position + 1])}/...: the {pair[0]} "
                                 "segment is not a DICOM UID (digits and dots, at most 64 characters)")
            uids[pair[0]] = pair[1]
        else:
            return cls(base, None, study=uids.get("studies"), series=uids.get("series"),
                       instance=uids.get("instances"), filters=filters)
        raise ValueError(f"DICOMweb URL {redact_url(text)}: expected <root>/studies/<uid>[/series/<uid>"
                         "[/instances/<uid>]] or a search (<root>/studies?..., /series?..., /instances?...)")

    @property
    def optional_filters(self) -> list[str]:
        """Filter keys outside :data:`REQUIRED_MATCHING`: a server need not
        match them, and one that does not ignores them (the search then
        names more than meant)."""
        return sorted(k for k in self.filters if _keyword(k) not in REQUIRED_MATCHING)

    @property
    def whole_archive(self) -> bool:
        """A search with no filter and no study or series around it: it names
        every study, series or instance on the server."""
        return self.search is not None and not (self.study or self.series or self.filters)

    def display(self) -> str:
        """The source for logs: the URL with query keys but not their values."""
        path = ""
        if self.study:
            path += f"/studies/{self.study}"
        if self.series:
            path += f"/series/{self.series}"
        if self.instance:
            path += f"/instances/{self.instance}"
        if self.search is not None and not (self.search == Level.STUDIES and self.study):
            path += f"/{self.search.value}"
        query = "&".join(f"{key}=..." for key in self.filters)
        return self.base_url + path + (f"?{query}" if query else "")


def redact_url(text: str) -> str:
    """A URL without credentials, query values or path parameters (for
    error messages)."""
    parts = urlsplit(str(text))
    netloc = parts.hostname or ""
    try:
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:  # not a valid port: shown as written
        netloc = parts.netloc.rpartition("@")[2]
    path = parts.path.split(";", 1)[0] + (";..." if ";" in parts.path else "")
    return f"{parts.scheme}://{netloc}{path}" + _redacted_query(parts.query)


def _redacted_query(query: str) -> str:
    """``?key=...&...`` for a query string: keys kept, values (and a part
    without a key, which may be a value) replaced by ``...``; "" for none."""
    shown = [f"{part.split('=', 1)[0]}=..." if "=" in part else "..." for part in query.split("&") if part]
    return f"?{'&'.join(shown)}" if shown else ""


def instance_url(base_url: str, study: str, series: str, instance: str) -> str:
    """The WADO-RS URL of one instance (PS3.18 10.4)."""
    return f"{base_url}/studies/{study}/series/{series}/instances/{instance}"


# --------------------------------------------------------------------------- credentials

# Credentials by server: a DICOMweb root (no trailing slash) -> {"token": ...}
# or {"username": ..., "password": ...}; the root "" stands for every server
# that has no entry of its own.
ServerCredentials = dict[str, dict[str, str]]


def _unquote(value: str) -> str:
    """A value without one pair of surrounding quotes ('...' or "...")."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _section_credentials(values: Mapping[str, str], where: str) -> dict[str, str]:
    if values.get("token") and values.get("username"):
        raise ValueError(f"{where}: has both a token and a username; keep one")
    if values.get("token"):
        return {"token": values["token"]}
    if values.get("username") and "password" in values:
        return {"username": values["username"], "password": values["password"]}
    raise ValueError(f"{where}: needs 'token = ...', or 'username = ...' and 'password = ...'")


def read_auth_file(path: str | Path) -> ServerCredentials:
    """Credentials from a ``key = value`` file (module docstring), by server.

    Lines before any section header are for every server; a section header
    ``[<DICOMweb root>]`` starts the credentials of that server only (and of
    URLs below it), so a PACS token is never sent to another server of the
    same run (a ``--push-url``). A value may be quoted (``'...'`` or
    ``"..."``, the quotes are dropped); ``#`` starts a comment only at the
    start of a line (a password may hold ``#``).

    Returns:
        server root ("" = every other server) -> {"token": ...} or
        {"username": ..., "password": ...}.

    Raises:
        ValueError: the file cannot be read, has another key, a section
            that is not an http(s) URL, a token beside a username, or holds
            neither a token nor a username with a password, or a key
            given twice in a section (the message never quotes a value).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"DICOMweb auth file {path}: is a folder; give the file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first key
    except OSError as err:
        raise ValueError(f"DICOMweb auth file {path}: cannot read it ({err.strerror or err})") from None
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip().rstrip("/")
            if not is_dicomweb_source(current) or urlsplit(current).query:
                raise ValueError(f"DICOMweb auth file {path}, line {number}: a section is a server's DICOMweb "
                                 "root, e.g. [https://pacs.example.org/dicom-web]")
            if current in sections:
                raise ValueError(f"DICOMweb auth file {path}, line {number}: [{current}] is given twice")
            sections[current] = {}
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("token", "username", "password"):
            raise ValueError(f"DICOMweb auth file {path}, line {number}: expected 'token = ...', "
                             "'username = ...', 'password = ...' or a section [<DICOMweb root>]")
        if key in sections[current]:  # which one was meant? (never quoting either value)
            raise ValueError(f"DICOMweb auth file {path}, line {number}: {key} is given twice"
                             + (f" in [{current}]" if current else ""))
        sections[current][key] = _unquote(value.strip())
    servers = {root: _section_credentials(values, f"DICOMweb auth file {path}" + (f", [{root}]" if root else ""))
               for root, values in sections.items() if values or root}
    if not servers:
        _section_credentials({}, f"DICOMweb auth file {path}")  # raises: says what is needed
    return servers


def credentials_from_environment(environ: Mapping[str, str] | None = None,
                                 auth_file: str | Path | None = None) -> tuple[ServerCredentials, str]:
    """The credentials in force, by server, and where they came from (for the log).

    Order: ``auth_file`` (``--dicomweb-auth``), ``MEDSEG_DICOMWEB_AUTH_FILE``,
    ``MEDSEG_DICOMWEB_TOKEN``, ``MEDSEG_DICOMWEB_USER`` + ``_PASSWORD``; none
    of them: no credentials. Only an auth file can give credentials for one
    server; the variables are sent to every server of the run.

    Returns:
        (server root -> credentials, as :func:`read_auth_file`; "" = every
        server; {} = none), description of the source.

    Raises:
        ValueError: an unreadable or malformed auth file; a user without a
            password (or the reverse).
    """
    environ = os.environ if environ is None else environ
    file = auth_file or environ.get(ENV_AUTH_FILE)
    if file:
        _warn_if_readable_by_others(Path(file))
        return read_auth_file(file), f"auth file {file}"
    if environ.get(ENV_TOKEN):
        if environ.get(ENV_USER):
            log.warning("both %s and %s are set: the token is used", ENV_TOKEN, ENV_USER)
        return {"": {"token": environ[ENV_TOKEN]}}, f"${ENV_TOKEN}"
    user, password = environ.get(ENV_USER), environ.get(ENV_PASSWORD)
    if user and password is not None:
        return {"": {"username": user, "password": password}}, f"${ENV_USER} / ${ENV_PASSWORD}"
    if user or password:
        raise ValueError(f"set both {ENV_USER} and {ENV_PASSWORD} (only one is set)")
    return {}, "no credentials"


def timeout_from_environment(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """(connect, read) timeouts in seconds: :data:`DEFAULT_TIMEOUT`, the read
    one replaced by ``MEDSEG_DICOMWEB_TIMEOUT`` when set.

    Raises:
        ValueError: the variable is not a positive number.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_TIMEOUT)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{ENV_TIMEOUT}={text!r}: give the seconds to wait for a server's answer (e.g. 120)")
    return (DEFAULT_TIMEOUT[0], seconds)


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it says what is wrong
    if stat.S_ISREG(mode) and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("DICOMweb auth file %s is readable by other users: chmod 600 %s", path, path)


def make_session(credentials: Mapping[str, str]):
    """A ``requests.Session`` sending the credentials (bearer token or basic auth).

    The session honours ``REQUESTS_CA_BUNDLE`` (a hospital's own certificate
    authority), ``HTTPS_PROXY`` and ``NO_PROXY``, as ``requests`` does.

    Args:
        credentials: one server's: {"token": ...}, {"username": ...,
            "password": ...} or {} (none).
    """
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    if credentials.get("token"):
        session = create_session()
        session.headers["Authorization"] = f"Bearer {credentials['token']}"
    elif credentials.get("username"):
        session = create_session_from_user_pass(credentials["username"], credentials["password"])
    else:
        session = create_session()
    adapter = _wildcard_adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.hooks["response"].append(_log_server_warning)
    return session


def _wildcards_unescaped(url: str) -> str:
    """``url`` with ``%2A`` and ``%3F`` in its query back to ``*`` and ``?``.

    dicomweb-client percent-encodes every reserved character of a query
    value; RFC 3986 (3.4) allows ``*`` and ``?`` in a query as they are, and
    Orthanc's DICOMweb plugin (1.7, Debian 12) does not decode its query
    values: ``PatientName=Smith%2A`` matched nothing there, ``Smith*`` does.
    A server that decodes sees the same value either way. (``^`` must stay
    encoded, RFC 3986: on such a server match it with ``?``.)
    """
    from urllib.parse import urlunsplit

    parts = urlsplit(url)
    if "%" not in parts.query:
        return url
    query = re.sub("%3[Ff]", "?", re.sub("%2[Aa]", "*", parts.query))
    return urlunsplit(parts._replace(query=query))


def _log_server_warning(response, *args, **kwargs) -> None:
    """Log a server's ``Warning`` header (PS3.18 6.7.1.2: a server that
    does not return all results of a search says so there), query values
    redacted."""
    text = response.headers.get("Warning")
    if not text:
        return
    for _, value in parse_qsl(urlsplit(response.url).query):
        if value:
            text = text.replace(value, "...")
    log.warning("DICOMweb server warning for %s: %s", redact_url(response.url), text[:300])


def _wildcard_adapter():
    """requests' HTTP adapter, sending queries as :func:`_wildcards_unescaped`
    writes them (requests is imported only when a session is made)."""
    from requests.adapters import HTTPAdapter

    class WildcardAdapter(HTTPAdapter):
        def send(self, request, *args, **kwargs):
            request.url = _wildcards_unescaped(request.url)
            return super().send(request, *args, **kwargs)

    return WildcardAdapter()


def _normal_root(url: str) -> str:
    """A DICOMweb root for comparison: scheme and host lower-case, default
    port dropped, no trailing slash."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:  # out of range: compared as written
        return url.strip().rstrip("/")
    if port and port != {"http": 80, "https": 443}.get(scheme):
        host += f":{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


def _covers(root: str, base: str) -> bool:
    return base == root or base.startswith(root + "/")


def _is_loopback(host: str | None) -> bool:
    import ipaddress

    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- client and errors

# HTTP statuses of a busy or restarting server: the request is tried again
# (as dicomweb-client's own retry list).
_RETRIED_STATUSES = frozenset({408, 429, 503, 504})


class Connection:
    """DICOMweb clients sharing authenticated sessions, one per server root,
    safe to use from several threads (a client per thread: requests'
    sessions are not guaranteed thread-safe).

    A request is tried :attr:`attempts` times when the connection fails or
    the server answers busy (HTTP 408/429/503/504), not when it accepted the
    request but did not answer within the read timeout (trying again would
    only wait again). After a request that got no answer, the next request
    to that server is preceded by a check (a one-study search waiting at
    most :attr:`check_timeout` seconds, made by one thread while the others
    wait for its verdict): if the server does not answer that either, it is
    given up on and every later request to it fails at once, so a server
    that went away costs one read timeout plus one check, not a wait per
    remaining scan or per reading thread. A request still unanswered after
    :attr:`still_waiting_after` seconds is logged, so a slow server is never
    a silent hang.
    """

    attempts = 3
    still_waiting_after = 15.0
    check_timeout = 10.0

    def __init__(self, credentials: Mapping | None = None, *, source: str = "no credentials",
                 timeout: float | tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        """
        Args:
            credentials: by server root, as :func:`credentials_from_environment`
                returns them ("" = every other server); one server's
                credentials alone ({"token": ...}) are for every server.
            source: where they came from, for messages.
            timeout: seconds to connect and to wait for an answer (requests'
                (connect, read) timeout).
        """
        credentials = dict(credentials or {})
        if any(key in credentials for key in ("token", "username")):
            credentials = {"": credentials}
        self.servers: dict[str, dict[str, str]] = {root.rstrip("/"): dict(value) for root, value in credentials.items()}
        self.source = source
        self.timeout = timeout
        self.answered: set[str] = set()  # roots that answered a request
        self._local = threading.local()
        self._lock = threading.Lock()
        self._unanswered: set[str] = set()  # roots whose last request got no answer
        self._gone: dict[str, str] = {}  # roots given up on -> why
        self._check_locks: dict[str, threading.Lock] = {}
        self._warned_plain_http: set[str] = set()

    @classmethod
    def from_environment(cls, auth_file: str | Path | None = None, **kwargs) -> "Connection":
        """A connection with the credentials of :func:`credentials_from_environment`
        and the timeout of :func:`timeout_from_environment`."""
        credentials, source = credentials_from_environment(auth_file=auth_file)
        kwargs.setdefault("timeout", timeout_from_environment())
        return cls(credentials, source=source, **kwargs)

    def credentials_for(self, base_url: str) -> tuple[dict[str, str], str]:
        """The credentials sent to ``base_url`` and where they came from: the
        longest server root that is ``base_url`` or above it, else "" (every
        server), else none."""
        base = _normal_root(base_url)
        matches = [root for root in self.servers if root and _covers(_normal_root(root), base)]
        if matches:
            root = max(matches, key=len)
            return self.servers[root], f"{self.source} [{root}]"
        if "" in self.servers:
            return self.servers[""], self.source
        return {}, self.source if not self.servers else f"{self.source} (no entry for {base})"

    def unmatched_sections(self, base_urls: Iterable[str]) -> list[str]:
        """The auth file's server roots that none of ``base_urls`` falls under
        (a typo there would send the default credentials instead)."""
        bases = [_normal_root(b) for b in base_urls]
        return [root for root in self.servers
                if root and not any(_covers(_normal_root(root), base) for base in bases)]

    def client(self, base_url: str):
        """This thread's ``dicomweb_client.DICOMwebClient`` for ``base_url``."""
        clients = self._local.__dict__.setdefault("clients", {})
        if base_url not in clients:
            clients[base_url] = self._new_client(base_url, self.timeout)
        return clients[base_url]

    def _new_client(self, base_url: str, timeout: float | tuple[float, float]):
        """A ``DICOMwebClient`` with ``base_url``'s credentials and no retries
        of its own (:meth:`call`'s: dicomweb-client would also retry a read
        timeout, 5 x the timeout per request to a hung server)."""
        from dicomweb_client import DICOMwebClient

        credentials, _ = self.credentials_for(base_url)
        self._warn_if_plain_http(base_url, credentials)
        client = DICOMwebClient(base_url, session=make_session(credentials), timeout=timeout)
        client.set_http_retry_params(retry=False)
        return client

    def _warn_if_plain_http(self, base_url: str, credentials: Mapping[str, str]) -> None:
        parts = urlsplit(base_url)
        if not credentials or parts.scheme.lower() != "http" or _is_loopback(parts.hostname):
            return
        with self._lock:
            if base_url in self._warned_plain_http:
                return
            self._warned_plain_http.add(base_url)
        log.warning("DICOMweb server %s is plain http: its credentials travel unencrypted; use its https:// "
                    "address", base_url)

    def call(self, base_url: str, what: str, request: Callable[..., T]) -> T:
        """``request(client)`` with its failure turned into a :class:`DicomWebError`.

        Args:
            what: the request in words ("search for instances", "retrieve
                <uid>"), for the message.

        Raises:
            DicomWebError: the server refused (HTTP 401/403: the credentials,
                named by where they came from; other statuses with the
                server's reason), answered something that is not DICOMweb,
                could not be reached or did not answer in time.
        """
        import time

        import requests

        self._ensure_answering(base_url, what)
        waiting = threading.Timer(self.still_waiting_after, log.warning, args=(
            "still waiting for DICOMweb server %s (%s) after %.0f s; it is given up on after %s s without an answer",
            base_url, what, self.still_waiting_after, self._read_timeout()))
        waiting.daemon = True
        waiting.start()
        try:
            for attempt in range(1, self.attempts + 1):
                try:
                    result = request(self.client(base_url))
                    break
                except requests.HTTPError as err:
                    status = err.response.status_code if err.response is not None else None
                    if status in _RETRIED_STATUSES and attempt < self.attempts:
                        time.sleep(0.25 * 2 ** attempt)
                        continue
                    raise DicomWebError(self._refusal(base_url, what, status, err), status=status) from None
                except requests.exceptions.SSLError as err:  # fails fast and alike each time: no check needed
                    raise DicomWebError(
                        f"DICOMweb server {base_url}: TLS connection failed ({what}: {_first_line(err)}); if the "
                        "server's certificate is from the hospital's own certificate authority, set "
                        "REQUESTS_CA_BUNDLE to that authority's certificate file", unreachable=True) from None
                except requests.exceptions.ReadTimeout:
                    self._no_answer(base_url)
                    raise DicomWebError(f"DICOMweb server {base_url} did not answer within {self._read_timeout()} s "
                                        f"({what}); if it is slow rather than gone, set {ENV_TIMEOUT}",
                                        unreachable=True) from None
                except (requests.ConnectionError, requests.Timeout) as err:
                    if attempt < self.attempts:
                        time.sleep(0.25 * 2 ** attempt)
                        continue
                    self._no_answer(base_url)
                    kind = "timed out" if isinstance(err, requests.Timeout) else "cannot connect"
                    raise DicomWebError(f"DICOMweb server {base_url} unreachable ({what}: {kind})",
                                        unreachable=True) from None
                except ValueError as err:  # a JSON or multipart body that is not DICOMweb (a login page, a proxy)
                    raise DicomWebError(f"DICOMweb server {base_url} answered something that is not DICOMweb "
                                        f"({what}: {_first_line(err)}); is {base_url} the server's DICOMweb root?"
                                        ) from None
        finally:
            waiting.cancel()
        with self._lock:
            self._unanswered.discard(base_url)
            self.answered.add(base_url)
        return result

    def check(self, base_url: str) -> None:
        """One small search (a study, ``limit=1``) to learn that ``base_url``
        answers and takes its credentials, before any work depends on it.

        Raises:
            DicomWebError: as :meth:`call`.
        """
        self.call(base_url, "check the server (search for one study)",
                  lambda c: c.search_for_studies(limit=1))

    def _read_timeout(self) -> float:
        return self.timeout[1] if isinstance(self.timeout, tuple) else self.timeout

    def _no_answer(self, base_url: str) -> None:
        with self._lock:
            self._unanswered.add(base_url)

    def _ensure_answering(self, base_url: str, what: str) -> None:
        """Raise at once for a server given up on; check a server whose last
        request got no answer (class docstring) before sending another."""
        with self._lock:
            check_lock = self._check_locks.setdefault(base_url, threading.Lock())
        with check_lock:  # one thread checks, the others wait for its verdict
            with self._lock:
                gone, unanswered = self._gone.get(base_url), base_url in self._unanswered
            if gone is None and unanswered:
                gone = self._check_answers(base_url)
        if gone is not None:
            raise DicomWebError(f"DICOMweb server {base_url} stopped answering ({gone}): not tried ({what}); run "
                                "again when it is back", unreachable=True)

    def _check_answers(self, base_url: str) -> str | None:
        """One study search with a short read timeout; None if the server
        answered anything (even a refusal), else why it is given up on."""
        import requests

        connect = self.timeout[0] if isinstance(self.timeout, tuple) else self.timeout
        read = min(self._read_timeout(), self.check_timeout)
        try:
            self._new_client(base_url, (connect, read)).search_for_studies(limit=1)
        except (requests.HTTPError, ValueError):
            pass  # an answer: the server is there (what it refuses, the request itself says)
        except requests.RequestException:
            why = f"a request got no answer, nor a check {read:g} s long after it"
            with self._lock:
                self._gone[base_url] = why
            log.warning("DICOMweb server %s stopped answering: the scans still to read from it or store on it fail "
                        "at once (listed in failures.csv); run the same command again when it is back", base_url)
            return why
        with self._lock:
            self._unanswered.discard(base_url)
        return None

    def _refusal(self, base_url: str, what: str, status: int | None, err: Exception) -> str:
        if status in (401, 403):
            word = "Unauthorized" if status == 401 else "Forbidden"
            credentials, source = self.credentials_for(base_url)
            if credentials:
                return (f"DICOMweb server {base_url} refused the credentials from {source} (HTTP {status} "
                        f"{word}) while trying to {what}: check them")
            if self.servers:  # an auth file whose sections are all for other servers
                return (f"DICOMweb server {base_url} needs credentials (HTTP {status} {word}) while trying to "
                        f"{what}: {self.source} has no section for it and no credentials before its first section; "
                        f"add [{base_url}] with its credentials")
            return (f"DICOMweb server {base_url} needs credentials (HTTP {status} {word}) while trying to {what}: "
                    f"set {ENV_TOKEN}, or {ENV_USER} and {ENV_PASSWORD}, or an auth file ({ENV_AUTH_FILE} or "
                    "--dicomweb-auth)")
        reason = getattr(getattr(err, "response", None), "reason", "") or ""
        message = f"DICOMweb server {base_url} answered HTTP {status} {reason}".rstrip() + f" while trying to {what}"
        with self._lock:
            answered_before = base_url in self.answered
        if status in (400, 404, 405) and not answered_before:  # often the web server's root, not its DICOMweb one
            message += (f"; is {base_url} the server's DICOMweb root? (Orthanc: http://<host>:8042/dicom-web, "
                        "dcm4chee: .../dcm4chee-arc/aets/<AE>/rs)")
        return message


def _first_line(err: Exception) -> str:
    """The first line of an exception from requests, its URLs' query values
    redacted (a search may be by patient: ``PatientID=...``)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    line = re.sub(r"([?&][^=&\s'\")]+)=[^&\s'\")]*", r"\1=...", line)
    return line[:200]


__all__ = ["Connection", "DEFAULT_TIMEOUT", "DicomWebError", "DicomWebSource", "ENV_AUTH_FILE", "ENV_PASSWORD",
           "ENV_TIMEOUT", "ENV_TOKEN", "ENV_USER", "Level", "REQUIRED_MATCHING", "ServerCredentials",
           "credentials_from_environment",
           "instance_url", "is_dicomweb_source", "make_session", "read_auth_file", "redact_url",
           "timeout_from_environment"]
