"""A real Orthanc DICOM server with its DICOMweb plugin, for the DICOMweb
pull (QIDO-RS, WADO-RS) and push (STOW-RS) tests.

Debian's packages ``orthanc`` and ``orthanc-dicomweb`` (installed by
scripts/install-system-packages.sh; ``require_orthanc`` installs them or skips,
failing instead under MEDSEG_REQUIRE_ALL_TESTS=1). Each server has its own
configuration, storage and index in a temporary folder, and its HTTP port on
loopback; the Debian package's own configuration (/etc/orthanc) and system
service are not used.

Usage, in a test module::

    from orthanc_server import OrthancServer, orthanc, orthanc_factory  # fixtures

    def test_pull(orthanc):                 # a started server, no authentication
        orthanc.upload(paths)
        DICOMwebClient(orthanc.dicomweb_url).search_for_instances()

    def test_auth(orthanc_factory):         # more servers, or with users
        server = orthanc_factory(users={"alice": "secret"})

``server.stop()`` then ``server.start()`` restarts it on the same port and
storage (a PACS that goes away mid-batch and comes back, its data kept).

Orthanc 1.10 cannot be told which address to listen on: it listens on all
interfaces, but with ``RemoteAccessAllowed: false`` it answers only requests
from loopback (HTTP 403 otherwise).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import requests
from services import _install_attempt, require_programs, skip_or_fail

from medseg.tracking_server import free_port

__all__ = ["DICOMWEB_PLUGIN", "OrthancServer", "orthanc", "orthanc_factory", "require_orthanc"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STARTUP_TIMEOUT_S = 60.0


def require_orthanc() -> str:
    """Path of the Orthanc binary with the DICOMweb plugin present, installing
    the Debian packages if needed; skips (fails under the CI switch) otherwise."""
    binary = require_programs("Orthanc")["Orthanc"]
    if not DICOMWEB_PLUGIN.is_file():
        why = _install_attempt()
        if not DICOMWEB_PLUGIN.is_file():
            skip_or_fail(f"the Orthanc DICOMweb plugin ({DICOMWEB_PLUGIN}) not found and could not be installed "
                         f"({why or 'not in the packages'}); run scripts/install-system-packages.sh as root")
    return binary


class OrthancServerError(RuntimeError):
    """Orthanc did not start (the message ends with its log's tail)."""


class _PortTaken(Exception):
    pass


class OrthancServer:
    """An Orthanc server with DICOMweb on 127.0.0.1, its files in ``workdir``.

    Args:
        workdir: created if missing; holds ``orthanc.json``, ``orthanc.log``,
            ``storage/`` and ``index/``.
        users: HTTP basic-auth users (name -> password); authentication is on
            if given, off otherwise (there are no default users).
        binary: the Orthanc program; default: :func:`require_orthanc`.
        start: start it now (else call :meth:`start`, or use ``with``).
    """

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, *, binary: str | None = None,
                 start: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users) if users else None
        self.binary = binary or require_orthanc()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._started_once = False
        self._write_config()
        if start:
            self.start()

    # -- addresses and credentials -----------------------------------------

    @property
    def url(self) -> str:
        """The REST API, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), ``url + "/dicom-web"``."""
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first user's (name, password) for ``requests``, None without users."""
        return next(iter(self.users.items())) if self.users else None

    def session(self) -> requests.Session:
        """A ``requests`` session with :attr:`auth` (for DICOMwebClient(session=...))."""
        session = requests.Session()
        session.auth = self.auth
        return session

    def dicomweb_client(self):
        """A ``dicomweb_client`` DICOMwebClient on :attr:`dicomweb_url`, with :attr:`auth`."""
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.dicomweb_url, session=self.session())

    # -- configuration --------------------------------------------------------

    def config(self) -> dict:
        """The configuration written to ``orthanc.json`` (option names as in
        /etc/orthanc/orthanc.json and dicomweb.json of Orthanc 1.10.1 /
        DICOMweb plugin 1.7)."""
        return {
            "Name": f"medseg-test-{self.port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "HttpDescribeErrors": True,
            "HttpCompressionEnabled": False,
            "RemoteAccessAllowed": False,  # only loopback is answered
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users or {},
            "SslEnabled": False,
            "DicomServerEnabled": False,  # no DIMSE port
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "MetricsEnabled": False,
            "ExecuteLuaEnabled": False,
            "LuaScripts": [],
            "DicomModalities": {},
            "OrthancPeers": {},
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 20,
            "StableAge": 1,  # seconds before a series/study is "stable"
            "OverwriteInstances": False,
            "StorageCompression": False,
            "SyncStorageArea": False,  # no fsync per file: a test server
            "DeidentifyLogs": False,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                # RetrieveURLs (QIDO, STOW) are built on this; without it, on the request's
                # Host header, which dicomweb-client sends without the port.
                "Host": f"127.0.0.1:{self.port}",
            },
        }

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")

    # -- life cycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> OrthancServer:
        """Start Orthanc (again: same port, same storage) and wait until its
        REST API answers ``GET /system``."""
        if self.running:
            return self
        for attempt in range(3):
            try:
                self._start(timeout)
                self._started_once = True
                return self
            except BaseException as error:
                self.stop()  # never leave it running half-started (e.g. Ctrl-C)
                if not isinstance(error, _PortTaken):
                    raise
                if self._started_once or attempt == 2:
                    raise OrthancServerError(f"port {self.port} is taken:\n{self.log_tail()}") from None
                self.port = free_port()  # someone took it between free_port() and now: another port
                self._write_config()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> None:
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting {self.binary} {self.config_path}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [self.binary, str(self.config_path)], cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                with open(self.log_path, "rb") as log:
                    log.seek(log_start)
                    if b"HTTP server is privileged or already in use" in log.read():
                        raise _PortTaken
                raise OrthancServerError(f"Orthanc exited with status {code} while starting:\n{self.log_tail()}")
            try:
                response = requests.get(f"{self.url}/system", auth=self.auth, timeout=2)
                if response.status_code == 200 and response.json().get("Name") == self.config()["Name"]:
                    return  # this Orthanc, not something else on the port
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OrthancServerError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s:\n"
                                         f"{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0, *, kill: bool = False) -> None:
        """Terminate Orthanc (SIGTERM, SIGKILL after ``timeout``) and wait for
        it (about 2 s: its HTTP server's shutdown). ``kill``: SIGKILL at once,
        a crash (what it had stored stays: SQLite index)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OrthancServer({self.url}, workdir={str(self.workdir)!r}, running={self.running})"

    # -- data ---------------------------------------------------------------------

    def upload(self, paths: Iterable[str | Path]) -> list[str]:
        """POST each DICOM file to ``/instances`` (Orthanc's REST API, not
        STOW-RS); the Orthanc instance IDs, in order. Raises
        ``requests.HTTPError`` on a refusal."""
        ids = []
        for path in paths:
            response = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth,
                                     headers={"Content-Type": "application/dicom"}, timeout=60)
            response.raise_for_status()
            ids.append(response.json()["ID"])
        return ids

    def instance_uids(self) -> set[str]:
        """The SOP Instance UIDs stored now (through the REST API)."""
        ids = self._get("/instances")
        return {self._get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ids}

    def _get(self, path: str):
        response = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """``make(users=None, name=None) -> OrthancServer``, started, in
    ``tmp_path / name`` (default ``orthanc``, ``orthanc1``, ...); every server
    made is stopped at teardown."""
    servers: list[OrthancServer] = []
    binary = require_orthanc()

    def make(users: dict[str, str] | None = None, name: str | None = None) -> OrthancServer:
        server = OrthancServer(tmp_path / (name or f"orthanc{len(servers) or ''}"), users=users, binary=binary)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop(kill=True)  # its storage is thrown away: no 2 s clean shutdown per test


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A started Orthanc with DICOMweb, no authentication, in ``tmp_path/orthanc``."""
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop(kill=True)  # its storage is thrown away: no 2 s clean shutdown per test
