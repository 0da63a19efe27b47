"""One tracked training job (one fold) and cross-validation bookkeeping.

These functions take explicit arguments; the CLI turns the workflow config
into them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import __version__
from medseg.atomic import write_text_atomic
from medseg.preprocessing.manifest import manifest_fingerprint
from medseg.preprocessing.splits import read_splits
from medseg.tracking import RunLogger, client_for, connect, git_commit
from medseg.training.data import load_cases
from medseg.training.network import SigmoidHead
from medseg.training.settings import TrainSettings
from medseg.training.trainer import Trainer, format_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run is logged.

    Attributes:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (one per dataset).
        registered_model: model registry name.
        alias: alias given to the chosen model version (e.g. "candidate").
        system_metrics: log CPU/GPU/memory use alongside the run.
    """

    tracking_uri: str
    experiment: str
    registered_model: str
    alias: str = "candidate"
    system_metrics: bool = True


def _pip_requirements() -> list[str]:
    """Pinned requirements for the logged model (skips MLflow's slow inference)."""
    import monai

    return [f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}",
            f"numpy=={np.__version__}"]


RUN_RECORD = "mlflow_run.json"


@dataclass(frozen=True)
class RunRecord:
    """The MLflow run of a training output folder, written as soon as the run
    exists, so that a job killed before its first checkpoint is continued in
    the same run (no orphan RUNNING run per preemption).

    The record is used only for the same tracking store, settings and data
    (``settings_fingerprint``, ``data_fingerprint``); otherwise training
    starts afresh in a new run, as it does for ``last.pt``.
    """

    path: Path
    tracking_uri: str
    settings_fingerprint: str
    data_fingerprint: str

    def _key(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "settings_fingerprint": self.settings_fingerprint,
                "data_fingerprint": self.data_fingerprint}

    def read(self) -> str | None:
        """The recorded run ID if the record matches, else None."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in self._key().items()):
            return None
        return record.get("run_id") or None

    def write(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"run_id": run_id, **self._key()}, indent=1) + "\n")


def log_model(model: torch.nn.Module, size: int, target: TrackingTarget, fold: int | str,
              metadata: Mapping[str, Any] | None = None) -> dict:
    """Log ``model`` (logits) as a probability model, register it, alias it.

    The logged model maps float32 (N, 1, size, size) in [0, 1] to float32
    (N, C, size, size) probabilities. ``metadata`` (labels, size, intensity
    percentiles) travels with it so prediction can preprocess new scans the
    same way. Returns {"version", "model_uri"}.
    """
    import mlflow
    from mlflow.models import infer_signature
    wrapped = SigmoidHead(model).cpu().eval()
    # Batch of 2: MLflow exports with torch.export, which would fix a batch
    # dimension of 1 (a "specialised" size) into the saved program.
    example = np.zeros((2, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        output = wrapped(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        wrapped, name="model", signature=infer_signature(example, output), input_example=example,
        registered_model_name=target.registered_model, pip_requirements=_pip_requirements(),
        metadata=dict(metadata or {}),
    )
    version = str(info.registered_model_version)
    client = client_for(target.tracking_uri)
    client.set_registered_model_alias(target.registered_model, f"fold{fold}", version)
    return {"version": version, "model_uri": f"models:/{target.registered_model}/{version}"}


def train_fold(
    *,
    settings: TrainSettings,
    labels: Mapping[str, Sequence[str]],
    manifest: str | Path,
    splits: str | Path,
    fold: int,
    out_dir: str | Path,
    target: TrackingTarget,
    params: Mapping[str, str],
    config: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    intensity: Mapping[str, float] | None = None,
) -> dict:
    """Train one fold, tracked in MLflow; resumes from ``out_dir/last.pt``.

    Args:
        settings: training settings (already validated).
        labels: {label: source structures}; output channels in this order.
        manifest, splits: preprocessing outputs.
        fold: index into the splits' folds.
        out_dir: checkpoints, metrics.csv, curves, overlays, model.json.
        target: tracking store, experiment and registry names.
        params: flattened resolved config, logged as run parameters.
        config: the resolved config, logged as the artifact ``config.yaml``.
        parent_run_id: cross-validation parent run.
        intensity: the preprocessing's lower/upper percentiles, recorded
            with the model so that prediction normalises alike.

    Returns:
        The summary written to ``out_dir/model.json``.

    Raises:
        medseg.tracking.TrackingUnavailable: before any training work.
    """
    import mlflow

    out_dir = Path(out_dir)
    experiment_id = connect(target.tracking_uri, target.experiment)
    folds = read_splits(splits)["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"{splits}: fold {fold} does not exist (there are {len(folds)})")
    split = folds[fold]
    label_names = list(labels)
    train_cases = load_cases(manifest, split["train"], labels)
    val_cases = load_cases(manifest, split["val"], labels)
    log.info("fold %d: %d training, %d validation cases", fold, len(train_cases.case_ids), len(val_cases.case_ids))

    dataset_fingerprint = manifest_fingerprint(manifest)
    data_fingerprint = hashlib.sha256(
        json.dumps([dataset_fingerprint, split["train"], split["val"], labels], sort_keys=True).encode()
    ).hexdigest()[:16]
    trainer = Trainer(settings, label_names, train_cases, val_cases, out_dir,
                      on_epoch=lambda m: log.info("%s", format_progress(m, label_names)),
                      data_fingerprint=data_fingerprint)
    trainer.try_resume()
    finished = out_dir / "model.json"
    if trainer.run_id and trainer.start_epoch > settings.epochs and finished.is_file():
        summary = json.loads(finished.read_text())
        if summary.get("run_id") == trainer.run_id:  # a rerun of a finished job: no second model version
            log.info("fold %d is already trained (%s, MLflow run %s): nothing to do", fold, finished, trainer.run_id)
            return summary
    tags = {
        "medseg.version": __version__,
        "git.commit": git_commit(),
        "dataset.fingerprint": dataset_fingerprint,
        "device": trainer.device.name,
        "fold": str(fold),
    }
    run_record = RunRecord(out_dir / RUN_RECORD, target.tracking_uri, settings.fingerprint(), data_fingerprint)
    # A job killed before its first checkpoint left its run ID only in the record.
    continued = trainer.run_id or run_record.read()
    if continued:
        run = mlflow.start_run(run_id=continued, log_system_metrics=target.system_metrics)
        log.info("continuing MLflow run %s", continued)
        if not trainer.history:  # the first job may have died before logging them
            mlflow.set_tags(tags)
            logged = client_for(target.tracking_uri).get_run(continued).data.params
            # Only the missing ones: MLflow refuses to change a logged value.
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"fold{fold}", parent_run_id=parent_run_id,
                               tags=tags, log_system_metrics=target.system_metrics)
        run_record.write(run.info.run_id)
        mlflow.log_params(dict(params))
    if config is not None:
        mlflow.log_dict(dict(config), "config.yaml")
    run_id = run.info.run_id
    trainer.run_id = run_id
    tracker = RunLogger(run_id, out_dir)
    trainer.tracker = tracker
    if trainer.history:
        # Epochs checkpointed by the killed job but not yet sent to MLflow.
        logged = tracker.call("get_metric_history", client_for(target.tracking_uri).get_metric_history, run_id,
                              "train_loss")
        if logged is not None:
            steps = {m.step for m in logged}
            trainer.log_epochs([h for h in trainer.history if h["epoch"] not in steps])
    status = "FAILED"
    try:
        result = trainer.fit()
        tracker.log_artifact(out_dir / "curves.png")
        tracker.log_artifact(out_dir / "metrics.csv")
        best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
        trainer.model.load_state_dict(best["model"])
        model_metadata = {"labels": label_names, "size": trainer.size,
                          "intensity": dict(intensity or {"lower_percentile": 0.5, "upper_percentile": 99.5})}
        registered = tracker.call("log_model", log_model, trainer.model, trainer.size, target, fold,
                                  model_metadata) or {}
        best_metrics = next((h for h in result.history if h["epoch"] == result.best_epoch), result.history[-1])
        summary: dict[str, Any] = {
            "fold": fold,
            "run_id": run_id,
            "experiment": target.experiment,
            "tracking_uri": target.tracking_uri,
            "registered_model": target.registered_model,
            "model_version": registered.get("version"),
            "model_uri": registered.get("model_uri"),
            "best_epoch": result.best_epoch,
            "best_metrics": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
            **model_metadata,
            "tracking_offline": tracker.offline,
        }
        write_text_atomic(out_dir / "model.json", json.dumps(summary, indent=1) + "\n")
        status = "FINISHED"
        if tracker.offline:
            log.warning("MLflow was unreachable during training: results are in %s", out_dir)
        return summary
    finally:
        tracker.call("end_run", mlflow.end_run, status=status)


def start_cv_run(target: TrackingTarget, name: str, params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """Create the parent run of a cross-validation; returns its ID."""
    import mlflow

    experiment_id = connect(target.tracking_uri, target.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=dict(tags)) as run:
        mlflow.log_params(dict(params))
        mlflow.set_tag("medseg.role", "cross-validation")
    # Left FINISHED now; finish_cv_run logs the summary into it later.
    return run.info.run_id


def finish_cv_run(target: TrackingTarget, parent_run_id: str, fold_summaries: Sequence[dict]) -> dict:
    """Summarise the folds into the parent run and alias the best fold's model.

    Choice: the fold with the best mean validation Dice becomes
    ``models:/<name>@<alias>`` (a single network keeps inference fast; the
    other folds stay registered as ``@fold<k>``).

    Folds trained while MLflow was unreachable have no registered model: the
    best fold is then chosen among all folds from their model.json's
    validation metrics, the summary says so (``model_uri`` None: the fold's
    model.json and best.pt are the model) and a warning is logged. If, then,
    the store cannot be reached either, the summary is still returned
    (``tracking_offline`` True). With registered folds, an unreachable store
    is an error (the alias is what the run produces).
    """
    if not fold_summaries:
        raise ValueError("no fold summaries")
    registered = [s for s in fold_summaries if s.get("model_version")]

    def score(summary: dict) -> float:
        return summary["best_metrics"].get("val_dice_mean", -1.0)

    best = max(registered or fold_summaries, key=score)
    means: dict[str, float] = {}
    for key in best["best_metrics"]:
        values = [s["best_metrics"][key] for s in fold_summaries if key in s["best_metrics"]]
        means[f"cv_mean_{key}"] = float(np.mean(values))
    summary: dict[str, Any] = {
        "parent_run_id": parent_run_id,
        "best_fold": best["fold"],
        "model_uri": f"models:/{target.registered_model}@{target.alias}" if registered else None,
        "model_version": best.get("model_version"),
        **means,
    }
    if not registered:
        log.warning("no fold has a registered model (MLflow was unreachable while training?): best fold %s chosen "
                    "from the folds' validation metrics; use its model.json/best.pt, no @%s alias was set",
                    best["fold"], target.alias)
    if len(registered) < len(fold_summaries):
        summary["unregistered_folds"] = sorted(s["fold"] for s in fold_summaries if not s.get("model_version"))
    try:
        connect(target.tracking_uri, target.experiment)
        client = client_for(target.tracking_uri)
        for key, value in means.items():
            client.log_metric(parent_run_id, key, value)
        client.set_tag(parent_run_id, "best_fold", str(best["fold"]))
        if registered:
            client.set_registered_model_alias(target.registered_model, target.alias, best["model_version"])
        summary["tracking_offline"] = False
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; the summary on disk matters more
        if registered:
            raise  # the alias is the product: let the job fail and be rerun
        log.warning("could not record the cross-validation summary in MLflow (%s: %s); it is in the summary file",
                    type(err).__name__, str(err)[:300])
        summary["tracking_offline"] = True
    return summary
