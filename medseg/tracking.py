"""MLflow tracking: where runs go, what they carry, and what happens when the
tracking server is unreachable.

Default store: an embedded SQLite database (``results/mlflow.db``) with
artifacts beside it; ``MLFLOW_TRACKING_URI`` (or an explicit URI) overrides,
e.g. a team's ``http://mlflow.example:5000`` server.

Unreachable server policy:
- at start: fail fast with a message naming the URI (:class:`TrackingUnavailable`),
  before any training work;
- during a run: training goes on; the first failed call is reported, later
  calls are skipped, and everything stays on disk (checkpoints,
  ``metrics.csv``, pictures) in the run's output folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("results") / "mlflow.db"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or used."""


def default_tracking_uri(explicit: str | None = None) -> str:
    """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else the SQLite default."""
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists become their text."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD commit of the repository holding this package, or "unknown"."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def client_for(tracking_uri: str):
    """An MlflowClient whose model registry is the same store.

    (Without an explicit registry URI, MLflow takes the process-wide one,
    which may point at another store.)
    """
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def _fail_fast_http(timeout_s: float):
    """No retries and a short timeout for the first request: MLflow's HTTP
    client otherwise retries for minutes before saying the server is gone.
    Later requests get the run's retry settings back."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect(tracking_uri: str, experiment: str, timeout_s: float = 10.0) -> str:
    """Point MLflow at ``tracking_uri`` and make sure ``experiment`` exists.

    Returns:
        The experiment ID.

    Raises:
        TrackingUnavailable: the store cannot be reached (fails in about
            ``timeout_s``, not after MLflow's long retry schedule).
    """
    import mlflow

    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = client_for(tracking_uri)
    # During the run: a few quick retries, then RunLogger goes offline (MLflow's
    # own default backs off for minutes per call). User settings win.
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(key, value)
    try:
        with _fail_fast_http(timeout_s):
            found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        # With the embedded store, keep artifacts beside the database rather
        # than in ./mlruns of whatever directory the job runs in.
        location = (db.parent / "mlartifacts" / experiment).resolve().as_uri() if db is not None else None
        return client.create_experiment(experiment, artifact_location=location)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for connection problems
        if "already exists" in str(err):  # a parallel fold job created it first
            return client.get_experiment_by_name(experiment).experiment_id
        raise TrackingUnavailable(
            f"MLflow tracking store {tracking_uri} cannot be used: {type(err).__name__}: {str(err)[:300]}. "
            "Start the server (or fix MLFLOW_TRACKING_URI), or unset MLFLOW_TRACKING_URI to use the "
            "embedded SQLite store."
        ) from err


class RunLogger:
    """Logs to one MLflow run; after the first failure, stops trying and
    says so once (training continues, results stay on disk)."""

    def __init__(self, run_id: str, local_dir: Path) -> None:
        self.run_id = run_id
        self.local_dir = local_dir
        self.offline = False

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if self.offline:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracking failure is non-fatal mid-run
            self.offline = True
            log.error(
                "MLflow %s failed (%s: %s). Training goes on without tracking; checkpoints, "
                "metrics.csv and pictures are kept in %s.", what, type(err).__name__, str(err)[:200], self.local_dir,
            )
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None and v == v}
        self._call("log_metrics", mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        self._call("log_artifact", mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        self._call("set_tags", mlflow.set_tags, dict(tags))

    def call(self, what: str, fn, *args, **kwargs) -> Any:
        """Run any MLflow call under the same failure policy."""
        return self._call(what, fn, *args, **kwargs)
