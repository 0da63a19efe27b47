"""The MLflow runs page of the report (medseg.runs_page, `medseg mlflow-runs`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from docutils.core import publish_parts

from medseg.runs_page import runs_page, ui_instructions

MEDSEG = [sys.executable, "-m", "medseg"]


def _html(rst: str) -> str:
    # Warnings are errors here: the report's main page includes the page as it is.
    return publish_parts(rst, writer="html", settings_overrides={"report_level": 2, "halt_level": 2})["body"]


def test_ui_instructions_name_the_store_as_the_workflow_folder_sees_it(tmp_path):
    inside = ui_instructions(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", tmp_path)
    assert "mlflow ui --backend-store-uri sqlite:///results/mlflow.db" in inside and "http://127.0.0.1:5000" in inside
    elsewhere = ui_instructions("sqlite:////data/shared/mlflow.db", tmp_path)
    assert "mlflow ui --backend-store-uri sqlite:////data/shared/mlflow.db" in elsewhere
    server = ui_instructions("http://mlflow.example:5000", tmp_path)
    assert "mlflow ui" not in server and "http://mlflow.example:5000" in server


def test_runs_page_lists_every_run_and_renders_cleanly(tmp_path):
    folds = [({"fold": 0, "run_id": "a" * 32, "model_uri": "models:/medseg-x/1", "experiment": "x"},
              {"run_id": "e" * 32}),
             ({"fold": 1, "run_id": "b" * 32, "model_uri": "models:/medseg-x/2", "experiment": "x"}, None)]
    rst = runs_page({"parent_run_id": "p" * 32, "tracking_uri": f"sqlite:///{tmp_path}/results/mlflow.db"},
                    {"best_fold": 1, "model_uri": "models:/medseg-x@candidate"}, folds, tmp_path)
    html = _html(rst)
    for run_id in ("p" * 32, "a" * 32, "b" * 32, "e" * 32):
        assert run_id in html
    assert "fold 1, best mean validation Dice" in html and "models:/medseg-x/2" in html
    assert html.count("not logged") == 1  # fold 1's evaluation logged no run
    assert "<h1" not in html and "<h2" not in html  # no section title to clash with the main page's


def test_mlflow_runs_command_reads_the_records(tmp_path):
    models = tmp_path / "models"
    (models / "fold0").mkdir(parents=True)
    (tmp_path / "evaluation" / "fold0").mkdir(parents=True)
    (models / "cv_run.json").write_text(json.dumps({"parent_run_id": "p1", "tracking_uri": "http://srv:5000"}))
    (models / "fold0" / "model.json").write_text(json.dumps({"fold": 0, "run_id": "t0", "model_uri": "models:/m/3"}))
    (tmp_path / "evaluation" / "fold0" / "mlflow_run.json").write_text(json.dumps({"run_id": "v0"}))
    out = tmp_path / "report" / "mlflow_runs.rst"
    proc = subprocess.run([*MEDSEG, "mlflow-runs", "--cv-run", str(models / "cv_run.json"), "--models",
                           str(models / "fold0" / "model.json"), "--evaluations", str(tmp_path / "evaluation" / "fold0"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert all(f"``{run_id}``" in text for run_id in ("p1", "t0", "v0")) and "http://srv:5000" in text
    missing = subprocess.run([*MEDSEG, "mlflow-runs", "--cv-run", str(tmp_path / "nope.json"), "--models",
                              str(models / "fold0" / "model.json"), "--out", str(out)], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "nope.json" in missing.stderr
