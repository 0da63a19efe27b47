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
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Mapping, Sequence
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
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists become their text.

    Unset values (None) are left out: MLflow would show the string "None",
    which reads as a setting; a missing parameter shows as "-".
    """
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = str(value)
    return flat


# Training history keys (metrics.csv, checkpoints) -> MLflow metric names.
# Grouped by "/" prefix so MLflow's chart view puts train, val, perf and
# best in sections, with the same names for training, cross-validation and
# evaluation (test/...).
_METRIC_PREFIXES: tuple[tuple[str, str], ...] = (
    ("val_dice_", "val/dice/"),
    ("val_jaccard_", "val/jaccard/"),
)
_METRIC_NAMES: dict[str, str] = {
    "train_loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "val_loss": "val/loss",
    "epoch_seconds": "perf/epoch_seconds",
    "images_per_second": "perf/images_per_second",
    "data_wait_fraction": "perf/data_wait_fraction",
}

# Tag holding a run's or experiment's description in the MLflow UI.
DESCRIPTION_TAG = "mlflow.note.content"
# MLflow's limit on a dataset digest (characters).
DATASET_DIGEST_LENGTH = 32


def metric_name(key: str) -> str:
    """MLflow name of a training history key: "val_dice_heart" ->
    "val/dice/heart", "train_loss" -> "train/loss"; unknown keys unchanged."""
    if key in _METRIC_NAMES:
        return _METRIC_NAMES[key]
    for old, new in _METRIC_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def best_metric_name(key: str) -> str:
    """Name of a best-epoch summary metric: "val_dice_heart" ->
    "best/val_dice/heart", "val_loss" -> "best/val_loss"."""
    for old, _ in _METRIC_PREFIXES:
        if key.startswith(old):
            return f"best/{old.rstrip('_')}/{key[len(old):]}"
    return f"best/{key}"


def dataset_input(manifest: str | Path, name: str, fingerprint: str, rows=None):
    """The manifest as an MLflow dataset (for ``mlflow.log_input``).

    Args:
        manifest: the preprocessing manifest (CSV).
        name: dataset name shown in the UI.
        fingerprint: :func:`medseg.preprocessing.manifest.manifest_fingerprint`;
            its first :data:`DATASET_DIGEST_LENGTH` characters become the
            digest (MLflow stores at most 36).
        rows: case IDs to keep (e.g. one split part); None for all.

    Returns:
        An ``mlflow.data.pandas_dataset.PandasDataset``. Only its schema,
        row count and source path reach the store, never the rows.
    """
    import mlflow.data
    import pandas as pd

    frame = pd.read_csv(manifest)
    if rows is not None:
        frame = frame[frame["case_id"].astype(str).isin({str(r) for r in rows})]
    # Only the columns describing the data, not machine paths of the sources.
    frame = frame.drop(columns=[c for c in ("source", "mask_source") if c in frame.columns])
    with warnings.catch_warnings():
        # MLflow warns that its local source class is registered twice, and
        # hints at integer columns for model serving: neither applies here.
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(frame, source=Path(manifest).resolve().as_uri(), name=name,
                                       digest=fingerprint[:DATASET_DIGEST_LENGTH])


def tolerant(what: str, fn, *args, attempts: int = 2, **kwargs) -> Any:
    """Call ``fn``; on failure try once more, then log a warning and return
    None. For records that parallel jobs may write at the same moment (the
    experiment's description, a dataset both folds use): MLflow's SQL store
    inserts them without a lock, so the second writer can hit a unique-key
    error, and on the retry finds the row there. None of them is worth
    failing a training job for."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - MLflow raises many types, store-specific
            if attempt + 1 == attempts:
                log.warning("MLflow: %s failed (%s: %s); going on without it", what, type(err).__name__,
                            str(err).splitlines()[0][:200] if str(err) else "")
    return None


def run_context_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` adds by itself (user, source name and
    type, git commit), for runs created through ``MlflowClient``."""
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags({}))


def describe_experiment(tracking_uri: str, experiment_id: str, labels: Sequence[str]) -> None:
    """Give the experiment a description in the MLflow UI, unless it has one
    (a user's own text is kept)."""
    client = client_for(tracking_uri)
    tags = client.get_experiment(experiment_id).tags
    if not tags.get("mlflow.experimentKind"):  # the UI's model-training pages, not its GenAI ones
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    if tags.get(DESCRIPTION_TAG):
        return
    client.set_experiment_tag(experiment_id, DESCRIPTION_TAG, (
        f"medseg: segmentation of {', '.join(labels)} on chest radiographs (one sigmoid channel per label, "
        "in this order).\n\n"
        "- a **cross-validation** run (tag `medseg.role=cross-validation`) per workflow run, ended when its "
        "folds are evaluated; its metrics are the folds' means\n"
        "- nested under it, one **training** run per fold (`fold<k>`, `medseg.role=training`) with its logged "
        "model and registered version, and one **evaluation** run per fold (`evaluation-fold<k>`, "
        "`medseg.role=evaluation`) scoring the fold's held-out test cases\n"
        "- metric groups: `train/*`, `val/*` (per epoch), `best/*` (the chosen epoch), `test/*` (held-out cases, mm for "
        "distances), `perf/*` and `system/*` (speed and machine load)"
    ))


# Key of the saved runs-table view (MLflow UI's "shared view": an experiment
# tag mlflow.sharedViewState.<key>, opened with ?viewStateShareKey=<key>).
RUNS_VIEW = "medseg-folds"


def save_runs_view(tracking_uri: str, experiment_id: str, metric_names: Sequence[str]) -> str:
    """Save a runs-table view of the experiment that shows the folds side by
    side: the training and evaluation runs of every fold (flat, sorted by
    fold) with their dataset, registered model version and the given
    metric columns.

    MLflow has no setting for the columns a runs table shows by default;
    its UI opens a view stored as an experiment tag ("shared view") at
    ``#/experiments/<id>/runs?viewStateShareKey=<key>``. The tag's JSON is
    the UI's own view state (MLflow 3.x), so an MLflow UI that no longer
    reads it shows the plain table.

    Returns:
        The path of the view in the UI, relative to its root URL.
    """
    columns = ["attributes.`Dataset`", "attributes.`Models`", "tags.`fold`", "tags.`medseg.role`",
               *(f"metrics.`{name}`" for name in metric_names)]
    state = {"selectedColumns": columns, "searchFilter": "tags.fold LIKE '%'", "orderByKey": "tags.`fold`",
             "orderByAsc": True}
    client = client_for(tracking_uri)
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{RUNS_VIEW}", json.dumps(state))
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}"


def without_active_run(fn, *args, **kwargs) -> Any:
    """Call ``fn`` in a helper thread, where MLflow sees no active run (its
    run stack is thread-local).

    Why: ``mlflow.pytorch.log_model`` inside a run copies every run metric
    at the model's step onto the logged model, including the system metrics
    sampled at that step; logged from here, the model gets only the metrics
    linked to it on purpose (``model_id=``).
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


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


def _timed_out(err: BaseException) -> bool:
    """Whether an MLflow request failed by a read timeout (the server took the
    connection but did not answer), as opposed to a refused connection."""
    text = f"{type(err).__name__}: {err}"
    return "ReadTimeout" in text or "Read timed out" in text


def connect(tracking_uri: str, experiment: str, timeout_s: float = 10.0) -> str:
    """Point MLflow at ``tracking_uri`` and make sure ``experiment`` exists.

    Returns:
        The experiment ID.

    Raises:
        TrackingUnavailable: the store cannot be reached (fails in about
            ``timeout_s``, not after MLflow's long retry schedule). A server
            that accepts the connection but answers after ``timeout_s`` is
            waited for once more under the run's retry settings
            (``MLFLOW_HTTP_REQUEST_TIMEOUT``, default 30 s, 2 retries).
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
        try:
            with _fail_fast_http(timeout_s):
                found = client.get_experiment_by_name(experiment)
        except Exception as err:  # noqa: BLE001 - see below
            if not _timed_out(err):
                raise  # refused, unknown host, bad answer: fail fast
            # The server took the connection but did not answer in time (busy;
            # a fresh server's first request loads its store): wait for it
            # with the run's retry settings instead of failing the job.
            log.warning("MLflow tracking store %s did not answer within %.0f s; waiting for it (up to %s s per "
                        "request)", tracking_uri, timeout_s, os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
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
        """Log training history values under their MLflow names (:func:`metric_name`)."""
        import mlflow

        clean = {metric_name(k): float(v) for k, v in metrics.items() if v is not None and v == v}
        self._call("log_metrics", mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        self._call("log_artifact", mlflow.log_artifact, str(path), artifact_path)

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """A PNG as an MLflow image series (the UI shows a step slider)."""
        import mlflow
        from PIL import Image

        def log() -> None:
            with Image.open(path) as image:
                mlflow.log_image(image.convert("RGB"), key=key, step=step)

        self._call("log_image", log)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        self._call("set_tags", mlflow.set_tags, dict(tags))

    def call(self, what: str, fn, *args, **kwargs) -> Any:
        """Run any MLflow call under the same failure policy."""
        return self._call(what, fn, *args, **kwargs)
