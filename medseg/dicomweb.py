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
(``.../studies/1.2.3?Modality=CR``).

**Credentials** never come from the command line (it ends up in shell
history, ``ps`` and logs) and never in the URL: :func:`session_from_environment`
reads them from the environment or a file:

- ``MEDSEG_DICOMWEB_TOKEN``: a bearer token (``Authorization: Bearer ...``);
- ``MEDSEG_DICOMWEB_USER`` and ``MEDSEG_DICOMWEB_PASSWORD``: HTTP basic auth;
- ``MEDSEG_DICOMWEB_AUTH_FILE`` (or ``--dicomweb-auth FILE``): a file of
  ``key = value`` lines with ``token``, or ``username`` and ``password``
  (``#`` starts a comment).

Query values can be patient data (``PatientID=...``): logs show a source as
:func:`DicomWebSource.display`, which names the query's keys, not its values.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

# dicomweb-client logs every request's URL at INFO, query values included
# (which can be patient data): only its warnings reach medseg's logs.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"
ENV_USER = "MEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"
ENV_AUTH_FILE = "MEDSEG_DICOMWEB_AUTH_FILE"
# Seconds to connect, and to wait for a response: a server that went away
# is noticed in seconds, a slow WADO-RS of a large image still finishes.
DEFAULT_TIMEOUT = (10.0, 300.0)

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


def _is_attribute(key: str) -> bool:
    """A QIDO-RS filter key: a DICOM keyword or 8-digit hex tag, or a dotted
    sequence path of them (PS3.18 8.3.4.1)."""
    import re

    from pydicom.datadict import tag_for_keyword

    return all(tag_for_keyword(part) is not None or re.fullmatch(r"[0-9A-Fa-f]{8}", part)
               for part in key.split("."))


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
        filters = dict(parse_qsl(parts.query, keep_blank_values=True))
        paging = sorted(k for k in filters if k.lower() in _NOT_FILTERS)
        if paging:
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(paging)} is not a search filter; medseg "
                             "reads every result of a search, page by page (narrow it with attribute filters, e.g. "
                             "StudyDate=20240101-20240131)")
        unknown = sorted(k for k in filters if not _is_attribute(k))
        if unknown:  # a server ignores a key it does not know: the search would match everything
            raise ValueError(f"DICOMweb URL {redact_url(text)}: {', '.join(unknown)} is not a DICOM attribute "
                             "keyword or tag (keywords are case-sensitive: StudyDate, Modality, ModalitiesInStudy, "
                             "AccessionNumber, ...)")
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
            if position >= len(expected) or pair[0] != expected[position]:
                break
            if len(pair) == 1:  # ".../studies/<uid>/series?..." : a search within the study
                if pair[0] == "series" or pair[0] == "instances":
                    return cls(base, Level(pair[0]), study=uids.get("studies"), series=uids.get("series"),
                               filters=filters)
                break
            uids[pair[0]] = pair[1]
        else:
            return cls(base, None, study=uids.get("studies"), series=uids.get("series"),
                       instance=uids.get("instances"), filters=filters)
        raise ValueError(f"DICOMweb URL {redact_url(text)}: expected <root>/studies/<uid>[/series/<uid>"
                         "[/instances/<uid>]] or a search (<root>/studies?..., /series?..., /instances?...)")

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
    """A URL without credentials or query values (for error messages)."""
    parts = urlsplit(str(text))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = "&".join(f"{k}=..." for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def instance_url(base_url: str, study: str, series: str, instance: str) -> str:
    """The WADO-RS URL of one instance (PS3.18 10.4)."""
    return f"{base_url}/studies/{study}/series/{series}/instances/{instance}"


# --------------------------------------------------------------------------- credentials


def read_auth_file(path: str | Path) -> dict[str, str]:
    """Credentials from a ``key = value`` file (module docstring).

    Returns:
        {"token": ...} or {"username": ..., "password": ...}.

    Raises:
        ValueError: the file cannot be read, has another key, or holds
            neither a token nor a username with a password (the message never
            quotes a value).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"DICOMweb auth file {path}: cannot read it ({err.strerror or err})") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("token", "username", "password"):
            raise ValueError(f"DICOMweb auth file {path}, line {number}: expected 'token = ...', "
                             "'username = ...' or 'password = ...'")
        values[key] = value.strip()
    if values.get("token"):
        return {"token": values["token"]}
    if values.get("username") and "password" in values:
        return {"username": values["username"], "password": values["password"]}
    raise ValueError(f"DICOMweb auth file {path}: needs 'token = ...', or 'username = ...' and 'password = ...'")


def credentials_from_environment(environ: Mapping[str, str] | None = None,
                                 auth_file: str | Path | None = None) -> tuple[dict[str, str], str]:
    """The credentials in force and where they came from (for the log).

    Order: ``auth_file`` (``--dicomweb-auth``), ``MEDSEG_DICOMWEB_AUTH_FILE``,
    ``MEDSEG_DICOMWEB_TOKEN``, ``MEDSEG_DICOMWEB_USER`` + ``_PASSWORD``; none
    of them: no credentials.

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
        return {"token": environ[ENV_TOKEN]}, f"${ENV_TOKEN}"
    user, password = environ.get(ENV_USER), environ.get(ENV_PASSWORD)
    if user and password is not None:
        return {"username": user, "password": password}, f"${ENV_USER} / ${ENV_PASSWORD}"
    if user or password:
        raise ValueError(f"set both {ENV_USER} and {ENV_PASSWORD} (only one is set)")
    return {}, "no credentials"


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it says what is wrong
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("DICOMweb auth file %s is readable by other users: chmod 600 %s", path, path)


def make_session(credentials: Mapping[str, str]):
    """A ``requests.Session`` sending the credentials (bearer token or basic auth).

    Args:
        credentials: as :func:`credentials_from_environment` returns.
    """
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    if credentials.get("token"):
        session = create_session()
        session.headers["Authorization"] = f"Bearer {credentials['token']}"
        return session
    if credentials.get("username"):
        return create_session_from_user_pass(credentials["username"], credentials["password"])
    return create_session()


# --------------------------------------------------------------------------- client and errors


class Connection:
    """DICOMweb clients sharing one authenticated session, one per server
    root, safe to use from several threads (a client per thread: requests'
    sessions are not guaranteed thread-safe).

    After :attr:`give_up_after` consecutive requests that could not reach a
    server, later requests to it fail at once (a server that went away is not
    waited for once per remaining scan).
    """

    give_up_after = 3
    attempts = 3

    def __init__(self, credentials: Mapping[str, str] | None = None, *, source: str = "no credentials",
                 timeout: float | tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self.credentials = dict(credentials or {})
        self.source = source
        self.timeout = timeout
        self._local = threading.local()
        self._unreachable: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, auth_file: str | Path | None = None, **kwargs) -> "Connection":
        """A connection with the credentials of :func:`credentials_from_environment`."""
        credentials, source = credentials_from_environment(auth_file=auth_file)
        return cls(credentials, source=source, **kwargs)

    def client(self, base_url: str):
        """This thread's ``dicomweb_client.DICOMwebClient`` for ``base_url``."""
        from dicomweb_client import DICOMwebClient

        clients = self._local.__dict__.setdefault("clients", {})
        if base_url not in clients:
            client = DICOMwebClient(base_url, session=make_session(self.credentials), timeout=self.timeout)
            # dicomweb-client retries any failed request 5 times, backing off
            # 2 + 4 + 8 + 16 s: 30 s per request to a server that went away.
            # Three tries 0.5 s and 1 s apart still ride out a busy server
            # (HTTP 429/503).
            client.set_http_retry_params(max_attempts=self.attempts, wait_exponential_multiplier=250)
            clients[base_url] = client
        return clients[base_url]

    def call(self, base_url: str, what: str, request: Callable[..., T]) -> T:
        """``request(client)`` with its failure turned into a :class:`DicomWebError`.

        Args:
            what: the request in words ("search for instances", "retrieve
                <uid>"), for the message.

        Raises:
            DicomWebError: the server refused (HTTP 401/403: the credentials,
                named by where they came from; other statuses with the
                server's reason) or could not be reached.
        """
        import requests

        with self._lock:
            failures = self._unreachable.get(base_url, 0)
        if failures >= self.give_up_after:
            raise DicomWebError(f"DICOMweb server {base_url} did not answer {failures} requests in a row: not "
                                f"tried ({what}); run again when it is back", unreachable=True)
        try:
            result = request(self.client(base_url))
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else None
            raise DicomWebError(self._refusal(base_url, what, status, err), status=status) from None
        except (requests.ConnectionError, requests.Timeout) as err:
            with self._lock:
                self._unreachable[base_url] = self._unreachable.get(base_url, 0) + 1
            kind = "timed out" if isinstance(err, requests.Timeout) else "cannot connect"
            raise DicomWebError(f"DICOMweb server {base_url} unreachable ({what}: {kind})",
                                unreachable=True) from None
        with self._lock:
            self._unreachable[base_url] = 0
        return result

    def _refusal(self, base_url: str, what: str, status: int | None, err: Exception) -> str:
        if status in (401, 403):
            word = "Unauthorized" if status == 401 else "Forbidden"
            if self.credentials:
                return (f"DICOMweb server {base_url} refused the credentials from {self.source} (HTTP {status} "
                        f"{word}) while trying to {what}: check them")
            return (f"DICOMweb server {base_url} needs credentials (HTTP {status} {word}) while trying to {what}: "
                    f"set {ENV_TOKEN}, or {ENV_USER} and {ENV_PASSWORD}, or an auth file ({ENV_AUTH_FILE} or "
                    "--dicomweb-auth)")
        reason = getattr(getattr(err, "response", None), "reason", "") or ""
        return f"DICOMweb server {base_url} answered HTTP {status} {reason} while trying to {what}".rstrip()


__all__ = ["Connection", "DEFAULT_TIMEOUT", "DicomWebError", "DicomWebSource", "ENV_AUTH_FILE", "ENV_PASSWORD",
           "ENV_TOKEN", "ENV_USER", "Level", "credentials_from_environment", "instance_url", "is_dicomweb_source",
           "make_session", "read_auth_file", "redact_url"]
