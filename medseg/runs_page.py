"""The MLflow runs of one workflow run, as reStructuredText for the
Snakemake report's main page: each run's ID and how to open the MLflow UI.

Read only from the records the workflow writes, without calling MLflow (so
it works with the tracking server down, and on a cluster's submit host):

- ``models/cv_run.json``: {"parent_run_id", "tracking_uri"};
- ``models/summary.json``: {"best_fold", "model_uri", "runs_view", ...} (``cv-finish``);
- ``models/fold<k>/model.json``: {"fold", "run_id", "model_uri",
  "model_version", "registered_model", "experiment", "tracking_uri", ...};
- ``evaluation/fold<k>/mlflow_run.json``: {"run_id", "experiment_id",
  "tracking_uri"}, absent when the evaluation logged no run (``--no-mlflow``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medseg.atomic import write_text_atomic

EVALUATION_RUN_FILE = "mlflow_run.json"
MLFLOW_UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_instructions(tracking_uri: str, cwd: Path) -> str:
    """How to browse the runs of ``tracking_uri``, as reStructuredText.

    A SQLite store inside ``cwd`` (the workflow's folder) is named relative
    to it, so the command still works when the folder is moved or shared.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return f"The runs are on the MLflow tracking server {tracking_uri}: open it in a browser."
    store = tracking_uri
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        try:
            store = f"sqlite:///{path.resolve().relative_to(cwd.resolve()).as_posix()}"
        except ValueError:  # outside the workflow's folder: keep it absolute
            pass
    return (f"To browse them, run in the workflow's folder::\n\n    mlflow ui --backend-store-uri {store}\n\n"
            f"then open {MLFLOW_UI_ADDRESS} in a browser.")


def _literal(value) -> str:
    return f"``{value}``" if value not in (None, "") else "–"


def runs_page(cv_run: dict, cv_summary: dict | None, folds: Sequence[tuple[dict, dict | None]],
              cwd: Path) -> str:
    """The page's reStructuredText (no section title: it is included into the
    report's main page, whose sections it must not disturb).

    Args:
        cv_run: ``models/cv_run.json``.
        cv_summary: ``models/summary.json``, or None before ``cv-finish``.
        folds: per trained fold, (``model.json``, the evaluation's
            ``mlflow_run.json`` or None when there is none).
        cwd: the workflow's folder (see :func:`ui_instructions`).
    """
    tracking_uri = cv_run.get("tracking_uri") or next((m.get("tracking_uri") for m, _ in folds), "") or ""
    experiment = next((m.get("experiment") for m, _ in folds if m.get("experiment")), None)
    rows = []
    chosen = ""
    if cv_summary and cv_summary.get("best_fold") is not None:
        chosen = f" (fold {cv_summary['best_fold']}, best mean validation Dice)"
        if cv_summary.get("choice") == "ensemble":
            folds_text = ", ".join(map(str, cv_summary.get("folds", [])))
            chosen += f"; new scans are predicted by the ensemble of folds {folds_text} (``models/summary.json``)"
    rows.append(("cross-validation: parent of the fold runs", _literal(cv_run.get("parent_run_id")),
                 (_literal(cv_summary.get("model_uri")) if cv_summary else "–") + chosen))
    for model, evaluation in folds:
        fold = model.get("fold", "?")
        rows.append((f"fold {fold}: training", _literal(model.get("run_id")), _literal(model.get("model_uri"))))
        rows.append((f"fold {fold}: evaluation on its held-out scans",
                     _literal(evaluation.get("run_id")) if evaluation else "not logged", "–"))
    table = [".. list-table::", "   :header-rows: 1", "", "   * - run", "     - MLflow run ID", "     - model"]
    for cells in rows:
        table.append(f"   * - {cells[0]}")
        table.extend(f"     - {cell}" for cell in cells[1:])
    where = f" (experiment {_literal(experiment)})" if experiment else ""
    view = []
    if cv_summary and cv_summary.get("runs_view"):
        base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI_ADDRESS
        # An explicit link: docutils would end a bare URL at its "?".
        view = [f"The folds side by side: `a saved view of the runs table <{base}/{cv_summary['runs_view']}>`__.",
                ""]
    return "\n".join([
        ".. rubric:: MLflow runs",
        "",
        f"Every training and evaluation run is tracked in MLflow{where}. {ui_instructions(tracking_uri, cwd)}",
        "",
        *view,
        *table,
        "",
    ])


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_runs_page(out: Path, cv_run: Path, model_jsons: Sequence[Path], cv_summary: Path | None = None,
                    evaluation_dirs: Sequence[Path] = (), cwd: Path | None = None) -> str:
    """Write :func:`runs_page` to ``out`` (atomically) and return it.

    Args:
        evaluation_dirs: the folds' evaluation folders, in the order of
            ``model_jsons``; each one's ``mlflow_run.json`` is read if present.
    """
    if evaluation_dirs and len(evaluation_dirs) != len(model_jsons):
        raise ValueError(f"{len(evaluation_dirs)} evaluation folders for {len(model_jsons)} folds")
    evaluations = [_read_json(Path(d) / EVALUATION_RUN_FILE) for d in evaluation_dirs] or [None] * len(model_jsons)
    folds = [(json.loads(Path(m).read_text()), e) for m, e in zip(model_jsons, evaluations)]
    text = runs_page(json.loads(Path(cv_run).read_text()), _read_json(Path(cv_summary)) if cv_summary else None,
                     folds, cwd or Path.cwd())
    write_text_atomic(out, text)
    return text


__all__ = ["EVALUATION_RUN_FILE", "MLFLOW_UI_ADDRESS", "runs_page", "ui_instructions", "write_runs_page"]
