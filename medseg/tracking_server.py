"""Running a shared MLflow tracking server for a team: PostgreSQL holds runs,
metrics and the model registry; the server stores artifacts and serves them
(``mlflow server --serve-artifacts``), so clients need only its HTTP address.

Layout of a data directory (``medseg tracking-server --data-dir DIR``)::

    DIR/postgres/        PostgreSQL cluster (initdb'd on first start)
    DIR/artifacts/       artifact store (unless --artifacts-destination says otherwise)
    DIR/logs/            postgres.log, mlflow.log

PostgreSQL refuses to run as root: as root, its commands run as the
``postgres`` user (``runuser``) and the cluster directory belongs to it. It
listens on loopback only (TCP, trust authentication, no Unix socket), so only
programs on the same host (the mlflow server) can reach it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from threading import Event

log = logging.getLogger(__name__)

POSTGRES_USER = "postgres"  # both the OS account (when root) and the database superuser
POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres")
POSTGRES_HINT = ("install PostgreSQL: Debian/Ubuntu `apt-get install postgresql` (or run "
                 "scripts/install-system-packages.sh as root), conda `conda install -c conda-forge postgresql`")


class TrackingServerError(RuntimeError):
    """The tracking server (or its PostgreSQL) cannot be set up, started or reached."""


class PostgresNotFound(TrackingServerError):
    """No PostgreSQL server programs (initdb, pg_ctl, postgres) on this machine."""


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL cluster started by :func:`start_postgres`.

    Attributes:
        data_dir: the cluster directory.
        port: TCP port on ``host``.
        bin_dir: folder of the PostgreSQL programs used.
        log_file: the server log.
        host: listening address.
    """

    data_dir: Path
    port: int
    bin_dir: Path
    log_file: Path
    host: str = "127.0.0.1"

    def uri(self, database: str = "mlflow") -> str:
        """SQLAlchemy URI of ``database`` (as the superuser, trust authentication)."""
        return f"postgresql://{POSTGRES_USER}@{self.host}:{self.port}/{database}"


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", bin_dir.parent.name)
    return tuple(int(n) for n in numbers) or (0,)


def find_postgres_bin_dir() -> Path:
    """Folder holding initdb, pg_ctl and postgres.

    Looks at ``initdb`` on PATH (symlinks resolved: Debian keeps the programs
    in /usr/lib/postgresql/<version>/bin), then the newest
    /usr/lib/postgresql/*/bin.

    Raises:
        PostgresNotFound: with the package that provides them.
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if all((directory / program).exists() for program in POSTGRES_PROGRAMS):
            return directory
    raise PostgresNotFound(f"PostgreSQL server programs ({', '.join(POSTGRES_PROGRAMS)}) not found on PATH "
                           f"or in /usr/lib/postgresql/*/bin; {POSTGRES_HINT}")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_owner(command: list[str]) -> list[str]:
    """``command`` run as the ``postgres`` account when we are root."""
    if not _running_as_root():
        return command
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser is None:
        raise TrackingServerError("running as root, but `runuser` (util-linux) is missing: PostgreSQL must run as "
                                  f"the {POSTGRES_USER!r} user")
    return [runuser, "-u", POSTGRES_USER, "--", *command]


def _hand_to_owner(path: Path) -> None:
    """As root: give ``path`` to the postgres account (no-op otherwise)."""
    if not _running_as_root():
        return
    try:
        shutil.chown(path, POSTGRES_USER, POSTGRES_USER)
    except LookupError as err:
        raise TrackingServerError(f"running as root, but there is no {POSTGRES_USER!r} user to run PostgreSQL "
                                  f"(the Debian package creates it; or run as an ordinary user)") from err


def _run(command: list[str], what: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()[-1500:]
        raise TrackingServerError(f"{what} failed (exit {proc.returncode}): {output}")
    return proc


def _log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def init_postgres(data_dir: str | Path, bin_dir: Path | None = None) -> bool:
    """Create a PostgreSQL cluster in ``data_dir`` unless one is there.

    Superuser ``postgres``, trust authentication (the server listens on
    loopback only, see :func:`start_postgres`), UTF-8.

    Returns:
        True if a cluster was created, False if ``data_dir`` already held one.

    Raises:
        PostgresNotFound: no PostgreSQL programs.
        TrackingServerError: initdb failed, or (as root) the postgres user
            cannot reach ``data_dir``.
    """
    data_dir = Path(data_dir).resolve()
    if (data_dir / "PG_VERSION").exists():
        return False
    bin_dir = bin_dir or find_postgres_bin_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    _hand_to_owner(data_dir)
    if _running_as_root() and subprocess.run(_as_owner(["test", "-w", str(data_dir)])).returncode != 0:
        raise TrackingServerError(f"the {POSTGRES_USER} user cannot write {data_dir}: every folder above it must be "
                                  "searchable by others (chmod o+x), e.g. use a data dir outside /root")
    _run(_as_owner([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", POSTGRES_USER,
                    "-E", "UTF8", "--locale", "C"]), f"initdb {data_dir}")
    log.info("created PostgreSQL cluster in %s", data_dir)
    return True


def postgres_running(data_dir: str | Path, bin_dir: Path | None = None) -> bool:
    """Whether a PostgreSQL server runs on ``data_dir`` (``pg_ctl status``)."""
    bin_dir = bin_dir or find_postgres_bin_dir()
    proc = subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(Path(data_dir).resolve()), "status"]),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def start_postgres(data_dir: str | Path, port: int, log_file: str | Path | None = None,
                   bin_dir: Path | None = None, host: str = "127.0.0.1", timeout_s: int = 60) -> PostgresServer:
    """Start the cluster in ``data_dir`` (made by :func:`init_postgres`) on ``host:port``.

    TCP only (no Unix socket, so long paths do not matter); the postmaster
    runs in its own session, so a Ctrl-C meant for the caller does not reach
    it. Waits until it accepts connections.

    Raises:
        TrackingServerError: it did not start (the message quotes its log).
    """
    data_dir = Path(data_dir).resolve()
    bin_dir = bin_dir or find_postgres_bin_dir()
    log_file = Path(log_file).resolve() if log_file else data_dir.parent / "postgres.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.touch()
    _hand_to_owner(log_file)
    if postgres_running(data_dir, bin_dir):
        raise TrackingServerError(f"a PostgreSQL server already runs on {data_dir}; stop it first "
                                  f"(pg_ctl -D {data_dir} stop)")
    options = f"-p {int(port)} -c listen_addresses={host} -c unix_socket_directories=''"
    proc = subprocess.run(
        _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file), "-o", options,
                   "-w", "-t", str(timeout_s), "start"]),
        capture_output=True, text=True, start_new_session=True, stdin=subprocess.DEVNULL, timeout=timeout_s + 30,
    )
    if proc.returncode != 0:
        raise TrackingServerError(f"PostgreSQL did not start on {host}:{port} (see {log_file}): "
                                  f"{(proc.stderr or proc.stdout).strip()[-500:]}\n{_log_tail(log_file)}")
    log.info("PostgreSQL %s on %s:%d (log %s)", data_dir, host, port, log_file)
    return PostgresServer(data_dir=data_dir, port=int(port), bin_dir=bin_dir, log_file=log_file, host=host)


def stop_postgres(server: PostgresServer, mode: str = "fast", timeout_s: int = 60) -> bool:
    """Stop the cluster (``pg_ctl stop -m fast|smart|immediate``).

    Returns:
        True if it was running and has stopped, False if it was not running.

    Raises:
        TrackingServerError: it did not stop in time.
    """
    if not postgres_running(server.data_dir, server.bin_dir):
        return False
    _run(_as_owner([str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", mode, "-w",
                    "-t", str(timeout_s), "stop"]), f"stopping PostgreSQL {server.data_dir}", timeout_s + 30)
    return True


def create_database(server: PostgresServer, name: str = "mlflow") -> bool:
    """Create database ``name`` unless it exists.

    Returns:
        True if it was created.
    """
    import psycopg2
    from psycopg2 import sql

    connection = psycopg2.connect(host=server.host, port=server.port, user=POSTGRES_USER, dbname="postgres",
                                  connect_timeout=10)
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone():
                return False
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True
    finally:
        connection.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (connections in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_mlflow_server(backend_store_uri: str, artifacts_destination: str | Path, host: str = "127.0.0.1",
                        port: int = 5000, workers: int = 2, log_file: str | Path | None = None,
                        extra_args: list[str] | None = None) -> subprocess.Popen:
    """Start ``mlflow server --serve-artifacts`` in its own session.

    Args:
        backend_store_uri: e.g. ``postgresql://user@host:5432/mlflow``.
        artifacts_destination: a local folder, or a URI such as ``s3://bucket/path``.
        host, port: where it listens (``0.0.0.0`` for a team).
        workers: server worker processes.
        log_file: its stdout and stderr (default: discarded).
        extra_args: more ``mlflow server`` options (e.g. ``--allowed-hosts``).

    Returns:
        The process; stop it with :func:`stop_process_group`.
    """
    destination = str(artifacts_destination)
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
        destination = str(Path(destination).resolve())
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", destination, "--serve-artifacts", "--host", host, "--port", str(port),
               "--workers", str(workers), *(extra_args or [])]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        output = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    else:
        output = subprocess.DEVNULL
    try:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        if log_file:
            output.close()


def wait_until_healthy(url: str, timeout_s: float = 120, process: subprocess.Popen | None = None,
                       log_file: str | Path | None = None, stop: Event | None = None) -> bool:
    """Wait until ``GET <url>/health`` answers 200.

    Returns:
        True once healthy; False if ``stop`` was set first.

    Raises:
        TrackingServerError: ``process`` exited, or ``timeout_s`` passed; the
            message names ``log_file`` and quotes its end.
    """
    where = f" (log: {log_file})" if log_file else ""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            tail = _log_tail(Path(log_file)) if log_file else ""
            raise TrackingServerError(f"mlflow server exited with status {process.returncode} before {url} was "
                                      f"healthy{where}\n{tail}")
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=3) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        if stop is not None and stop.is_set():
            return False
        if time.monotonic() > deadline:
            tail = _log_tail(Path(log_file)) if log_file else ""
            raise TrackingServerError(f"mlflow server at {url} not healthy after {timeout_s:.0f} s{where}\n{tail}")
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM the process's group (it was started in its own session), then
    SIGKILL if it is still there after ``timeout_s``. Returns its exit status."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    return process.returncode


def _all_interfaces(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def advertised_url(host: str, port: int) -> str:
    """The address clients use: the machine's name when listening on all interfaces."""
    if _all_interfaces(host):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


def serve(data_dir: str | Path, host: str = "127.0.0.1", port: int = 5000, postgres_port: int | None = None,
          backend_store_uri: str | None = None, artifacts_destination: str | None = None, workers: int = 2,
          extra_args: list[str] | None = None, stop: Event | None = None) -> int:
    """Run a team tracking server in the foreground until SIGINT/SIGTERM (or ``stop`` is set).

    Without ``backend_store_uri``: initialises (first time) and starts
    PostgreSQL in ``data_dir/postgres`` on ``postgres_port`` (5432 if free,
    else any free port), creates database ``mlflow``, then starts ``mlflow
    server``. On the way out, stops mlflow, then PostgreSQL.

    Returns:
        0 after a requested stop, 1 if the mlflow server died by itself.

    Raises:
        TrackingServerError: something could not start (anything started is stopped first).
    """
    bind_host = "0.0.0.0" if _all_interfaces(host) else host
    if not port_is_free(port, bind_host):
        raise TrackingServerError(f"port {port} on {host} is in use: is a tracking server already running? "
                                  "(choose another with --port)")
    data_dir = Path(data_dir).resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = stop or Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    postgres: PostgresServer | None = None
    mlflow_server: subprocess.Popen | None = None
    try:
        if backend_store_uri is None:
            bin_dir = find_postgres_bin_dir()
            if init_postgres(data_dir / "postgres", bin_dir):
                log.info("initialised PostgreSQL in %s", data_dir / "postgres")
            if postgres_port is None:
                postgres_port = 5432 if port_is_free(5432) else free_port()
            postgres = start_postgres(data_dir / "postgres", postgres_port, logs / "postgres.log", bin_dir)
            if create_database(postgres, "mlflow"):
                log.info("created database mlflow")
            backend_store_uri = postgres.uri("mlflow")
        destination = artifacts_destination or str(data_dir / "artifacts")
        url = f"http://{'127.0.0.1' if _all_interfaces(host) else host}:{port}"
        mlflow_server = start_mlflow_server(backend_store_uri, destination, host, port, workers,
                                            logs / "mlflow.log", extra_args)
        log.info("starting mlflow server (backend %s, artifacts %s; log %s)", _hide_password(backend_store_uri),
                 destination, logs / "mlflow.log")
        if not wait_until_healthy(url, 180, mlflow_server, logs / "mlflow.log", stop):
            return 0  # told to stop while it was starting
        print(f"MLflow tracking server ready. Users: export MLFLOW_TRACKING_URI={advertised_url(host, port)}",
              flush=True)
        while not stop.wait(1.0):
            if mlflow_server.poll() is not None:
                log.error("mlflow server exited with status %s (log %s)", mlflow_server.returncode,
                          logs / "mlflow.log")
                return 1
        log.info("stopping")
        return 0
    finally:
        if mlflow_server is not None:
            stop_process_group(mlflow_server)
        if postgres is not None:
            try:
                stop_postgres(postgres)
            except TrackingServerError as err:
                log.error("%s", err)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _hide_password(uri: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)
