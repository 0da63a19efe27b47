"""A shared MLflow tracking server on PostgreSQL, with real daemons: initdb
into a temporary folder, `postgres`, `mlflow server --serve-artifacts`.

Covers: the workflow logging to it (runs, metrics, artifacts, registry; the
rows really in PostgreSQL), two trainings logging at once, the server (mlflow
or PostgreSQL) going away mid-training, and `medseg tracking-server` itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psycopg2
import pytest
from services import require_programs
from test_training import MEDSEG, _config, _dataset, assert_offline_training_kept_everything, train_interrupted
from workflow_runs import copy_workflow, run_snakemake

from medseg.tracking import client_for, metric_name
from medseg.training.run import TrackingTarget, finish_cv_run
from medseg.tracking_server import (
    PostgresServer,
    create_database,
    find_postgres_bin_dir,
    free_port,
    init_postgres,
    port_is_free,
    postgres_running,
    start_mlflow_server,
    start_postgres,
    stop_postgres,
    stop_process_group,
    wait_until_healthy,
)

pytestmark = pytest.mark.slow


def _shared_tmp(prefix: str) -> Path:
    """A folder the postgres user can reach when we are root (pytest's own
    temporary folders are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass
class Stack:
    root: Path
    postgres: PostgresServer
    url: str

    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        conn = psycopg2.connect(host="127.0.0.1", port=self.postgres.port, user="postgres", dbname="mlflow")
        try:
            with conn.cursor() as cursor:
                cursor.execute(query, args)
                return cursor.fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def stack():
    """PostgreSQL (initdb'd here) + `mlflow server` on it, serving artifacts."""
    require_programs("initdb", "pg_ctl", "postgres")
    root = _shared_tmp("medseg-pg-")
    postgres = server = None
    try:
        assert init_postgres(root / "postgres") is True
        assert init_postgres(root / "postgres") is False  # idempotent
        postgres = start_postgres(root / "postgres", free_port(), root / "logs" / "postgres.log")
        assert create_database(postgres, "mlflow") is True
        assert create_database(postgres, "mlflow") is False
        port = free_port()
        server = start_mlflow_server(postgres.uri("mlflow"), root / "artifacts", port=port, workers=2,
                                     log_file=root / "logs" / "mlflow.log")
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, 180, server, root / "logs" / "mlflow.log")
        yield Stack(root, postgres, url)
    finally:
        if server is not None:
            stop_process_group(server)
        if postgres is not None:
            stop_postgres(postgres)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """8 phantoms at 64 px, for `medseg train`."""
    tmp = tmp_path_factory.mktemp("ts-data")
    manifest, splits = _dataset(tmp, n=8, size=64, shape=(128, 128))
    return manifest, splits


WORKFLOW_CONFIG = (
    "dataset=tsrv", "phantoms={'n': 10, 'seed': 5, 'height': 160, 'width': 128}", "preprocess={'size': 64}",
    "splits={'k': 2}",
    "train={'preset': 'cpu_tiny', 'epochs': 3, 'samples_per_epoch': 8, 'batch_size': 4, 'overlay_every': 3}",
)
# Training, cross-validation summary, prediction and evaluation (not the preview picture).
WORKFLOW_TARGETS = ("results/tsrv/models/summary.json", "results/tsrv/evaluation/fold0/summary.csv")


def test_workflow_logs_everything_to_the_postgres_server(stack, tmp_path, monkeypatch):
    copy_workflow(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url)
    run_snakemake(tmp_path, "--config", *WORKFLOW_CONFIG, "--", *WORKFLOW_TARGETS)
    results = tmp_path / "results" / "tsrv"
    assert not (tmp_path / "results" / "mlflow.db").exists()  # nothing went to the embedded store
    fold = json.loads((results / "models" / "fold0" / "model.json").read_text())
    summary = json.loads((results / "models" / "summary.json").read_text())
    assert fold["tracking_uri"] == stack.url and fold["tracking_offline"] is False

    client = client_for(stack.url)
    run = client.get_run(fold["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a client path
    assert run.data.params["train.epochs"] == "3" and run.data.params["dataset"] == "tsrv"
    assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    for metric in ("train/loss", "val/loss", "val/dice/mean", "val/dice/lungs", "train/learning_rate"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3], metric
    local = pd.read_csv(results / "models" / "fold0" / "metrics.csv")
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert logged == pytest.approx(local.train_loss.tolist(), rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "metrics.csv", "images", "validation_overlays.png"} <= artifacts
    downloaded = Path(client.download_artifacts(run.info.run_id, "curves.png", str(tmp_path)))
    assert downloaded.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert downloaded.read_bytes() == (results / "models" / "fold0" / "curves.png").read_bytes()
    assert list((stack.root / "artifacts").rglob("curves.png"))  # in the server's artifact store

    # Registry: the fold's version, aliased @fold0 and (best fold) @candidate.
    assert summary["model_uri"] == "models:/medseg-tsrv@candidate" and summary["best_fold"] == 0
    version = client.get_model_version_by_alias("medseg-tsrv", "candidate")
    assert str(version.version) == fold["model_version"] and version.run_id == fold["run_id"]
    assert client.get_model_version_by_alias("medseg-tsrv", "fold0").version == version.version
    assert "best/val_dice/mean" in client.get_run(summary["parent_run_id"]).data.metrics
    # Prediction loaded the model from the server's registry; evaluation logged its own run there.
    predictions = pd.read_csv(results / "predictions" / "fold0" / "results.csv")
    assert len(predictions) == 5 and predictions.model_uri.str.startswith("models:/medseg-tsrv/").all()
    evaluations = client.search_runs([run.info.experiment_id], "tags.`medseg.role` = 'evaluation'")
    assert len(evaluations) == 1 and evaluations[0].data.tags["training_run_id"] == fold["run_id"]
    assert 0.0 <= evaluations[0].data.metrics["test/dice/lungs"] <= 1.0
    assert evaluations[0].data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    assert "summary.csv" in {a.path for a in client.list_artifacts(evaluations[0].info.run_id)}

    # The rows are in PostgreSQL itself.
    ids = (summary["parent_run_id"], fold["run_id"], evaluations[0].info.run_id)
    assert stack.sql("SELECT count(*) FROM runs WHERE run_uuid IN %s AND status = 'FINISHED'", (ids,)) == [(3,)]
    assert stack.sql("SELECT step FROM metrics WHERE run_uuid = %s AND key = 'train/loss' ORDER BY step",
                     (fold["run_id"],)) == [(1,), (2,), (3,)]
    assert stack.sql("SELECT alias, version FROM registered_model_aliases WHERE name = 'medseg-tsrv' "
                     "ORDER BY alias") == [("candidate", int(version.version)), ("fold0", int(version.version))]
    # Phantom DICOMs carry fake patient fields; none may reach the tracking database.
    text = json.dumps(stack.sql("SELECT key, value FROM params UNION ALL SELECT key, value FROM tags"))
    assert "tsrv" in text and "Secret" not in text and "SECRETID" not in text


def _train_process(config: Path, manifest: Path, splits: Path, out: Path, url: str, seed: int,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(out.parent / f"{out.name}.log", "w") as log:
        return subprocess.Popen(
            [*MEDSEG, "train", "--config", str(config), "--manifest", str(manifest), "--splits", str(splits),
             "--fold", "0", "--out", str(out), "--seed", str(seed)],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "MLFLOW_TRACKING_URI": url, **(env or {})},
        )


def test_two_trainings_logging_at_once_both_land_intact(stack, phantoms, tmp_path, repo_root):
    manifest, splits = phantoms
    config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=4, samples_per_epoch=8, batch_size=4,
                     overlay_every=1)
    outs = [tmp_path / "a", tmp_path / "b"]
    # Generous request timeouts (user settings win over medseg's 30 s, 2
    # retries): this test is about two runs' data landing intact, and on a
    # loaded 2-core CI machine the server answered late enough once for a
    # run to go offline.
    generous = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}
    procs = [_train_process(config, manifest, splits, out, stack.url, seed, generous)
             for out, seed in zip(outs, (1, 2))]
    try:
        for out, proc in zip(outs, procs):
            assert proc.wait(timeout=600) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    client = client_for(stack.url)
    summaries = [json.loads((out / "model.json").read_text()) for out in outs]
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    assert summaries[0]["model_version"] != summaries[1]["model_version"]
    for out, summary in zip(outs, summaries):
        assert summary["tracking_offline"] is False
        run = client.get_run(summary["run_id"])
        assert run.info.status == "FINISHED" and run.data.params["train.seed"] in ("1", "2")
        local = pd.read_csv(out / "metrics.csv")
        for metric in ("train_loss", "val_loss", "val_dice_mean", "epoch_seconds"):
            history = client.get_metric_history(summary["run_id"], metric_name(metric))
            assert [m.step for m in history] == [1, 2, 3, 4], metric  # complete, no gaps, no doubles
            # Each run holds its own job's values, not the other's.
            assert [m.value for m in history] == pytest.approx(local[metric].tolist(), rel=1e-6), metric
        images = [a.path for a in client.list_artifacts(summary["run_id"], "images") if a.path.endswith(".png")]
        assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [1, 2, 3, 4]
        version = client.get_model_version("medseg-unit", summary["model_version"])
        assert version.run_id == summary["run_id"] and version.status == "READY"
        assert version.source.startswith("models:/m-")  # the logged model behind the version (MLflow 3)
        model_id = version.source.removeprefix("models:/")
        assert client.get_logged_model(model_id).source_run_id == summary["run_id"]
        assert {"MLmodel", "data"} <= {a.path for a in client.list_logged_model_artifacts(model_id)}
    seeds = {client.get_run(s["run_id"]).data.params["train.seed"] for s in summaries}
    assert seeds == {"1", "2"}
    losses = [pd.read_csv(out / "metrics.csv").train_loss.tolist() for out in outs]
    assert losses[0] != losses[1]  # the two jobs really differ, so the per-run comparisons above mean something


def _second_server(stack: Stack, log_file: Path):
    """Another `mlflow server` on the stack's database, healthy: (process, URL)."""
    port = free_port()
    server = start_mlflow_server(stack.postgres.uri("mlflow"), stack.root / "artifacts", port=port, workers=1,
                                 log_file=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 180, server, log_file)
    except BaseException:
        stop_process_group(server)
        raise
    return server, url


def test_busy_server_is_waited_for_not_failed(stack, tmp_path, monkeypatch):
    """A server that takes the connection but answers after the first
    request's timeout (busy, or loading its store for its first request: a
    parallel CI worker made this happen) is waited for, not reported
    unusable; a refused connection still fails fast. The real server is
    paused (SIGSTOP on its process group) and resumed 4 s later."""
    import threading

    from medseg.tracking import TrackingUnavailable, connect

    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    server, url = _second_server(stack, tmp_path / "mlflow.log")
    try:
        os.killpg(server.pid, signal.SIGSTOP)
        resume = threading.Timer(4.0, os.killpg, (server.pid, signal.SIGCONT))
        resume.start()
        started = time.monotonic()
        try:
            experiment_id = connect(url, "busy-server", timeout_s=1.0)
        finally:
            resume.join()
        assert experiment_id and time.monotonic() - started >= 3.5
        assert client_for(url).get_experiment(experiment_id).name == "busy-server"
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        stop_process_group(server)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="cannot be used"):
        connect(f"http://127.0.0.1:{free_port()}", "nobody-listens", timeout_s=1.0)
    assert time.monotonic() - started < 10


def test_mlflow_server_lost_mid_training_keeps_everything(stack, phantoms, tmp_path, repo_root):
    """A second `mlflow server` on the same database is stopped mid-training:
    training finishes offline with everything on disk; what reached the
    database before stays there; `cv-finish` still summarises the fold."""
    manifest, splits = phantoms
    config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=12, samples_per_epoch=8, batch_size=4)
    server, url = _second_server(stack, tmp_path / "mlflow.log")
    port = int(url.rsplit(":", 1)[1])
    try:
        text = train_interrupted(config, manifest, splits, tmp_path / "out", url, epochs=12, at_epoch=3,
                                 interrupt=lambda: stop_process_group(server))
    finally:
        stop_process_group(server)
    assert_offline_training_kept_everything(tmp_path / "out", text, epochs=12)
    assert port_is_free(port)

    # What the lost server had stored is in the database (read through the other server).
    summary = json.loads((tmp_path / "out" / "model.json").read_text())
    client = client_for(stack.url)
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "train/loss")]
    assert 3 <= len(steps) < 20 and steps == list(range(1, len(steps) + 1)), steps
    assert client.get_run(summary["run_id"]).info.status == "RUNNING"  # never ended (see docs/tracking-server.md)

    # Cross-validation summary with no registered fold: chosen from model.json, exit 0, a warning.
    parent = client.create_run(client.get_experiment_by_name("unit").experiment_id, run_name="cross-validation")
    (tmp_path / "cv_run.json").write_text(json.dumps({"parent_run_id": parent.info.run_id}))
    proc = subprocess.run([*MEDSEG, "cv-finish", "--config", str(config), "--parent-run-file",
                           str(tmp_path / "cv_run.json"), "--tracking-uri", stack.url, "--out",
                           str(tmp_path / "summary.json"), str(tmp_path / "out" / "model.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no fold has a registered model" in proc.stderr
    cv = json.loads((tmp_path / "summary.json").read_text())
    assert cv["best_fold"] == 0 and cv["model_uri"] is None and cv["model_version"] is None
    assert cv["unregistered_folds"] == [0] and cv["tracking_offline"] is False
    assert cv["cv_mean_val_dice_mean"] == pytest.approx(summary["best_metrics"]["val_dice_mean"])
    logged = client.get_run(parent.info.run_id).data
    assert logged.metrics["best/val_dice/mean"] == pytest.approx(summary["best_metrics"]["val_dice_mean"])
    assert logged.tags["best_fold"] == "0"


def _start_cli(data_dir: Path, port: int, postgres_port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [*MEDSEG, "tracking-server", "--data-dir", str(data_dir), "--port", str(port),
             "--postgres-port", str(postgres_port), "--workers", "1"],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _stop_cli(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)  # to the command only: it must stop mlflow and PostgreSQL itself
    try:
        return proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_tracking_server_command(phantoms, tmp_path, repo_root, caplog):
    """`medseg tracking-server`: starts PostgreSQL + mlflow, stops both on
    SIGTERM, keeps runs across restarts; when its PostgreSQL dies
    mid-training, training finishes offline and `cv-finish` still works."""
    require_programs("initdb", "pg_ctl", "postgres")
    data_dir = _shared_tmp("medseg-cli-")
    port, postgres_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    postgres = PostgresServer(data_dir=data_dir / "postgres", port=postgres_port, bin_dir=find_postgres_bin_dir(),
                              log_file=data_dir / "logs" / "postgres.log")
    proc = None
    try:
        proc = _start_cli(data_dir, port, postgres_port, tmp_path / "first.log")
        wait_until_healthy(url, 180, proc, tmp_path / "first.log")
        # A second server on the same port is refused (exit 2), without touching the first.
        clash = subprocess.run([*MEDSEG, "tracking-server", "--data-dir", str(tmp_path / "other"), "--port",
                                str(port)], capture_output=True, text=True, timeout=60)
        assert clash.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in clash.stderr
        assert not (tmp_path / "other").exists()
        client = client_for(url)
        run = client.create_run(client.create_experiment("cli"), run_name="kept")
        client.log_metric(run.info.run_id, "dice", 0.5, step=1)
        client.log_text(run.info.run_id, "hello", "note.txt")
        client.set_terminated(run.info.run_id)
        assert _stop_cli(proc) == 0
        first = (tmp_path / "first.log").read_text()
        assert f"export MLFLOW_TRACKING_URI={url}" in first and "initialised PostgreSQL" in first
        assert port_is_free(port) and port_is_free(postgres_port)
        assert not postgres_running(postgres.data_dir) and not (postgres.data_dir / "postmaster.pid").exists()
        assert (data_dir / "logs" / "mlflow.log").stat().st_size > 0

        # Restart on the same folder: same database, same run.
        proc = _start_cli(data_dir, port, postgres_port, tmp_path / "second.log")
        wait_until_healthy(url, 180, proc, tmp_path / "second.log")
        assert "initialised PostgreSQL" not in (tmp_path / "second.log").read_text()
        again = client.get_run(run.info.run_id)
        assert again.data.metrics == {"dice": 0.5} and again.info.status == "FINISHED"
        note = Path(client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path)))
        assert note.read_text() == "hello"

        # Its PostgreSQL dies mid-training (mlflow keeps running, answering errors).
        manifest, splits = phantoms
        config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=12, samples_per_epoch=8, batch_size=4)
        text = train_interrupted(config, manifest, splits, tmp_path / "out", url, epochs=12, at_epoch=3,
                                 interrupt=lambda: stop_postgres(postgres, mode="immediate"))
        assert_offline_training_kept_everything(tmp_path / "out", text, epochs=12)
        # Cross-validation summary with every fold offline and the store still broken: still made.
        fold = json.loads((tmp_path / "out" / "model.json").read_text())
        with caplog.at_level(logging.WARNING, logger="medseg.training.run"):
            summary = finish_cv_run(TrackingTarget(url, "unit", "medseg-unit"), "0" * 32, [fold])
        assert summary["best_fold"] == 0 and summary["model_uri"] is None and summary["tracking_offline"] is True
        assert summary["cv_mean_val_dice_mean"] == pytest.approx(fold["best_metrics"]["val_dice_mean"])
        assert "could not record the cross-validation summary in MLflow" in caplog.text
        assert proc.poll() is None  # the command keeps serving (mlflow is up; the database is not)
        assert _stop_cli(proc) == 0
        assert port_is_free(port)
    finally:
        if proc is not None and proc.poll() is None:
            _stop_cli(proc)
        stop_postgres(postgres, mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)
